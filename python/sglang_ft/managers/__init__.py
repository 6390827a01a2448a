"""Processes sglang-ft runs beside SGLang's own managers: the FT controller."""
