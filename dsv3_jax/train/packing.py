"""Packed batches (paper §4.1 document packing; reference §7): the token stream cut into non-overlapping windows of
``seq_len + 1`` tokens (inputs and shifted targets), with no cross-document attention mask. Window order is a
per-epoch permutation seeded by ``(seed, epoch)``, so the count of sequences consumed is the whole data-loader
state and a resumed run sees bit-identical batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_seq_len(seq_len: int, cfg) -> None:
    """ValueError unless 1 <= seq_len <= cfg.max_position_embeddings (the model sees seq_len positions; the
    extra window token is only a target)."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds ModelConfig.max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


class PackedBatches:
    """Non-overlapping windows of seq_len + 1 tokens, visited in a per-epoch permutation seeded by (seed, epoch)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if getattr(tokens, "ndim", None) != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {getattr(tokens, 'shape', None)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.window = seq_len + 1
        self.num_sequences = int(tokens.shape[0]) // self.window
        if self.num_sequences == 0:
            raise ValueError(f"the corpus has {tokens.shape[0]} tokens; one sequence of seq_len={seq_len} needs "
                             f"{self.window} (inputs plus the shifted target)")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_sequences)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def sequence(self, index: int) -> np.ndarray:
        """Window ``index`` (in stream order) as int32 [seq_len + 1]."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"window index {index} outside [0, {self.num_sequences})")
        start = index * self.window
        return np.asarray(self.tokens[start:start + self.window], dtype=np.int32)

    def batch(self, position: int, batch_size: int) -> tuple[np.ndarray, int]:
        """The ``batch_size`` windows after ``position`` sequences consumed, as int32 [B, seq_len + 1], and the
        new position."""
        if not _is_int(position) or position < 0:
            raise ValueError(f"position must be a non-negative integer, got {position!r}")
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        position, batch_size = int(position), int(batch_size)
        steps = np.arange(position, position + batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(steps, self.num_sequences)
        index_B = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            index_B[sel] = self.permutation(int(epoch))[offsets[sel]]
        gather_BW = index_B[:, None] * self.window + np.arange(self.window, dtype=np.int64)
        return np.asarray(self.tokens[gather_BW], dtype=np.int32), position + batch_size
