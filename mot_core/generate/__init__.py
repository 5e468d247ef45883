"""Sampling from a trained model: KV-cache decoding with span grammars and CFG, and
cross-modal tasks built on it (caption -> image, image -> caption)."""
