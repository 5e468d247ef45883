"""The image-diffusion VAE (diffusers AutoencoderKL): fit, save, load, encode/decode, latent cache.

Everything runs a tiny two-level VAE on 16x16 smooth random images, so the whole file takes
seconds on a CPU."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from mot_core.errors import MotError
from plugins.image_diffusion.vae import (
    CONFIG_FILE,
    REPORT_FILE,
    WEIGHTS_FILE,
    LatentCache,
    build_vae,
    decode_latents,
    downsample_factor,
    encode_latents,
    fit_vae,
    load_vae,
    resolve_architecture,
    weights_digest,
)

# Two levels (16x16 -> 8x8 latents) with 8/16 channels: a fit of 20 steps takes about a second.
TINY = {"block_out_channels": [8, 16], "norm_num_groups": 4, "sample_size": 16}
FIT = dict(steps=20, batch_size=8, lr=2e-3, kl_weight=1e-4, seed=0, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These ops are tiny: on a shared 2-core machine a second thread mostly waits for the first
    (measured 5x slower under load), so the module runs single-threaded and restores the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 16, 16) in [-1, 1]: 4x4 random colour grids upsampled, so there is structure to learn."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) * 2.0 - 1.0).clamp(-1.0, 1.0)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return smooth_images(64, seed=1), smooth_images(16, seed=2)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """(folder, report) of one tiny fit, shared by the tests that only read it."""
    train, val = data
    folder = tmp_path_factory.mktemp("vae") / "image_vae"
    report = fit_vae(train, val, TINY, out_dir=folder, **FIT)
    return folder, report


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_fit_saves_a_loadable_vae_with_its_scaling_factor_and_report(fitted, data):
    folder, report = fitted
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE])
    assert not list(folder.parent.glob(".image_vae.*")), "temporary folder left behind"
    for key in ("recon_mse", "recon_psnr", "latent_std", "scaling_factor", "steps"):
        assert math.isfinite(report[key]), (key, report)
    assert report["steps"] == FIT["steps"]
    assert report["scaling_factor"] > 0 and report["latent_std"] > 0

    saved = json.loads((folder / REPORT_FILE).read_text())
    assert saved["report"] == report
    # What a modality compares to decide whether the saved VAE still fits its config.
    assert saved["architecture"] == resolve_architecture(TINY)
    assert saved["architecture"]["block_out_channels"] == [8, 16]
    # Block types follow block_out_channels when they are not given.
    assert saved["architecture"]["down_block_types"] == ["DownEncoderBlock2D"] * 2

    vae = load_vae(folder, TINY)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert downsample_factor(vae) == 2
    on_disk = load_file(str(folder / WEIGHTS_FILE))
    loaded = vae.state_dict()
    assert on_disk.keys() == loaded.keys()
    assert all(torch.equal(on_disk[k], loaded[k]) for k in on_disk)


def test_same_seed_gives_identical_weights(fitted, data, tmp_path):
    folder, report = fitted
    train, val = data
    again = fit_vae(train, val, TINY, out_dir=tmp_path / "again", **FIT)
    first, second = load_file(str(folder / WEIGHTS_FILE)), load_file(str(tmp_path / "again" / WEIGHTS_FILE))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["scaling_factor"] == report["scaling_factor"]
    assert weights_digest(folder) == weights_digest(tmp_path / "again")
    # Refitting over an existing folder replaces it; a new seed gives new weights and a new digest.
    fit_vae(train, val, TINY, out_dir=tmp_path / "again", **{**FIT, "seed": 1})
    assert weights_digest(tmp_path / "again") != weights_digest(folder)


def test_encode_decode_shapes_determinism_and_unit_std(fitted, data):
    folder, _ = fitted
    train, _val = data
    vae = load_vae(folder, TINY)
    latents = encode_latents(vae, train, batch_size=24)
    assert latents.shape == (64, 4, 8, 8) and latents.dtype == torch.float32
    assert torch.equal(latents, encode_latents(vae, train, batch_size=64)), "encoding must not depend on sampling or batching"
    # The scaling factor was measured on these very images: scaled latents have std ~1.
    assert abs(float(latents.std()) - 1.0) < 0.05, float(latents.std())
    images = decode_latents(vae, latents[:5])
    assert images.shape == (5, 3, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert encode_latents(vae, train[:0]).shape == (0, 4, 8, 8)


def test_published_format_checkpoint_loads_without_an_architecture(tmp_path):
    torch.manual_seed(0)
    published = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=16,
                              scaling_factor=0.5, shift_factor=0.1)
    published.save_pretrained(str(tmp_path / "sd_vae"), safe_serialization=True)
    vae = load_vae(tmp_path / "sd_vae", None)
    assert downsample_factor(vae) == 1
    images = smooth_images(3, seed=3)
    latents = encode_latents(vae, images)
    assert latents.shape == (3, 2, 16, 16)
    with torch.no_grad():
        mean = published.eval().encode(images).latent_dist.mean
    assert torch.allclose(latents, (mean - 0.1) * 0.5, atol=1e-6), "shift then scale, as diffusers pipelines do"
    decoded = decode_latents(vae, latents)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0


def test_architecture_mismatch_missing_folder_and_corrupt_weights(fitted, tmp_path):
    folder, _ = fitted
    with pytest.raises(MotError) as excinfo:
        load_vae(folder, {**TINY, "latent_channels": 8})
    message = one_line_error(excinfo)
    assert "latent_channels: saved 4 vs configured 8" in message and "mot tokenizer fit --force" in message
    with pytest.raises(MotError) as excinfo:
        load_vae(folder, {}, modality="picture")  # the default architecture is another one
    message = one_line_error(excinfo)
    assert "block_out_channels" in message and "mixture.modalities.picture.options.vae" in message

    with pytest.raises(MotError) as excinfo:
        load_vae(tmp_path / "nowhere", TINY)
    assert "mot tokenizer fit" in one_line_error(excinfo)

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / WEIGHTS_FILE).write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(MotError) as excinfo:
        load_vae(broken, TINY)
    assert "unreadable" in one_line_error(excinfo)
    (broken / WEIGHTS_FILE).unlink()
    with pytest.raises(MotError) as excinfo:
        load_vae(broken, TINY)
    assert WEIGHTS_FILE in one_line_error(excinfo)


def test_bad_architecture_and_bad_inputs(fitted):
    for architecture, named in (
        ({"block_out_chanels": [8]}, "block_out_chanels"),
        ({"norm_num_groups": 3}, "block_out_channels"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"scaling_factor": 0.2}, "scaling_factor"),
        ({**TINY, "down_block_types": ["DownEncoderBlock2D"]}, "down_block_types"),
    ):
        with pytest.raises(MotError) as excinfo:
            build_vae(architecture)
        assert named in one_line_error(excinfo), (architecture, str(excinfo.value))

    vae = load_vae(fitted[0], TINY)
    for images in (torch.zeros(2, 1, 16, 16), torch.zeros(3, 16, 16), torch.zeros(2, 3, 15, 16),
                   torch.full((2, 3, 16, 16), 3.0)):
        with pytest.raises(MotError) as excinfo:
            encode_latents(vae, images)
        one_line_error(excinfo)
    with pytest.raises(MotError) as excinfo:
        decode_latents(vae, torch.zeros(2, 3, 8, 8))
    assert "(N, 4, h, w)" in one_line_error(excinfo)


def test_latent_cache_round_trip_digest_and_garbage(tmp_path):
    images = smooth_images(3, seed=4)
    keys = [LatentCache.key(image) for image in images]
    assert len(set(keys)) == 3 and LatentCache.key(images[0].clone()) == keys[0]

    cache = LatentCache(tmp_path, "abc123")
    batch = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    for key, latents in zip(keys, batch):
        cache[key] = latents
    assert keys[0] in cache and cache[keys[0]].dtype == torch.float32
    cache.save()
    assert not list(tmp_path.glob("*.tmp*")), "temporary file left behind"

    reloaded = LatentCache(tmp_path, "abc123")
    assert all(torch.equal(reloaded[k], cache[k]) for k in keys)
    assert keys[0] not in LatentCache(tmp_path, "def456"), "other weights must start afresh"

    cache.file.write_bytes(b"\x00garbage" * 8)
    assert keys[0] not in LatentCache(tmp_path, "abc123")
    # A folder that is gone (or read-only) only loses the cache, never raises.
    LatentCache(tmp_path / "missing", "abc123").save()
