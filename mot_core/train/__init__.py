"""Runs: building an experiment from a config, the training loop, checkpoints, evaluation."""
