"""Post-training (paper §5): the chat template, supervised fine-tuning, GRPO, distillation."""
