"""Data flow before the model: raw documents -> global token ids -> packed, routed batches."""

from mot_core.data.packing import IGNORE, Batch, PackedStream, collate, fixed_batches
from mot_core.data.vocabulary import TokenDocument, Vocabulary

__all__ = ["IGNORE", "Batch", "PackedStream", "TokenDocument", "Vocabulary", "collate", "fixed_batches"]
