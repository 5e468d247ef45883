"""``make gpu-kit``: everything the GPU check needs that a bare CUDA machine lacks, in one
folder (``.gpu-kit/``, ignored by git, carried to the machine with the working tree):

    wheels/                  pydantic (with pydantic-core, annotated-types, typing-inspection,
                             typing-extensions), omegaconf, diffusers, importlib-metadata: the
                             versions installed here, for CPython 3.12 on manylinux x86-64
    data/captioned_images/   emoji and MNIST rendered at 32 px (at most --images-per-source each)
    tokenizers/              the VQ tokenizer and the VAE, fitted here (short fits)
    chameleon.yaml           examples/configs/chameleon_mot.yaml and transfusion_mot.yaml pointed
    transfusion.yaml         at the folders above; Wikipedia left out (it lives outside the repo)
    kit.json                 what the kit holds, and its size with the working tree

Run from the repository root (the configs name the kit's folders relative to it, so that they
hold wherever the working tree is copied).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tools.gpu.check import ROOT

# What the check imports that the CUDA machine's image lacks (its package list is in the README).
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "omegaconf",
          "diffusers", "importlib-metadata", "zipp")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
LEASE_LIMIT_BYTES = 64 * 2**20  # what may travel to the machine: working tree + carried folders
# Tiny tokenizers for the test suite's dry run (the pipeline tests' sizes).
TINY_VQ = {"architecture": {"ch": 32, "ch_mult": [1, 2, 2], "z_channels": 16, "embed_dim": 16, "n_embed": 64}}
TINY_VAE = {"vae": {"block_out_channels": [8, 16, 16], "norm_num_groups": 4}}


def kit_configs(kit: Path, images_per_source: int, fit_steps: int, tiny: bool) -> dict[str, dict]:
    """The Chameleon and Transfusion example configs (MoT), pointed at the kit's folders."""
    where = kit.relative_to(ROOT) if kit.is_relative_to(ROOT) else kit
    configs = {}
    for setting, example, modality in (("chameleon", "chameleon_mot", "image"),
                                       ("transfusion", "transfusion_mot", "image_diffusion")):
        data = yaml.safe_load((ROOT / "examples" / "configs" / f"{example}.yaml").read_text())
        data["run"]["dir"] = f"runs/gpu_check_{setting}"
        datasets = data["mixture"]["datasets"]
        datasets.pop("wikipedia", None)
        images = datasets["captioned_images"]
        images.pop("weight", None)
        images["options"].update(root=str(where / "data" / "captioned_images"), max_images_per_source=images_per_source)
        options = data["mixture"]["modalities"][modality]["options"]
        options["tokenizer_dir"] = str(where / "tokenizers" / modality)
        options["fit"] = {"steps": fit_steps, "feature_net_steps": 0,
                          **({"clip_steps": 0} if modality == "image_diffusion" else {})}
        if tiny:
            options.update(TINY_VQ if modality == "image" else TINY_VAE)
            data["model"].update(dim=32, n_layers=2, n_heads=2)
            data["train"]["batch_size"] = 2
        configs[setting] = data
    return configs


def prepare_kit(kit: Path, images_per_source: int = 2000, fit_steps: int = 300, wheels: bool = True,
                tiny: bool = False, progress=print) -> dict:
    """Write the kit (see the module's docstring); returns its kit.json."""
    kit = kit.resolve()
    kit.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for setting, data in kit_configs(kit, images_per_source, fit_steps, tiny).items():
        (kit / f"{setting}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    steps = [("data", "prepare", "chameleon"), ("tokenizer", "fit", "chameleon"), ("tokenizer", "fit", "transfusion")]
    for group, verb, setting in steps:
        progress(f"gpu kit: mot {group} {verb} {setting}.yaml")
        command = [sys.executable, "-m", "mot_core.cli", group, verb, str(kit / f"{setting}.yaml")]
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            raise SystemExit(f"error: mot {group} {verb} {kit / f'{setting}.yaml'} failed (its error is above)")
    downloaded = download_wheels(kit / "wheels", progress) if wheels else []
    size = _folder_bytes(kit)
    tree = _working_tree_bytes()
    info = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "images_per_source": images_per_source,
            "fit_steps": fit_steps, "tiny": tiny, "wheels": downloaded, "kit_bytes": size,
            "working_tree_bytes": tree, "fits_the_lease": size + tree <= LEASE_LIMIT_BYTES,
            "seconds": round(time.monotonic() - started, 1)}
    (kit / "kit.json").write_text(json.dumps(info, indent=2))
    progress(f"gpu kit: {kit} holds {size / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) "
             f"{(size + tree) / 2**20:.1f} MiB of the {LEASE_LIMIT_BYTES / 2**20:.0f} MiB that may travel")
    if not info["fits_the_lease"]:
        raise SystemExit(f"error: the kit and the working tree ({(size + tree) / 2**20:.1f} MiB) exceed what may travel "
                         f"({LEASE_LIMIT_BYTES / 2**20:.0f} MiB); lower --images-per-source")
    return info


def download_wheels(folder: Path, progress=print) -> list[str]:
    """The versions installed here of ``WHEELS``, as CPython 3.12 manylinux x86-64 wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               *(arg for platform in PLATFORMS for arg in ("--platform", platform)), "-d", str(folder), *pins]
    progress(f"gpu kit: pip download {' '.join(pins)}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SystemExit(f"error: pip could not download the wheels: {tail[-1] if tail else 'no output'}")
    return sorted(p.name for p in folder.glob("*.whl"))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _working_tree_bytes() -> int:
    """Tracked files plus untracked ones git does not ignore: what travels besides the kit."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / name).stat().st_size for name in listed.decode().split("\0") if name and (ROOT / name).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.kit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".gpu-kit")
    parser.add_argument("--images-per-source", type=int, default=2000)
    parser.add_argument("--fit-steps", type=int, default=300, help="steps of the VQ and VAE fits (a smoke test's)")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheel download (a dry-run kit)")
    parser.add_argument("--tiny", action="store_true", help="tiny tokenizers and model (the test suite's dry run)")
    ns = parser.parse_args(argv)
    if ns.images_per_source < 1 or ns.fit_steps < 1:
        print("error: --images-per-source and --fit-steps must be positive", file=sys.stderr)
        return 2
    prepare_kit(Path(ns.out), ns.images_per_source, ns.fit_steps, wheels=not ns.no_wheels, tiny=ns.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
