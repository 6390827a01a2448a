"""sglang-ft in SGLang's manager processes: the scheduler's FT worker and regroup, the tokenizer manager's
request journal, the DP controller's outbox."""
