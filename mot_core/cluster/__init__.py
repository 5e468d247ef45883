"""Training on a Ray cluster (``mot launch``): the driver, the per-worker runtime and the
checkpoint storage. The loop itself is ``mot_core.train.trainer.run_loop``, shared with
``mot train``; DDP/FSDP2 wrapping is ``mot_core.launch.parallel``."""
