"""The end of a sharded run (``mot launch``, ``mot train --process-group``): its last distributed
checkpoint written as a ``mot train`` checkpoint one stored block at a time, never gathered.
The streaming safetensors writer writes ``save_file``'s file; the export holds, bit for bit,
the weights and AdamW state that gathering the checkpoint whole gives, and ``mot train`` resumes
from it bit for bit. (Under 2 Ray workers and torchrun: test_launch.py, test_process_group.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.training import checkpoint as ckpt
from mot_core.training.checkpoint import StreamedSafetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "stack.w13": torch.randn(3, 10, 4, generator=g),  # a tower stack, sharded along its second axis
        "embed": torch.randn(9, 5, generator=g),
        "head": torch.randn(7, 6, generator=g).to(torch.bfloat16),
        "gain": torch.randn(8, generator=g, dtype=torch.float64),
        "count": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "half": torch.randn(3, generator=g).half(),
        "step": torch.tensor(4.0),  # 0-dim
        "empty": torch.zeros(0, 4),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> dict:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_streamed_file_is_save_files_file_byte_for_byte(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    with StreamedSafetensors(tmp_path / "streamed.safetensors", _specs(tensors)) as writer:
        for name in writer.names:
            writer.write(name, tensors[name])
        digest = writer.close()
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert digest == _sha256(tmp_path / "streamed.safetensors")


def test_blocks_written_in_any_order_read_back_bit_for_bit(tmp_path):
    """Blocks as FSDP2 stores them (along the first axis, or a tower stack's second), along the
    last axis, and whole tensors, written out of the file's order: the file reads back exactly
    and the digest computed while writing is the file's."""
    tensors = _tensors()
    path = tmp_path / "blocks.safetensors"
    with StreamedSafetensors(path, _specs(tensors)) as writer:
        w13 = tensors["stack.w13"]
        for start, size in ((8, 2), (4, 4), (0, 4)):  # the second axis, last block first
            writer.write("stack.w13", w13[:, start:start + size], (0, start, 0))
        embed = tensors["embed"]
        for start, size in ((3, 2), (0, 3)):  # the last axis
            writer.write("embed", embed[:, start:start + size], (0, start))
        for name in reversed(writer.names):
            if name not in ("stack.w13", "embed"):
                head = tensors[name]
                if name == "head":  # the first axis, in two blocks
                    writer.write(name, head[4:], (4, 0))
                    writer.write(name, head[:4], (0, 0))
                else:
                    writer.write(name, head)
        digest = writer.close()
    read = load_file(str(path))
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    assert digest == _sha256(path)


def test_a_tensor_left_unwritten_or_a_block_that_does_not_fit_is_one_line(tmp_path):
    tensors = _tensors()
    with StreamedSafetensors(tmp_path / "short.safetensors", _specs(tensors)) as writer:
        with pytest.raises(MotError, match=r"a block \[3, 4\] at \[0, 3\] \(torch.float32\) does not fit embed"):
            writer.write("embed", torch.zeros(3, 4), (0, 3))
        for name in writer.names:
            if name != "gain":
                writer.write(name, tensors[name])
        with pytest.raises(MotError) as raised:
            writer.close()
    assert str(raised.value) == ("short.safetensors: gain was not written whole; the checkpoint it was read from is "
                                 "incomplete")


# --------------------------------------------------------------------------------------------
# The export of a distributed checkpoint
# --------------------------------------------------------------------------------------------


def _trained(args, seed: int):
    """A tiny MoT and its AdamW (the training loop's two groups, fused) after two updates."""
    from mot_core.model.transformer import MoTTransformer

    torch.manual_seed(seed)
    model = MoTTransformer(args)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), fused=True)
    for _ in range(2):
        _update(model, optimizer, seed)
    return model, optimizer


def _update(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def assert_export_holds_the_gathered_state(export: Path, gathered_model: dict, gathered_optimizer: dict) -> None:
    """The export's weights, moments, step counts and param groups equal, bit for bit, the
    gathered ones (``get_model_state_dict``/``get_optimizer_state_dict`` with full_state_dict,
    or the distributed checkpoint read whole); its checksums match its files."""
    assert ckpt.damage(export) is None
    weights = load_file(str(export / "model.safetensors"))
    assert weights.keys() == gathered_model.keys()
    for name, tensor in gathered_model.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    optimizer = ckpt.load_trainer_state(export)["optimizer_by_name"]
    assert optimizer["param_groups"] == gathered_optimizer["param_groups"]
    assert optimizer["state"].keys() == gathered_optimizer["state"].keys() and optimizer["state"]
    for name, state in gathered_optimizer["state"].items():
        assert optimizer["state"][name].keys() == state.keys(), name
        for key, value in state.items():
            assert optimizer["state"][name][key].dtype == value.dtype, (name, key)
            assert torch.equal(optimizer["state"][name][key], value), (name, key)


def assert_export_is_the_distributed_checkpoint(export: Path, sharded: Path, scratch: Path) -> None:
    """The export against the distributed checkpoint it was written from, read whole by torch
    (``dcp_to_torch_save`` assembles every tensor from its workers' blocks in one process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = scratch / f"gathered_{sharded.name}.pt"
    dcp_to_torch_save(str(sharded), str(whole))
    gathered = torch.load(whole, weights_only=False)
    whole.unlink()
    assert_export_holds_the_gathered_state(export, gathered["model"], gathered["optim"])


# write_sharded without a process group: one process, as the tests mean it
_ALONE = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@_ALONE
def test_the_export_holds_the_gathered_state_and_resumes_bit_for_bit(tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from mot_core.model.transformer import ModelArgs, MoTTransformer
    from mot_core.training.runtime import LocalCheckpoints, SingleProcess
    from mot_core.training.sharded_checkpoints import export_final, write_sharded

    args = ModelArgs(vocab_size=48, num_modalities=2, dim=16, n_layers=2, n_heads=2, max_seq_len=32)
    model, optimizer = _trained(args, seed=1)
    trainer = {"scheduler": {"last_epoch": 2}, "data": {"lanes": {}}, "skipped_updates": 0}
    sharded = tmp_path / "distributed" / "checkpoint_0000002"
    sharded.mkdir(parents=True)
    write_sharded(sharded, 2, model, optimizer, trainer, "run: {}\n", args, SingleProcess(), shared=False)
    export = export_final(sharded, tmp_path / "run", keep=2)
    assert export == ckpt.checkpoint_dir(tmp_path / "run", 2)
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "meta.json", "model.safetensors",
                                                        "optimizer.safetensors", "trainer.pt"]
    # today's gather: the calls the workers made before the export streamed
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = get_optimizer_state_dict(model, optimizer, options=options)
    assert_export_holds_the_gathered_state(export, get_model_state_dict(model, options=options), gathered)
    assert_export_is_the_distributed_checkpoint(export, sharded, tmp_path)
    moments = load_file(str(export / ckpt.OPTIMIZER_FILE))
    assert set(moments) == {f"{name}.{m}" for name in gathered["state"] for m in ("exp_avg", "exp_avg_sq")}

    # mot train resumes it: the next update is the uninterrupted run's, bit for bit
    resumed_model = MoTTransformer(args)
    resumed = torch.optim.AdamW([{"params": [p for n, p in resumed_model.named_parameters() if p.ndim >= 2
                                             and "norm" not in n], "weight_decay": 0.1},
                                 {"params": [p for n, p in resumed_model.named_parameters() if not (
                                     p.ndim >= 2 and "norm" not in n)], "weight_decay": 0.0}], lr=1e-2, fused=True)
    meta, state = LocalCheckpoints(tmp_path / "run").load(export, resumed_model, resumed, args, SingleProcess())
    assert meta["step"] == 2 and state["scheduler"] == {"last_epoch": 2} and "optimizer_tensors" not in state
    _update(model, optimizer, seed=5)
    _update(resumed_model, resumed, seed=5)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name

    # an export written before optimizer.safetensors (the moments in trainer.pt) still loads
    old = ckpt.save_checkpoint(tmp_path / "old", 2, model, {**trainer, "optimizer_by_name": get_optimizer_state_dict(
        model, optimizer, options=options), "rng": torch.get_rng_state()}, "run: {}\n", args, keep=1)
    assert ckpt.load_trainer_state(old)["optimizer_by_name"]["state"].keys() == gathered["state"].keys()

    # optimizer.safetensors is checksummed like the other files
    data = bytearray((export / ckpt.OPTIMIZER_FILE).read_bytes())
    data[-1] ^= 1
    (export / ckpt.OPTIMIZER_FILE).write_bytes(bytes(data))
    assert ckpt.damage(export) == "optimizer.safetensors does not match its checksum"
    (export / ckpt.OPTIMIZER_FILE).unlink()
    assert ckpt.damage(export) == "optimizer.safetensors missing"


@_ALONE
def test_an_export_of_weights_with_nan_is_refused_and_leaves_nothing(tmp_path):
    from mot_core.model.transformer import ModelArgs
    from mot_core.training.runtime import SingleProcess
    from mot_core.training.sharded_checkpoints import export_final, write_sharded

    args = ModelArgs(vocab_size=16, num_modalities=1, dim=8, n_layers=1, n_heads=2, max_seq_len=8)
    model, optimizer = _trained(args, seed=2)
    with torch.no_grad():
        model.layers[0].wqkv.weight[0, 0, 0] = float("nan")
    sharded = tmp_path / "checkpoint_0000002"
    sharded.mkdir()
    write_sharded(sharded, 2, model, optimizer, {}, "run: {}\n", args, SingleProcess(), shared=False)
    with pytest.raises(MotError) as raised:
        export_final(sharded, tmp_path / "run", keep=1)
    assert str(raised.value) == ("not saving step 2: weights hold NaN or inf (layers.0.wqkv.weight); the last "
                                 "checkpoint is kept")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
