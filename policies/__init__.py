"""Models that act: the policy LM, its tokenizer, PEFT adapters, the built-in tiny model."""
