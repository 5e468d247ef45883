"""Benchmarks behind ``mot bench``: iso-FLOP step speed and steps-to-dense-loss matching."""
