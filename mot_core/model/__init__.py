"""The network, pure torch: routing by modality, tower layers, MoT blocks, global attention,
RoPE, the KV cache and the transformer. Knows nothing of configs, plugins or launchers."""
