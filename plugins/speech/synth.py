"""Text-to-speech for the speech plugin, through the espeak-ng library bundled in ``espeakng-loader``.

Why ctypes over the bundled library: the ``espeakng-loader`` wheel ships ``libespeak-ng.so``
(espeak-ng 1.52) and its ``espeak-ng-data`` folder, so synthesis needs no system package (no
``espeak-ng`` binary, no apt), no network and no model download. We call the C API of
``speak_lib.h`` directly with ``ctypes`` and collect the 16-bit samples through the synthesis
callback, instead of shelling out to a program that may not be installed.

Output is deterministic: the same text and the same :class:`Voice` give a bit-identical array,
whatever was synthesized before, in this process or another (``tests/test_speech_synth.py``
checks it). That takes two measures, because espeak-ng's wave generator keeps hidden state:

* it draws pseudo-random noise (breathiness of variants such as ``f3``, frication); its private
  generator is reseeded (``espeak_ng_SetRandSeed``) before every utterance;
* static state is carried from one utterance to the next and is not reset by
  ``espeak_Terminate``/``espeak_Initialize`` (pitch-flutter phase, echo buffer, ...): the same text
  spoken twice in a row differs by a few samples. So every :func:`synthesize` call loads the
  library, initializes it, speaks, then terminates and unloads it (``dlclose``), and the next call
  starts from a freshly mapped library. This costs a few milliseconds per call. (If something
  else in the process holds the same library open, the unload cannot happen and outputs may then
  depend on history; it is also unsafe to share espeak-ng's global state with such a user.)

espeak-ng keeps global state (one voice, one set of parameters, one callback), so every call into
it happens under one module lock: :func:`synthesize` is safe to call from several threads.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import espeakng_loader
import numpy as np

from mot_core.errors import MotError

# ---------------------------------------------------------------------------------------------
# Constants and signatures from espeak-ng's speak_lib.h (src/include/espeak-ng/speak_lib.h).
#
# typedef enum { AUDIO_OUTPUT_PLAYBACK, AUDIO_OUTPUT_RETRIEVAL, AUDIO_OUTPUT_SYNCHRONOUS,
#                AUDIO_OUTPUT_SYNCH_PLAYBACK } espeak_AUDIO_OUTPUT;
#   SYNCHRONOUS: espeak_Synth() returns only once the whole text has been synthesized, and the
#   synth callback is called from inside it, on the calling thread (no espeak-ng thread).
AUDIO_OUTPUT_SYNCHRONOUS = 2
# int espeak_Initialize(espeak_AUDIO_OUTPUT output, int buflength, const char *path, int options);
#   buflength: length in ms of the sound buffers handed to the callback (0 means 200 ms).
#   path: the espeak-ng-data directory (or its parent); NULL = compiled-in default.
#   Returns the sample rate in Hz, or -1 (EE_INTERNAL_ERROR).
#   options: espeakINITIALIZE_PHONEME_EVENTS 0x0001, espeakINITIALIZE_PHONEME_IPA 0x0002,
#   espeakINITIALIZE_DONT_EXIT 0x8000 -- without the latter espeak-ng calls exit() when its data
#   cannot be loaded, which would kill the Python process instead of raising.
espeakINITIALIZE_DONT_EXIT = 0x8000
BUFLENGTH_MS = 500

# typedef enum { EE_OK=0, EE_INTERNAL_ERROR=-1, EE_BUFFER_FULL=1, EE_NOT_FOUND=2 } espeak_ERROR;
EE_OK = 0
_ERROR_NAMES = {-1: "EE_INTERNAL_ERROR", 1: "EE_BUFFER_FULL", 2: "EE_NOT_FOUND"}

# typedef enum { POS_CHARACTER = 1, POS_WORD, POS_SENTENCE } espeak_POSITION_TYPE;
POS_CHARACTER = 1
# espeak_Synth flags: espeakCHARS_AUTO 0, espeakCHARS_UTF8 1, espeakCHARS_8BIT 2,
# espeakCHARS_WCHAR 3, espeakCHARS_16BIT 4; espeakSSML 0x10, espeakPHONEMES 0x100,
# espeakENDPAUSE 0x1000, espeakKEEP_NAMEDATA 0x2000.
espeakCHARS_UTF8 = 1
# typedef enum { espeakSILENCE=0, espeakRATE=1, espeakVOLUME=2, espeakPITCH=3, espeakRANGE=4,
#                espeakPUNCTUATION=5, espeakCAPITALS=6, espeakWORDGAP=7, espeakOPTIONS=8,
#                espeakINTONATION=9, ... } espeak_PARAMETER;
#   espeakRATE: speaking speed in words per minute (espeak-ng clamps it to 80..450; default 175).
#   espeak_ERROR espeak_SetParameter(espeak_PARAMETER parameter, int value, int relative);
espeakRATE = 1
# Seed of espeak-ng's internal noise generator, set before every utterance (see docstring).
_RAND_SEED = 1

SAMPLE_RATE = 22050  # espeak-ng's native rate; synthesize() returns what espeak_Initialize says.


# typedef struct {
#     espeak_EVENT_TYPE type;        // enum (int); 0 = espeakEVENT_LIST_TERMINATED
#     unsigned int unique_identifier;
#     int text_position;
#     int length;
#     int audio_position;            // ms
#     int sample;
#     void *user_data;
#     union { int number; const char *name; char string[8]; } id;
# } espeak_EVENT;
class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


# typedef struct {
#     const char *name;        // e.g. "English (America)"
#     const char *languages;   // (priority byte, NUL-terminated language) pairs, ended by a 0 byte
#     const char *identifier;  // path within espeak-ng-data/voices or lang, e.g. "gmw/en-US"
#     unsigned char gender;    // 0 none, 1 male, 2 female
#     unsigned char age;
#     unsigned char variant;   // only used by espeak_SetVoiceByProperties
#     unsigned char xx1;
#     int score;
#     void *spare;
# } espeak_VOICE;
# const espeak_VOICE **espeak_ListVoices(espeak_VOICE *voice_spec);  NULL-terminated array;
#   voice_spec NULL lists all voices, voice_spec->languages = "variant" lists the variants (!v/...).
class _VoiceInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # not c_char_p: it holds several NUL-separated strings
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# typedef int (t_espeak_callback)(short *wav, int numsamples, espeak_EVENT *events);
# void espeak_SetSynthCallback(t_espeak_callback *SynthCallback);
#   wav: numsamples 16-bit mono samples (NULL / numsamples 0 at the end of the text).
#   Return 0 to continue synthesis, 1 to abort it.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: a language or voice ``name`` (``en-us``, ``en-gb``, ``fr``...), an
    optional variant (``f3``, ``m3``, ``klatt``... from ``espeak-ng-data/voices/!v``) and a speed
    in words per minute (espeak's rate parameter)."""

    name: str = "en-us"
    variant: str | None = None
    speed: int = 160

    @property
    def spec(self) -> str:
        """``name`` or ``name+variant``, as espeak-ng writes a voice with a variant."""
        return self.name if not self.variant else f"{self.name}+{self.variant}"

    @property
    def label(self) -> str:
        """A short human-readable label, e.g. ``en-us+f3@160``."""
        return f"{self.spec}@{self.speed}"


_lock = threading.Lock()
_chunks: list[np.ndarray] = []  # filled by the callback during one espeak_Synth call
_resolved: dict[tuple[str, str | None], bytes] = {}  # (name, variant) -> espeak_SetVoiceByName arg


def _on_samples(wav, numsamples, events):  # noqa: ARG001 - events unused
    if numsamples > 0 and wav:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    return 0  # continue


# Module-level reference: the C library keeps only a raw pointer to this thunk, so it must never
# be garbage collected.
_callback = _SYNTH_CALLBACK(_on_samples)


def _dlclose_function():
    """libc's ``int dlclose(void *handle)`` from the process namespace, or None."""
    try:
        fn = ctypes.CDLL(None).dlclose
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_dlclose = _dlclose_function()


def _open() -> tuple[ctypes.CDLL, int]:
    """Load the bundled library and initialize it. Caller holds ``_lock``."""
    try:
        lib_path = espeakng_loader.get_library_path()
        data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(lib_path)
    except (OSError, RuntimeError) as exc:
        raise MotError(f"speech synthesis unavailable: cannot load the bundled espeak-ng library ({exc})") from None

    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_VoiceInfo)]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceInfo))
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    # espeak_ERROR espeak_Synth(const void *text, size_t size, unsigned int position,
    #     espeak_POSITION_TYPE position_type, unsigned int end_position, unsigned int flags,
    #     unsigned int *unique_identifier, void *user_data);
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    # espeak_ERROR espeak_Synchronize(void);  espeak_ERROR espeak_Terminate(void);
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int
    # void espeak_ng_SetRandSeed(long seed);  (espeak_ng.h, espeak-ng >= 1.51)
    if hasattr(lib, "espeak_ng_SetRandSeed"):
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None

    rate = lib.espeak_Initialize(
        AUDIO_OUTPUT_SYNCHRONOUS, BUFLENGTH_MS, data_path.encode(), espeakINITIALIZE_DONT_EXIT
    )
    if rate <= 0:
        _close(lib)
        raise MotError(f"speech synthesis unavailable: espeak_Initialize failed with the data at {data_path}")
    lib.espeak_SetSynthCallback(_callback)
    return lib, rate


def _close(lib: ctypes.CDLL) -> None:
    """Terminate espeak-ng and unload the library so the next call starts from fresh state."""
    lib.espeak_Terminate()
    if _dlclose is not None:
        _dlclose(lib._handle)


def _languages(address: int | None) -> list[tuple[int, str]]:
    """Decode an espeak_VOICE.languages list: (priority byte, NUL-terminated string)..., 0."""
    out: list[tuple[int, str]] = []
    if not address:
        return out
    while (priority := ctypes.c_ubyte.from_address(address).value) != 0:
        raw = ctypes.string_at(address + 1)
        out.append((priority, raw.decode("utf-8", "replace")))
        address += len(raw) + 2
    return out


def _list(lib: ctypes.CDLL, variants: bool = False) -> list[tuple[str, list[tuple[int, str]]]]:
    """(identifier, languages) of every voice, or of every variant when ``variants``."""
    spec = None
    if variants:
        keep = ctypes.c_char_p(b"variant")
        spec = _VoiceInfo(languages=ctypes.cast(keep, ctypes.c_void_p))
    array = lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
    out = []
    i = 0
    while array and array[i]:
        info = array[i].contents
        out.append(((info.identifier or b"").decode("utf-8", "replace"), _languages(info.languages)))
        i += 1
    return out


def _resolve(lib: ctypes.CDLL, voice: Voice) -> bytes:
    """The argument for espeak_SetVoiceByName: the voice's file identifier, plus ``+variant``.

    espeak_SetVoiceByName accepts a voice file name ("en-us", "gmw/en") or a voice's full name,
    but not every language tag ("en-gb" is the language of the file "gmw/en"), and it silently
    ignores an unknown variant; so both are looked up in espeak_ListVoices first.
    """
    key = (voice.name, voice.variant)
    if key in _resolved:
        return _resolved[key]
    if not isinstance(voice.name, str) or not voice.name.strip() or "+" in voice.name:
        raise MotError(f"speech synthesis: invalid espeak-ng voice name {voice.name!r}; give a language such as 'en-us'")
    wanted = voice.name.strip().lower()
    best: tuple[int, str] | None = None
    for identifier, languages in _list(lib):
        if identifier.lower() == wanted or identifier.lower().rsplit("/", 1)[-1] == wanted:
            best = (0, identifier)
            break
        for priority, language in languages:
            if language.lower() == wanted and (best is None or priority < best[0]):
                best = (priority, identifier)
    if best is None:
        raise MotError(f"speech synthesis: unknown espeak-ng voice {voice.name!r}; use a language such as 'en-us' or 'en-gb'")
    spec = best[1]
    if voice.variant:
        names = {ident.rsplit("/", 1)[-1].lower(): ident.rsplit("/", 1)[-1] for ident, _ in _list(lib, variants=True)}
        variant = names.get(str(voice.variant).strip().lower())
        if variant is None:
            raise MotError(f"speech synthesis: unknown espeak-ng voice variant {voice.variant!r} for {voice.name!r}; use one such as 'f3' or 'm3'")
        spec += "+" + variant
    _resolved[key] = spec.encode("utf-8")
    return _resolved[key]


def available_voices() -> list[str]:
    """The language names accepted as :attr:`Voice.name` (e.g. ``en-us``, ``en-gb``, ``fr``)."""
    with _lock:
        lib, _ = _open()
        try:
            voices = _list(lib)
        finally:
            _close(lib)
    return sorted({language for _, languages in voices for _, language in languages} - {"variant"})


def synthesize(text: str, voice: Voice = Voice()) -> tuple[np.ndarray, int]:
    """Speak ``text`` with ``voice``: a float32 mono array in [-1, 1] and its sample rate (22050).

    Deterministic: the same text and voice always give the same array. Raises :class:`MotError`
    if the library cannot be loaded, the voice or variant is unknown, the speed is invalid, the
    text is empty or synthesis produces no audio.
    """
    if not isinstance(text, str) or not text.strip():
        raise MotError(f"speech synthesis: the text to speak is empty ({text!r}); give a non-empty string")
    if isinstance(voice.speed, bool) or not isinstance(voice.speed, int) or voice.speed <= 0:
        raise MotError(f"speech synthesis: voice {voice.label!r} has an invalid speed; give a positive words-per-minute integer")
    data = text.encode("utf-8")
    short = text if len(text) <= 40 else text[:37] + "..."
    with _lock:
        lib, rate = _open()
        _chunks.clear()
        try:
            spec = _resolve(lib, voice)
            err = lib.espeak_SetVoiceByName(spec)
            if err != EE_OK:
                raise MotError(f"speech synthesis: espeak-ng cannot load voice {voice.spec!r} ({_ERROR_NAMES.get(err, err)})")
            err = lib.espeak_SetParameter(espeakRATE, voice.speed, 0)
            if err != EE_OK:
                raise MotError(f"speech synthesis: espeak-ng rejected speed {voice.speed} for voice {voice.label!r} ({_ERROR_NAMES.get(err, err)})")
            if hasattr(lib, "espeak_ng_SetRandSeed"):
                lib.espeak_ng_SetRandSeed(_RAND_SEED)
            # size counts the terminating NUL, as espeak-ng's own programs pass it.
            err = lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, espeakCHARS_UTF8, None, None)
            if err == EE_OK:
                err = lib.espeak_Synchronize()
            chunks = list(_chunks)
        finally:
            _chunks.clear()
            _close(lib)
    if err != EE_OK:
        raise MotError(f"speech synthesis failed for voice {voice.label!r} on text {short!r} ({_ERROR_NAMES.get(err, err)})")
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    if pcm.size == 0:
        raise MotError(f"speech synthesis produced no audio for voice {voice.label!r} on text {short!r}")
    return pcm.astype(np.float32) / np.float32(32768.0), rate
