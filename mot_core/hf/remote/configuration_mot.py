"""Configuration of an exported Mixture-of-Transformers model (arXiv 2411.04996).

Self-contained: this file is copied into every exported folder and needs only
``transformers``. The model routes each token to its modality's tower by the token's id:
every discrete modality owns a contiguous range of one vocabulary.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoTConfig(PretrainedConfig):
    """Shapes and routing of an exported MoT model.

    Attributes (beyond the usual ``hidden_size`` ... ``vocab_size``):
        modalities: one dict per modality, in id order: ``name``, ``start`` and ``size`` (its id
            range), ``host`` (the index of the modality whose tower processes those ids; itself
            unless its markers belong to another modality).
        tower_groups: the tower group of each modality (modalities of a group share a tower).
        attention_towers, ffn_towers, norm_towers: towers of each component (1 = shared by all).
        qk_norm: per modality, whether queries and keys are RMS-normalised per head.
        ffn_kinds: per FFN tower, None (SwiGLU) or a mixture of experts ``{"experts", "top_k",
            "balance": "aux_loss" | "bias"}`` routed token-choice top-k at inference.
        norm_placement: "pre" (Llama) or "post" (the paper's Algorithm 1: norm after each sublayer).
        rope_base, rope_frequency_scaling: RoPE theta and its scaling (None, or ``{"kind":
            "linear" | "llama3", "factor", ...}``).
        span_grammars: spans generated whole (an image): global ``begin``, ``end`` ids, body ids
            in [``body_lo``, ``body_hi``) and ``length`` body tokens; ``generate`` keeps to them.
    """

    model_type = "mot"

    def __init__(self, vocab_size: int = 256, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None, intermediate_size: int = 704,
                 rms_norm_eps: float = 1e-5, rope_base: float = 10000.0, rope_frequency_scaling: dict | None = None,
                 max_position_embeddings: int = 2048, norm_placement: str = "pre", modalities: list | None = None,
                 tower_groups: list | None = None, attention_towers: int = 1, ffn_towers: int = 1,
                 norm_towers: int = 1, qk_norm: list | None = None, ffn_kinds: list | None = None,
                 span_grammars: list | None = None, tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_base = rope_base
        self.rope_frequency_scaling = rope_frequency_scaling
        self.max_position_embeddings = max_position_embeddings
        self.norm_placement = norm_placement
        self.modalities = modalities or [{"name": "text", "start": 0, "size": vocab_size, "host": 0}]
        self.tower_groups = tower_groups or list(range(len(self.modalities)))
        self.attention_towers = attention_towers
        self.ffn_towers = ffn_towers
        self.norm_towers = norm_towers
        self.qk_norm = qk_norm or [False] * len(self.modalities)
        self.ffn_kinds = ffn_kinds or [None] * ffn_towers
        self.span_grammars = span_grammars or []
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
