"""Built-in ``hf_dataset`` source: Hugging Face ``datasets`` on local disk (``save_to_disk``
folders, or a folder ``datasets.load_dataset`` reads), its Text, Image and Audio columns mapped
to modalities by name. Needs the ``hf-datasets`` extra; nothing is downloaded."""

from plugins.hf_datasets.source import HuggingFaceDataset
from registry import hookimpl


@hookimpl
def mot_datasets():
    return [HuggingFaceDataset]
