"""Post-training (paper §5): the chat template, supervised fine-tuning, GRPO, distillation."""

from dsv3_jax.posttrain.grpo import grpo_loss

__all__ = ["grpo_loss"]
