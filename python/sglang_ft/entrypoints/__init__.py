"""sglang-ft's additions to SGLang's HTTP server and launcher."""
