"""Experiment assembly: from a config to the objects a run is made of, before anything trains.

- ``resolve``: the front door's first half, the only way from a YAML file (or dict), overrides
  and a resumed run's saved config to a validated ``RunConfig``;
- ``build``: the plugins' modalities, losses, evaluators and data sources built from their
  options, the model's arguments and the model itself;
- ``tokenize``: tokenizers fitted or reloaded, every source encoded once into shards;
- ``preparation`` and ``provenance``: ``mot data prepare``, ``mot tokenizer fit`` and the record
  of the data a shared tokenizer was fitted on.
"""
