"""Rebuilding SGLang's process groups for a new TP world, in place."""
