"""Mixture-of-Transformers core engine: routing, MoT blocks, global attention, training."""

from mot_core.errors import MotError

__all__ = ["MotError"]
__version__ = "0.1.0"
