"""Model blocks: norm, rope (YaRN), mla, moe, ffn, transformer (with MTP)."""
