"""Training: inputs (corpus and --data readers), tokenizer, tokens (token cache, FIM, held-out split) and packing
(paper §4.1), optimizer and schedules, the step, checkpoints and the pre-training loop."""
