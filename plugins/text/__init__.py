"""Built-in text plugin: BPE tokenizer, Wikipedia/plain-text data, LM evaluator."""

from plugins.text.data import TextFiles, Wikipedia
from plugins.text.evaluator import LanguageModelEvaluator
from plugins.text.modality import Text
from plugins.text.records import TextRecords
from registry import hookimpl


@hookimpl
def mot_modalities():
    return [Text]


@hookimpl
def mot_datasets():
    return [Wikipedia, TextFiles, TextRecords]


@hookimpl
def mot_evaluators():
    return [LanguageModelEvaluator]
