"""``mot bench roundtrip RUN ...``: export a run as a whole Hugging Face model, load it with
``transformers`` in a Python process that cannot import this package, and compare it with the
run itself on the same inputs:

- logits over an interleaved sequence (text, and every span modality's span between its
  markers), fp32: the largest absolute difference;
- greedy generations, as ``mot generate`` makes them: text continuing a text prompt; for a
  span modality (an image), a span from a caption (with classifier-free guidance 3, through
  transformers' own ``guidance_scale`` and ``negative_prompt_ids``) and a caption from a span;
  identical or not;
- the processor: the exported codecs encode the prompts to the run's own ids;
- the exported folder's size against the checkpoint's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mot_core.errors import MotError

# First lines of a child process that cannot import this package (nor its plugins).
NO_MOT_PRELUDE = r'''
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mot_core", "plugins", "registry"):
            raise ImportError(f"{name} must not be needed by an exported model")
sys.meta_path.insert(0, _Refuse())
'''

# Runs in the child process: the exported folder through transformers alone.
CHILD = NO_MOT_PRELUDE + r'''
import json
import torch
from transformers import AutoModelForCausalLM, AutoProcessor
folder, job_file, out_file = sys.argv[1:4]
job = json.load(open(job_file))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
result = {"loaded": type(model).__name__, "generations": [], "encodings": []}
with torch.no_grad():
    ids = torch.tensor([job["sequence"]])
    torch.save(model(ids).logits[0], out_file + ".logits.pt")
    for case in job["generations"]:
        prompt = torch.tensor([case["prompt"]])
        guided = {}
        if case.get("guidance"):
            guided = {"guidance_scale": case["guidance"], "negative_prompt_ids": torch.tensor([case["unconditional"]])}
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=case["max_new_tokens"],
                             do_sample=False, eos_token_id=case["stop"], pad_token_id=case["stop"] or 0,
                             allowed_modalities=case["allowed"], **guided)
        new = out[0, prompt.shape[1]:].tolist()
        if case["stop"] is not None and new and new[-1] == case["stop"]:
            new = new[:-1]  # mot generate leaves the stop id out
        result["generations"].append(new)
    for segments in job["encodings"]:
        result["encodings"].append(processor.encode([tuple(s) for s in segments], prompt=False))
    if job.get("decode_span"):
        image = processor.decode(job["decode_span"])[-1][1]
        result["decoded_size"] = list(image.size)
json.dump(result, open(out_file, "w"))
'''


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _run_logits(model, vocab, ids: list[int]) -> torch.Tensor:
    """(L, vocab) fp32 logits of the run's model over one sequence, as training computes them."""
    import torch.nn.functional as F

    from mot_core.model.attention import AttentionLayout
    from mot_core.model.routing import build_routing

    tokens = torch.tensor([ids])
    modality = vocab.token_modality()[tokens]
    plan = build_routing(modality, len(vocab.names))
    layout = AttentionLayout.build(torch.zeros_like(tokens))
    positions = torch.arange(len(ids))[None]
    with torch.no_grad():
        hidden = plan.unsort(model(tokens, positions, modality, plan, layout))
        return F.linear(hidden, model.head_weight).float()


def _cases(model, vocab, prompt_text: str, image_file: Path | None, max_new_tokens: int):
    """The sequence whose logits are compared, the generation cases (run side computed here)
    and the segments the processor must encode to the run's ids."""
    from mot_core.generate.decoding import SamplingParams, generate

    greedy = SamplingParams(temperature=0.0)
    guided = SamplingParams(temperature=0.0, cfg_scale=3.0)  # mot generate's default guidance for a span
    text = "text" if "text" in vocab.names else vocab.names[0]
    t_mod, t_off = vocab.modalities[text], vocab.offsets[text]
    stop = None if t_mod.stop_token is None else t_off + int(t_mod.stop_token)
    prompt = [t_off + int(i) for i in t_mod.encode_prompt(prompt_text)]
    cases, sequence, encodings = [], list(prompt), [[[text, prompt_text]]]
    out = generate(model, vocab, [prompt], max_new_tokens, greedy, stop_ids={stop} if stop is not None else set(),
                   allowed_modalities=[text])[0]
    cases.append({"name": "text -> text", "prompt": prompt, "max_new_tokens": max_new_tokens, "stop": stop,
                  "allowed": [text], "expected": out})
    sequence += out
    for name in vocab.names:
        grammar = vocab.modalities[name].span_grammar()
        if grammar is None:
            continue
        off = vocab.offsets[name]
        span_prompt = [t_off + int(i) for i in t_mod.encode(prompt_text)] + [off + grammar.begin]
        begin = [off + grammar.begin]  # the unconditional prompt of guidance, as mot generate makes it
        span = generate(model, vocab, [span_prompt], grammar.length + 1, guided, unconditional_prompts=[begin])[0]
        cases.append({"name": f"text -> {name} (cfg {guided.cfg_scale:g})", "prompt": span_prompt,
                      "max_new_tokens": grammar.length + 1, "stop": None, "allowed": None, "expected": span,
                      "guidance": guided.cfg_scale, "unconditional": begin})
        sequence += [stop] if stop is not None else []
        sequence += [off + grammar.begin] + span
        if image_file is not None:
            payload = vocab.modalities[name].read_payload(image_file)
            own = [off + int(i) for i in vocab.modalities[name].encode(payload)]
            caption = generate(model, vocab, [own], max_new_tokens, greedy,
                               stop_ids={stop} if stop is not None else set(), allowed_modalities=[text])[0]
            cases.append({"name": f"{name} -> text", "prompt": own, "max_new_tokens": max_new_tokens, "stop": stop,
                          "allowed": [text], "expected": caption})
            encodings.append([[name, str(Path(image_file).resolve())]])
            sequence += own + caption
    limit = model.args.max_seq_len
    return sequence[:limit], cases, encodings


def roundtrip(run: str | Path, prompt_text: str = "a", image_file: Path | None = None, max_new_tokens: int = 12,
              keep: Path | None = None) -> dict:
    """Export ``run``, load the export in a process without this package, compare; returns
    the figures (``max_logit_diff``, ``generations`` name -> identical, sizes)."""
    from mot_core.runs.export_whole import export_whole_model
    from mot_core.runs.reopen import load_run
    from mot_core.training.checkpoint import latest_intact

    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise MotError("mot bench roundtrip loads the export with transformers, which is not installed "
                       "(pip install transformers, or the package's test extra)")
    with tempfile.TemporaryDirectory(prefix="mot-roundtrip-") as tmp:
        folder = Path(keep) if keep is not None else Path(tmp) / "export"
        export_whole_model(run, folder)
        exp, vocab, _, model, meta = load_run(run, with_data=False)
        model = model.cpu().eval()
        sequence, cases, encodings = _cases(model, vocab, prompt_text, image_file, max_new_tokens)
        expected_encodings = [
            [vocab.offsets[m] + int(i) for m, p in segments
             for i in vocab.modalities[m].encode(vocab.modalities[m].read_payload(Path(p)) if m != "text" else p)]
            for segments in encodings]
        span_case = next((c for c in cases if c.get("guidance")), None)
        job = {"sequence": sequence, "generations": cases, "encodings": encodings,
               "decode_span": span_case["expected"][:-1] if span_case else None}
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        child = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(job_file), str(out_file)], cwd=tmp,
                               env=env, capture_output=True, text=True)
        if child.returncode:
            raise MotError(f"the exported model did not load or run without mot: {child.stderr.strip()[-2000:]}")
        result = json.loads(out_file.read_text())
        theirs = torch.load(str(out_file) + ".logits.pt")
        ours = _run_logits(model, vocab, sequence)
        local = Path(run)
        checkpoint = local if (local / "meta.json").is_file() else latest_intact(local, report=lambda line: None)
        return {
            "run": str(run), "step": meta["step"], "loaded_as": result["loaded"], "positions": len(sequence),
            "max_logit_diff": float((ours - theirs).abs().max()),
            "generations": {c["name"]: c["expected"] == g for c, g in zip(cases, result["generations"])},
            "generated": {c["name"]: (c["expected"], g) for c, g in zip(cases, result["generations"])},
            "processor_matches": result["encodings"] == expected_encodings,
            "decoded_image": result.get("decoded_size"),
            "export_bytes": folder_bytes(folder),
            "checkpoint_bytes": folder_bytes(checkpoint) if checkpoint is not None else None,
        }


def format_table(rows: list[dict]) -> str:
    lines = ["| run | step | max logit diff | greedy identical | processor ids | export MB | checkpoint MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gens = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["generations"].items())
        ckpt = "-" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / 1e6:.1f}"
        lines.append(f"| {r['run']} | {r['step']} | {r['max_logit_diff']:.2e} | {gens} | "
                     f"{'same' if r['processor_matches'] else 'DIFFER'} | {r['export_bytes'] / 1e6:.1f} | {ckpt} |")
    return "\n".join(lines)
