"""Captioned-image data shared by the image plugins: built-in emoji named by Unicode and
handwritten MNIST digits (rendered offline by ``mot data prepare``), or folders of one's own."""

from plugins.images.data import CaptionedImages
from plugins.images.formats import ImageTextParquet, InterleavedDocuments, WebDataset
from registry import hookimpl


@hookimpl
def mot_datasets():
    return [CaptionedImages, WebDataset, ImageTextParquet, InterleavedDocuments]
