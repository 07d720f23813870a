"""Builders of tiny Hugging Face DeepseekV3ForCausalLM checkpoints for the parity tests (the independent reference).

Everything here is torch + transformers + safetensors.torch; nothing from dsv3_jax writes these checkpoints.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = dict(
    vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=128, rms_norm_eps=1e-6, num_nextn_predict_layers=0, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

FP8_NAMES = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj")


def build_hf_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """A random float32 DeepseekV3ForCausalLM with non-trivial norms and a non-zero routing bias."""
    kwargs = {**BASE, **overrides}
    cfg = DeepseekV3Config(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.rand(buf.shape, generator=gen) - 0.05)
    return model


def save_hf(model: DeepseekV3ForCausalLM, path: str, max_shard_size: str | None = None) -> None:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)


def hf_logits(model: DeepseekV3ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# MTP layer: a full decoder layer at index num_hidden_layers plus enorm/hnorm/eh_proj/shared_head, written into the
# checkpoint the way the released model stores it (reference §2.1, §6).


class HFMTPReference:
    """Eqs. 21-23 restated with transformers' own decoder layer: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]),
    h = TRM(h'), logits = head(shared_head.norm(h)); h_i is the main model's final (normalised) hidden state."""

    def __init__(self, model: DeepseekV3ForCausalLM, overrides: dict, seed: int = 7):
        cfg = model.config
        donor = build_hf_model(seed, **{**overrides, "num_hidden_layers": cfg.num_hidden_layers + 1})
        self.model = model
        self.layer = donor.model.layers[cfg.num_hidden_layers].eval()
        gen = torch.Generator().manual_seed(seed + 3)
        d = cfg.hidden_size
        self.enorm = 1.0 + 0.2 * torch.randn(d, generator=gen)
        self.hnorm = 1.0 + 0.2 * torch.randn(d, generator=gen)
        self.head_norm = 1.0 + 0.2 * torch.randn(d, generator=gen)
        self.eh_proj = 0.08 * torch.randn(d, 2 * d, generator=gen)
        self.eps = cfg.rms_norm_eps

    def tensors(self) -> dict[str, torch.Tensor]:
        n = self.model.config.num_hidden_layers
        prefix = f"model.layers.{n}."
        out = {}
        for k, v in self.layer.state_dict().items():
            v = v.detach().clone()
            if k == "mlp.experts.gate_up_proj":  # transformers' fused in-memory layout -> released per-expert names
                f = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = v[e, :f].contiguous()
                    out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = v[e, f:].contiguous()
            elif k == "mlp.experts.down_proj":
                for e in range(v.shape[0]):
                    out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = v[e].contiguous()
            else:
                out[prefix + k] = v.contiguous()
        out.update({
            prefix + "enorm.weight": self.enorm, prefix + "hnorm.weight": self.hnorm,
            prefix + "eh_proj.weight": self.eh_proj, prefix + "shared_head.norm.weight": self.head_norm,
            prefix + "embed_tokens.weight": self.model.model.embed_tokens.weight.detach().clone(),
            prefix + "shared_head.head.weight": self.model.lm_head.weight.detach().clone(),
        })
        return out

    def _rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """MTP logits [B, T-1, V]: position i predicts token i+2."""
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        with torch.no_grad():
            h = self.model.model(ids).last_hidden_state[:, :-1]
            emb = self.model.model.embed_tokens(ids[:, 1:])
            x = torch.cat([self._rms(emb, self.enorm), self._rms(h, self.hnorm)], dim=-1) @ self.eh_proj.T
            t = x.shape[1]
            pos = torch.arange(t)[None]
            cos, sin = self.model.model.rotary_emb(x, pos)
            mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
            x = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            return self.model.lm_head(self._rms(x, self.head_norm)).numpy()


def add_tensors_as_shard(path: str, tensors: dict[str, torch.Tensor], shard_name: str, config_updates: dict) -> None:
    """Append tensors as one more shard of a sharded checkpoint (or turn a single file into an index)."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:
        single = os.path.join(path, "model.safetensors")
        names = list(load_file(single).keys())
        os.rename(single, os.path.join(path, "model-base.safetensors"))
        index = {"metadata": {}, "weight_map": {n: "model-base.safetensors" for n in names}}
    save_file(tensors, os.path.join(path, shard_name), metadata={"format": "pt"})
    index["weight_map"].update({n: shard_name for n in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f)
    update_config(path, config_updates)


def update_config(path: str, updates: dict) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(updates)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


# ---------------------------------------------------------------------------------------------------------------
# FP8: quantize each projection per 128x128 block as reference §2.1 describes, written as float8_e4m3fn plus a
# float32 weight_scale_inv; the HF model is given the dequantized weights.


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], scale_inv float32 [ceil(N/128), ceil(K/128)]) with W ~= q * scale per block."""
    n, k = w.shape
    nb, kb = math.ceil(n / 128), math.ceil(k / 128)
    padded = torch.zeros(nb * 128, kb * 128)
    padded[:n, :k] = w
    blocks = padded.view(nb, 128, kb, 128)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    scale = amax / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).view(nb * 128, kb * 128)[:n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float().contiguous()


def dequant_block_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    s = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return q.float() * s


def write_fp8_checkpoint(model: DeepseekV3ForCausalLM, path: str) -> None:
    """Quantize the model's projections in place (HF keeps the dequantized values) and save the FP8 checkpoint."""
    model.save_pretrained(path)
    single = os.path.join(path, "model.safetensors")
    sd = load_file(single)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, w in sd.items():
            leaf = name.split(".")[-2] if name.endswith(".weight") else ""
            if leaf in FP8_NAMES and w.ndim == 2:
                q, s = quantize_block_fp8(w.float())
                out[name] = q
                out[name + "_scale_inv"] = s
                deq = dequant_block_fp8(q, s)
                sd[name] = deq
            else:
                out[name] = w
        # transformers' loaded model holds experts fused; reload it from the dequantized per-expert tensors
        save_file(sd, single, metadata={"format": "pt"})
        reloaded = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        for name, p in reloaded.named_parameters():
            params[name].copy_(p)
    save_file(out, single, metadata={"format": "pt"})
    update_config(path, {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                 "quant_method": "fp8", "weight_block_size": [128, 128]}})
