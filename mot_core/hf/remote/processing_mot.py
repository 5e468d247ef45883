"""The processor of an exported Mixture-of-Transformers model: interleaved documents (text,
images, ...) -> the model's global ids, and generated ids -> text and images.

Self-contained: this file is copied into every exported folder. Each modality's codec (its
tokenizer: a BPE file, a VQ image tokenizer's network) sits in a folder of its own named after
the modality, with its code; ``processor_config.json`` says which class reads it. A modality
owns the global ids [start, start + size); its codec works in local ids 0..size-1.

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor([("image", "digit.png")])          # a prompt: the image's span
    ids = model.generate(**inputs, allowed_modalities=["text"], max_new_tokens=32,
                         eos_token_id=processor.stop_id("text"))
    processor.decode(ids[0, inputs["input_ids"].shape[1]:])   # [("text", "a digit ...")]
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

CONFIG_FILE = "processor_config.json"


def _load_class(folder: Path, class_name: str):
    """``module.Class`` from ``folder/module.py``, loaded by path (the folder is no package)."""
    module_name, _, name = class_name.rpartition(".")
    path = folder / f"{module_name}.py"
    key = f"_mot_export_{folder.name}_{module_name}_{abs(hash(str(path.resolve())))}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return getattr(sys.modules[key], name)


class MoTProcessor:
    """Segments ``(modality, payload)`` (a bare string is a text segment) <-> global ids.

    Attributes:
        modalities: name -> ``{"start", "size", "stop", "begin", ...}`` as exported.
        codecs: name -> the modality's codec (``encode``, ``encode_prompt``, ``decode``).
    """

    def __init__(self, folder: str | Path, config: dict):
        self.folder = Path(folder)
        self.modalities = {m["name"]: m for m in config["modalities"]}
        self.text_modality = config.get("text_modality")
        self.codecs = {}
        for name, m in self.modalities.items():
            codec = m.get("codec")
            if codec is not None:
                where = self.folder / codec["folder"]
                self.codecs[name] = _load_class(where, codec["class"])(where, codec.get("settings", {}))

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """``AutoProcessor`` calls this on remote code; the folder's ``auto_map`` already names
        this class, so there is nothing to record."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "MoTProcessor":
        """A local exported folder, or a Hub repository (downloaded whole, once)."""
        folder = Path(path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(path), revision=kwargs.get("revision")))
        return cls(folder, json.loads((folder / CONFIG_FILE).read_text()))

    def _segments(self, segments) -> list:
        if isinstance(segments, (str, tuple)):
            segments = [segments]
        out = []
        for segment in segments:
            if isinstance(segment, str):
                if self.text_modality is None:
                    raise ValueError("this model has no text modality: give (modality, payload) segments")
                segment = (self.text_modality, segment)
            name, payload = segment
            if name not in self.codecs:
                raise ValueError(f"no modality {name!r} with a codec; this model has: {', '.join(self.codecs)}")
            out.append((name, payload))
        return out

    def encode(self, segments, prompt: bool = True) -> list[int]:
        """Segments -> global ids, each segment as in training; with ``prompt`` the last one is
        encoded as a prompt (text: without its end-of-text, so the model continues it)."""
        segments = self._segments(segments)
        ids = []
        for index, (name, payload) in enumerate(segments):
            codec, start = self.codecs[name], self.modalities[name]["start"]
            local = codec.encode_prompt(payload) if prompt and index == len(segments) - 1 else codec.encode(payload)
            ids.extend(start + int(i) for i in local)
        return ids

    def __call__(self, segments, prompt: bool = True, return_tensors: str = "pt") -> dict:
        """One prompt, or a list of prompts (each a list of segments) -> ``input_ids`` and
        ``attention_mask`` (B, L), left-padded as ``generate`` expects."""
        batch = segments if isinstance(segments, list) and segments and isinstance(segments[0], list) else [segments]
        rows = [self.encode(s, prompt) for s in batch]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[r, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def stop_id(self, modality: str) -> int | None:
        """The global id that ends free generation in ``modality`` (text: end-of-text)."""
        stop = self.modalities[modality].get("stop")
        return None if stop is None else self.modalities[modality]["start"] + stop

    def span_prompt(self, segments, span_modality: str) -> dict:
        """A prompt for a whole span of ``span_modality`` (caption -> image): the segments as a
        finished document part (text with its end-of-text), then the span's begin marker."""
        begin = self.modalities[span_modality].get("begin")
        if begin is None:
            raise ValueError(f"modality {span_modality!r} has no span to generate")
        ids = self.encode(segments, prompt=False) + [self.modalities[span_modality]["start"] + begin]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}

    def unconditional_ids(self, span_modality: str) -> torch.Tensor:
        """(1, 1) the span's begin marker alone: the unconditional prompt of classifier-free
        guidance, as in the caption-dropout documents the model was trained on. Pass it to
        ``generate(..., guidance_scale=3.0, negative_prompt_ids=...)``."""
        begin = self.modalities[span_modality].get("begin")
        if begin is None:
            raise ValueError(f"modality {span_modality!r} has no span to generate")
        return torch.tensor([[self.modalities[span_modality]["start"] + begin]])

    def owner(self, token: int) -> str:
        for name, m in self.modalities.items():
            if m["start"] <= token < m["start"] + m["size"]:
                return name
        raise ValueError(f"id {token} is outside the vocabulary")

    def decode(self, ids) -> list:
        """Global ids -> ``[(modality, payload), ...]``: each run of one modality's ids through
        its codec (an image span, markers included, becomes a PIL image). A text stop id ends
        its text segment."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        out, run, current = [], [], None
        for token in ids:
            name = self.owner(token)
            if name != current and run:
                out.append((current, self.codecs[current].decode(run)))
                run = []
            current = name
            run.append(token - self.modalities[name]["start"])
        if run:
            out.append((current, self.codecs[current].decode(run)))
        return out
