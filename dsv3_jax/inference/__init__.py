"""Inference: the compressed latent KV cache (MLA, paper §2.1.1), prefill and decode."""
