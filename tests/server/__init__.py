"""Tests against real SGLang servers, launched as users launch them (marked `server`)."""
