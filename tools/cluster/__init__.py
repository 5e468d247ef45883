"""A multi-node Ray cluster on this machine from the command line (``python -m tools.cluster``),
built on ``tests/cluster.py``: worker nodes in their own mount namespaces, sharing no files."""
