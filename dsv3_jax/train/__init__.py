"""Training: tokenizer, corpus preparation and packed batches (paper §4.1), the pre-training loop."""
