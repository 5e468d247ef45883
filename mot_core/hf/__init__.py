"""Hugging Face checkpoints in and out: a local Llama-family folder loaded into a modality's
tower (``model.init_from``), and a tower written back as one (``mot export``)."""
