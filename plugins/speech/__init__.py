"""Built-in speech plugin (the paper's third modality): k-means units over MFCC features at
25 Hz between begin/end-of-speech markers, spoken sentences synthesised offline with
espeak-ng, and unit evaluation."""

from plugins.speech.data import SpokenSentences
from plugins.speech.evaluator import SpeechUnitsEvaluator
from plugins.speech.formats import LibriSpeech
from plugins.speech.modality import Speech
from registry import hookimpl


@hookimpl
def mot_modalities():
    return [Speech]


@hookimpl
def mot_datasets():
    return [SpokenSentences, LibriSpeech]


@hookimpl
def mot_evaluators():
    return [SpeechUnitsEvaluator]
