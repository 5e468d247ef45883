"""The GPU check and its kit: repository tools for a CUDA machine (`make gpu-kit`, `make gpu-check`),
kept outside the installed package: they read the repository (its `tests/`, `git ls-files`)."""
