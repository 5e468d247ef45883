"""Where and how a run executes: device and precision choice, seeding, host runtime settings.
Distributed launchers live here, apart from the model and the training loop (torchtitan's split)."""
