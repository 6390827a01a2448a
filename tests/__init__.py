"""The project's tests: unit/ (no server) and server/ (real SGLang servers); helpers shared by both live here."""
