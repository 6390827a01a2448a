"""Tests that need no SGLang server (`make test-fast`)."""
