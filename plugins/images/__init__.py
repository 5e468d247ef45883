"""Built-in captioned-image data (emoji named by Unicode, handwritten MNIST digits), shared
by the image plugins: rendered offline by ``mot data prepare``."""

from plugins.images.data import CaptionedImages
from registry import hookimpl


@hookimpl
def mot_datasets():
    return [CaptionedImages]
