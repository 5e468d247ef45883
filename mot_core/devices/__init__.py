"""Where tensors live: the device and precision a run uses, seeding, the host's memory, and
building modules on the meta device. Parallelism over devices (DDP, FSDP2) is part of the
training runtime (``mot_core.training.parallelism``); launchers are ``mot_core.distributed``."""
