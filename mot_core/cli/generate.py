"""``mot generate``: samples of any modality from a checkpoint, through
``mot_core.generate.api.generate_segments`` (the one generation entry point)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mot_core.cli.common import non_negative_float, non_negative_int, output_file, positive_int, probability, seed_int
from mot_core.errors import MotError, plugin_boundary
from mot_core.plugin_api import origin


def _target(vocab, modality: str | None, prompt_modality: str) -> str:
    """--modality, or the run's one span modality (an image), or its one modality that is
    not the prompt's."""
    if modality is not None:
        if modality not in vocab.modalities:
            raise MotError(f"this run has no modality '{modality}'; it has: {', '.join(vocab.names)}")
        return modality
    spans = [n for n in vocab.names
             if vocab.modalities[n].span_grammar() is not None or vocab.modalities[n].input_dim is not None]
    choices = spans or [n for n in vocab.names if n != prompt_modality] or [prompt_modality]  # text-only: text
    if len(choices) != 1:
        raise MotError(f"say which modality to generate with --modality (this run has: {', '.join(vocab.names)})")
    return choices[0]


def _run_job(model, vocab, labels: list[str], payloads: list, prompt_modality: str, target: str, samples: int,
             params, ns: argparse.Namespace) -> dict:
    """Generate ``samples`` outputs of ``target`` per prompt payload; write them through the
    modality's ``write_payloads`` when it has one, else return them to print."""
    from mot_core.generate.api import generate_segments
    from mot_core.generate.decoding import check_generation_fits
    from mot_core.plugin_api import Modality, RawSegment

    # a lower bound (one position per row), before the rows exist: _Stream checks the real sizes
    check_generation_fits(model, len(payloads) * samples, 1)
    prompts = [[RawSegment(prompt_modality, p)] for p in payloads for _ in range(samples)]
    shown = [label for label in labels for _ in range(samples)]
    modality = vocab.modalities[target]
    # Samples go to a file only through the modality's own writer: --out, else its default
    # file (an image grid); a modality without a writer, or without a default, prints them.
    writes = type(modality).write_payloads is not Modality.write_payloads
    out = (ns.out or modality.default_sample_file) if writes else None
    if out is not None:
        output_file(out, "--out")  # before generating: a bad path costs nothing
    outputs = generate_segments(model, vocab, prompts, target, params, max_tokens=ns.max_tokens, seed=ns.seed)
    if out is None:
        return {"modality": target, "text": list(zip(shown, outputs)), "prompts": len(labels)}
    with plugin_boundary(f"{origin(modality)}: modality '{target}', write_payloads"):
        written = modality.write_payloads(list(outputs), Path(out), shown)
    return {"modality": target, "file": str(written), "prompts": len(labels)}


def generate_samples(checkpoint: str | Path, ns: argparse.Namespace, params) -> list[dict]:
    """The jobs of one ``mot generate``: prompts (text or files) -> --modality, and the older
    --image FILE -> caption."""
    from mot_core.runs.reopen import load_run

    _, vocab, _, model, _ = load_run(checkpoint, with_data=False)
    jobs = []
    if ns.prompt or ns.prompt_file:
        if ns.prompt_modality not in vocab.modalities:
            raise MotError(f"this run has no modality '{ns.prompt_modality}'; it has: {', '.join(vocab.names)}")
        target = _target(vocab, ns.modality or ns.image_modality, ns.prompt_modality)
        source = vocab.modalities[ns.prompt_modality]
        payloads = list(ns.prompt) + [_read(source, ns.prompt_modality, f) for f in ns.prompt_file]
        jobs.append(_run_job(model, vocab, list(ns.prompt) + list(ns.prompt_file), payloads, ns.prompt_modality,
                             target, ns.samples, params, ns))
    if ns.image:
        image = _target(vocab, ns.image_modality, ns.text_modality)
        payloads = [_read(vocab.modalities[image], image, f) for f in ns.image]
        jobs.append(_run_job(model, vocab, list(ns.image), payloads, image, ns.text_modality, 1, params, ns))
    return jobs


def _read(modality, name: str, path: str):
    """A prompt file through the modality's ``read_payload``; its errors name the plugin."""
    with plugin_boundary(f"{origin(modality)}: modality '{name}', read_payload"):
        return modality.read_payload(Path(path))


def _one_line(output) -> str:
    """A printed payload on one line: arrays and tensors (a generated series) as their values."""
    if hasattr(output, "tolist") and not isinstance(output, str):
        values = output.tolist()
        if isinstance(values, list):
            flat = [v for row in values for v in (row if isinstance(row, list) else [row])]
            return " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in flat)
    return str(output)


def cmd_generate(ns: argparse.Namespace) -> int:
    from mot_core.plugin_api import SamplingParams

    if not ns.prompt and not ns.image and not ns.prompt_file:
        raise MotError("give at least one --prompt TEXT or --prompt-file FILE (or --image FILE: image -> caption)")
    if ns.out is not None:
        output_file(ns.out, "--out")
    params = SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, cfg_scale=ns.cfg,
                            denoising_steps=ns.steps)
    for job in generate_samples(ns.checkpoint, ns, params):
        if "file" in job:
            print(f"{job['modality']} for {job['prompts']} prompt(s) x {ns.samples}: {job['file']}")
        for label, output in job.get("text", []):
            print(f"{label}: {_one_line(output)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate any modality from a checkpoint (caption -> image, series, text...)",
                       description="Prompts are payloads of --prompt-modality (text by default); the output is "
                       "--modality, written through its plugin's write_payloads (or printed).")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt payload given as text (repeatable)")
    p.add_argument("--prompt-file", action="append", default=[],
                   help="a prompt read from a file by --prompt-modality's read_payload (repeatable)")
    p.add_argument("--prompt-modality", default="text", help="the modality of the prompts (default: text)")
    p.add_argument("--modality", default=None,
                   help="the modality to generate (default: the run's image modality, or its one other modality)")
    p.add_argument("--max-tokens", type=positive_int, default=64,
                   help="free-running modalities: stop here if the stop token has not come; open-ended "
                   "continuous spans (a forecast): the positions to generate")
    p.add_argument("--samples", type=positive_int, default=4, help="samples per prompt")
    p.add_argument("--out", default=None, help="file the modality writes its samples to (default: the modality's "
                   "default_sample_file, samples.png for images; none: the samples are printed)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=probability, default=1.0, help="1 = off")
    p.add_argument("--cfg", type=non_negative_float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--steps", type=non_negative_int, default=0,
                   help="denoising steps of a continuous modality (0 = its configured default)")
    p.add_argument("--image", action="append", default=[], help="an image file to caption (= --prompt-file with the "
                   "image modality as --prompt-modality and text as --modality)")
    p.add_argument("--text-modality", default="text", help=argparse.SUPPRESS)
    p.add_argument("--image-modality", default=None, help="older name of --modality for images")
    p.set_defaults(func=cmd_generate)
