"""dsv3-jax: a JAX/Flax reimplementation of DeepSeek-V3 (arXiv:2412.19437)."""

from dsv3_jax.config import PRESETS, ModelConfig, get_preset
from dsv3_jax.model.transformer import ModelOutput, Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.hf import from_pretrained, save_pretrained

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "ModelOutput", "Precision", "from_pretrained", "save_pretrained"]
