"""Start from a pretrained language model: a local Hugging Face Llama-family folder
(``config.json`` + safetensors shards) loaded into one modality's tower and its rows of the
shared embedding and head, and a tower exported back as such a folder.

The MoT block in pre-norm placement is Llama's block: RMSNorm, SwiGLU, RoPE in the
rotate-half layout HF checkpoints use, grouped-query attention. So loading is a renaming:

    HF (layer i)                            MoT, tower g of layer i
    input_layernorm.weight                  attn_norm.weight[g]
    self_attn.{q,k,v}_proj.weight           wqkv.weight[g] = cat(q, k, v) over output rows
    self_attn.o_proj.weight                 wo.weight[g]
    post_attention_layernorm.weight         ffn_norm.weight[g]
    mlp.{gate,up}_proj.weight               ffn.w13.weight[g] = cat(gate, up)
    mlp.down_proj.weight                    ffn.w2.weight[g]
    model.norm.weight                       final_norm.weight[g]
    model.embed_tokens.weight, lm_head      rows [offset, offset + vocab) of embed, lm_head

Nothing is downloaded: ``path`` must be a folder on disk. Tensors are read one at a time from
the memory-mapped shards, so loading holds one tensor beyond the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from mot_core.config import ModelSection, RopeScalingSection, RunConfig
from mot_core.errors import MotError
from mot_core.model.frozen import read_rows, write_rows
from mot_core.model.towers import MixedTowerFFN, TowerSwiGLU, default_ffn_hidden
from mot_core.model.transformer import ModelArgs, MoTTransformer

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ROPE_KINDS = ("linear", "llama3")


@dataclass(frozen=True)
class LlamaCheckpoint:
    """A local HF Llama-family checkpoint: its shapes and where each tensor is."""

    folder: Path
    settings: dict[str, Any]  # model.<key> -> value, for the run's config
    vocab_size: int
    max_position_embeddings: int
    files: dict[str, Path]  # tensor name -> safetensors file

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each named tensor (fp32), read from its memory-mapped shard one at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, members in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in members:
                    yield name, handle.get_tensor(name).float()


def _config_json(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise MotError(f"model.init_from.path {folder} is not a folder (a local Hugging Face checkpoint; nothing is "
                       "downloaded)")
    file = folder / "config.json"
    if not file.is_file():
        raise MotError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    return json_object(file)


def json_object(file: Path, what: str = "") -> dict[str, Any]:
    """The JSON object in ``file``, or a one-line MotError (``what``: what the file is)."""
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise MotError(f"{file} is not JSON ({exc}){what}") from None
    if not isinstance(data, dict):
        raise MotError(f"{file} does not hold a JSON object")
    return data


def _rope(data: dict[str, Any], file: Path) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either layout: transformers 5 (``rope_parameters``) or 4
    (``rope_theta`` and ``rope_scaling``)."""
    params = data.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    scaling = data.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_KINDS:
        raise MotError(f"{file}: RoPE scaling '{kind}' is not supported (supported: {', '.join(ROPE_KINDS)})")
    section = {"type": kind, "factor": float(scaling["factor"])}
    if kind == "llama3":
        section.update(low_freq_factor=float(scaling["low_freq_factor"]),
                       high_freq_factor=float(scaling["high_freq_factor"]),
                       original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    return theta, section


# The model settings a checkpoint's config.json determines (``LlamaCheckpoint.settings``).
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "norm_eps", "rope_theta", "rope_scaling",
              "tie_embeddings", "norm_placement")

_READ: dict[tuple, LlamaCheckpoint] = {}


def read_checkpoint(folder: str | Path) -> LlamaCheckpoint:
    """Read and check ``config.json`` and the shard index; one-line errors for anything this
    model cannot reproduce exactly. Read once per process while the files are unchanged (the
    front door reads the shapes, the start reads the tensors' places)."""
    folder = Path(folder)
    key = _files_signature(folder)
    if key not in _READ:
        _READ[key] = _read_checkpoint(folder)
    return _READ[key]


def _files_signature(folder: Path) -> tuple:
    """The folder and the size and time of the files ``_read_checkpoint`` reads."""
    signature: list = [str(folder.resolve())]
    for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):
        try:
            stat = (folder / name).stat()
            signature.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            signature.append((name, None))
    return tuple(signature)


def _read_checkpoint(folder: Path) -> LlamaCheckpoint:
    data = _config_json(folder)
    file = folder / "config.json"
    arch = (data.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise MotError(f"{file}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)}: "
                       "Llama 2/3, SmolLM, TinyLlama, Mistral without sliding window)")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    absent = [k for k in required if k not in data]
    if absent:
        raise MotError(f"{file} lacks {absent[0]}")
    for key, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                        ("sliding_window", None)):
        if data.get(key, wanted) != wanted:
            raise MotError(f"{file}: {key}={data[key]!r} is not supported (this model needs {wanted!r})")
    dim, heads = int(data["hidden_size"]), int(data["num_attention_heads"])
    head_dim = data.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise MotError(f"{file}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={dim}; "
                       "this model needs head_dim = hidden_size / num_attention_heads")
    theta, scaling = _rope(data, file)
    settings = {
        "dim": dim,
        "n_layers": int(data["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(data.get("num_key_value_heads") or heads),
        "ffn_hidden": int(data["intermediate_size"]),
        "norm_eps": float(data.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(data.get("tie_word_embeddings", False)),
        "norm_placement": "pre",
    }
    return LlamaCheckpoint(folder, settings, int(data["vocab_size"]), int(data.get("max_position_embeddings", 0)),
                           _tensor_files(folder))


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise MotError(f"{index} is damaged ({type(exc).__name__}: {exc})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise MotError(f"{index} names the shard {shard.name}, which is not in {folder}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise MotError(f"{folder} has neither model.safetensors nor model.safetensors.index.json (only safetensors "
                       "checkpoints are read)")
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise MotError(f"{single} is not a readable safetensors file ({exc})") from None


def with_pretrained_shapes(config: RunConfig, saved_yaml: str | None = None) -> RunConfig:
    """The config with the model's shape read from ``model.init_from``'s config.json (the last
    step of ``mot_core.experiment.resolve.resolve_config``). A model setting given in the run's
    config that contradicts it is a one-line error naming the key; the rest are filled in, so
    the run's config.yaml records what runs.

    ``saved_yaml``: the run's saved config when it resumes. ``init_from.path`` is read only by
    a run's first start: a resume takes the shape it recorded, wherever the pretrained folder
    is now."""
    init = config.model.init_from
    if init is None:
        return config
    if saved_yaml is not None:
        import yaml

        saved = (yaml.safe_load(saved_yaml) or {}).get("model") or {}
        settings = {key: saved.get(key) for key in SHAPE_KEYS}
        source = f"the run's saved config (the shape {init.path} had at the run's first start)"
    else:
        settings = read_checkpoint(init.path).settings
        source = f"the checkpoint {init.path}"
    given = config.model.model_fields_set
    updates: dict[str, Any] = {}
    for key, value in settings.items():
        current = getattr(config.model, key)
        current = current.model_dump() if hasattr(current, "model_dump") else current
        if key in given and current != value:
            raise MotError(f"model.{key}={current} contradicts {source} ({value}); leave model.{key} out or set "
                           f"it to {value}")
        updates[key] = RopeScalingSection(**value) if key == "rope_scaling" and value else value
    entry = config.mixture.modalities[init.modality]
    if entry.tower.qk_norm:
        raise MotError(f"mixture.modalities.{init.modality}.tower.qk_norm is true but the checkpoint {init.path} has "
                       "no QK-norm; set it to false")
    if entry.tower.ffn is not None and entry.tower.ffn.type != "swiglu":
        raise MotError(f"mixture.modalities.{init.modality}.tower.ffn is {entry.tower.ffn.type} but the checkpoint "
                       f"{init.path} has a SwiGLU FFN")
    for name, other in config.mixture.modalities.items():
        if other.tower.init == "copy" and other.tower.ffn is not None and other.tower.ffn.type != "swiglu":
            raise MotError(f"mixture.modalities.{name}.tower.init is copy but its FFN is {other.tower.ffn.type}; "
                           "a SwiGLU checkpoint cannot be copied into it: set tower.init=scratch")
    model = config.model.model_copy(update=updates)
    return config.model_copy(update={"model": model})


def check_vocabulary(checkpoint: LlamaCheckpoint, vocab_size: int, modality: str, where: str) -> None:
    if vocab_size != checkpoint.vocab_size:
        raise MotError(f"modality '{modality}' has {vocab_size:,} ids but the checkpoint {where} has vocab_size="
                       f"{checkpoint.vocab_size:,}: give the modality the checkpoint's tokenizer (for text: "
                       f"mixture.modalities.{modality}.options.tokenizer_path={where})")


def _hf_layer(i: int) -> dict[str, str]:
    base = f"model.layers.{i}."
    return {key: base + value for key, value in {
        "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
        "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}.items()}


def hf_names(args: ModelArgs | ModelSection) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [name for i in range(args.n_layers) for name in _hf_layer(i).values()]
    return names + ([] if args.tie_embeddings else ["lm_head.weight"])


def _tower_rows(args: ModelArgs, untied: bool, groups: list[int]) -> list[int]:
    """The rows of a component's stacked towers that belong to these tower groups."""
    return sorted(set(groups)) if args.towers(untied) > 1 else [0]


def _ffn_parts(model: MoTTransformer, layer: int, args: ModelArgs, groups: list[int]):
    """(module, rows) pairs holding the SwiGLU FFN of these groups in one layer."""
    ffn = model.layers[layer].ffn
    rows = _tower_rows(args, args.untie_ffn, groups)
    if isinstance(ffn, MixedTowerFFN):
        return [(ffn.towers[row], [0]) for row in rows]
    return [(ffn, rows)]


def _ignored_tensor(name: str, args: ModelArgs | ModelSection) -> bool:
    """A stored tensor that transformers itself ignores when it loads a Llama: ``lm_head.weight``
    of a tied checkpoint (``_tied_weights_keys``: the head is the embedding; some exporters store
    it anyway) and the ``rotary_emb.inv_freq`` buffers of old checkpoints (recomputed from
    ``rope_theta``; ``_adjust_missing_and_unexpected_keys``)."""
    return (name == "lm_head.weight" and bool(args.tie_embeddings)) or name.endswith("rotary_emb.inv_freq")


def _natural(name: str) -> tuple:
    """model.layers.2.x before model.layers.10.x."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def unknown_tensors(checkpoint: LlamaCheckpoint, args: ModelArgs | ModelSection) -> list[str]:
    """The checkpoint's tensors that the model does not use (and transformers would not ignore),
    in natural order: loading would drop them silently."""
    known = set(hf_names(args))
    return sorted((name for name in checkpoint.files if name not in known and not _ignored_tensor(name, args)),
                  key=_natural)


def check_tensors(checkpoint: LlamaCheckpoint, args: ModelArgs | ModelSection) -> None:
    """Every tensor the model needs is in the shards, with the shape it needs (read from the
    shards' headers: no tensor is loaded), and no other tensor is (``unknown_tensors``). ``args``: the model's, or the config's model section
    (the same shape, known before any tokenizer is prepared: a first start checks the tensors
    before it writes anything in the run folder)."""
    names = hf_names(args)
    absent = [name for name in names if name not in checkpoint.files]
    if absent:
        raise MotError(f"the checkpoint {checkpoint.folder} lacks the tensor {absent[0]} ({len(absent)} missing)")
    unknown = unknown_tensors(checkpoint, args)
    if unknown:
        raise MotError(
            f"the checkpoint {checkpoint.folder} holds the tensor {unknown[0]}, which a Llama model of its config.json "
            f"does not have ({len(unknown)} such tensor{'s' if len(unknown) > 1 else ''}): nothing would load "
            f"{'them' if len(unknown) > 1 else 'it'}, so the folder is another architecture (attention or MLP "
            "biases, as Qwen2's) or its config.json does not describe its tensors"
        )
    kv = args.n_kv_heads or args.n_heads
    head_dim = args.dim // args.n_heads
    shapes = {"model.embed_tokens.weight": (checkpoint.vocab_size, args.dim), "model.norm.weight": (args.dim,),
              "lm_head.weight": (checkpoint.vocab_size, args.dim)}
    for i in range(args.n_layers):
        hf = _hf_layer(i)
        hidden = args.ffn_hidden
        shapes.update({hf["attn_norm"]: (args.dim,), hf["ffn_norm"]: (args.dim,), hf["q"]: (args.dim, args.dim),
                       hf["k"]: (kv * head_dim, args.dim), hf["v"]: (kv * head_dim, args.dim),
                       hf["o"]: (args.dim, args.dim), hf["gate"]: (hidden, args.dim), hf["up"]: (hidden, args.dim),
                       hf["down"]: (args.dim, hidden)})
    from safetensors import safe_open

    for file in sorted(set(checkpoint.files[n] for n in names)):
        with safe_open(str(file), framework="pt") as handle:
            for name in names:
                if checkpoint.files[name] == file:
                    shape = tuple(handle.get_slice(name).get_shape())
                    if shape != shapes[name]:
                        raise MotError(f"the checkpoint's {name} has shape {shape}, the model expects {shapes[name]}")


def load_llama(model: MoTTransformer, checkpoint: LlamaCheckpoint, source_group: int, copy_groups: list[int],
               row_offset: int) -> int:
    """Write the checkpoint into the towers of ``source_group`` and ``copy_groups`` and into the
    vocabulary rows from ``row_offset``. Every tensor and shape is checked before any weight is
    written. Returns the number of parameters read."""
    args = model.args
    check_tensors(checkpoint, args)
    names = hf_names(args)
    groups = [source_group, *copy_groups]
    norm_rows = _tower_rows(args, args.untie_norm, groups)
    attn_rows = _tower_rows(args, args.untie_attention, groups)
    rows = range(row_offset, row_offset + checkpoint.vocab_size)
    pending: dict[str, torch.Tensor] = {}
    count = 0
    for name, tensor in checkpoint.tensors(names):
        count += tensor.numel()
        if name == "model.embed_tokens.weight":
            write_rows(model.embed, "weight", rows, tensor)
        elif name == "lm_head.weight":
            write_rows(model.lm_head, "weight", rows, tensor)
        elif name == "model.norm.weight":
            write_rows(model.final_norm, "weight", norm_rows, tensor[None])
        else:
            pending[name] = tensor
            layer = int(name.split(".")[2])
            hf = _hf_layer(layer)
            if not all(n in pending for n in hf.values()):
                continue
            block = model.layers[layer]
            get = pending.pop
            write_rows(block.attn_norm, "weight", norm_rows, get(hf["attn_norm"])[None])
            write_rows(block.ffn_norm, "weight", norm_rows, get(hf["ffn_norm"])[None])
            write_rows(block.wqkv, "weight", attn_rows, torch.cat([get(hf["q"]), get(hf["k"]), get(hf["v"])])[None])
            write_rows(block.wo, "weight", attn_rows, get(hf["o"])[None])
            w13 = torch.cat([get(hf["gate"]), get(hf["up"])])[None]
            down = get(hf["down"])[None]
            for ffn, ffn_rows in _ffn_parts(model, layer, args, groups):
                write_rows(ffn.w13, "weight", ffn_rows, w13)
                write_rows(ffn.w2, "weight", ffn_rows, down)
    return count


# config.json keys that follow from the written weights (an export writes them from the model).
WEIGHT_KEYS = ("hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
               "attention_bias", "mlp_bias")
# The RoPE keys of either layout: transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling).
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
# The keys naming the weights' dtype: transformers 5 (dtype) or 4 (torch_dtype).
DTYPE_KEYS = ("torch_dtype", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_llama(model: MoTTransformer, group: int, row_offset: int, vocab_size: int, max_positions: int,
                 out: Path, extra_config: dict[str, Any] | None = None, dtype: str | None = None,
                 source: dict[str, Any] | None = None) -> int:
    """Write tower ``group`` and vocabulary rows [row_offset, row_offset + vocab_size) as an HF
    ``LlamaForCausalLM`` folder (config.json + model.safetensors; ``MistralForCausalLM`` when the
    source is one: the same weights and names).

    ``extra_config``: keys written over the ones computed (the token ids). ``source``: the
    config.json of the checkpoint the tower started from (``model.init_from``): every key of it
    is kept (architecture, token ids, max_position_embeddings, the RoPE keys in its own layout,
    the dtype key's name), except those that follow from the weights (``WEIGHT_KEYS``: the
    model's, equal to the source's since a run takes its shape from it). ``dtype``: of the
    written tensors (``DTYPES``; default float32, as trained), named in config.json. Returns the
    number of parameters written."""
    from safetensors.torch import save_file

    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise MotError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    args = model.args
    if args.norm_placement != "pre":
        raise MotError("only a pre-norm model (model.norm_placement=pre) is a Llama; this one normalises after "
                       "each sublayer")
    if any(args.qk_norm):
        raise MotError("a model with QK-norm is not a Llama (tower.qk_norm)")
    norm_row = _tower_rows(args, args.untie_norm, [group])
    attn_row = _tower_rows(args, args.untie_attention, [group])
    hidden = args.ffn_hidden or default_ffn_hidden(args.dim)  # a run from scratch leaves it to the model
    rows = list(range(row_offset, row_offset + vocab_size))
    state = {"model.embed_tokens.weight": read_rows(model.embed, "weight", rows),
             "model.norm.weight": read_rows(model.final_norm, "weight", norm_row)[0]}
    if model.lm_head is not None:
        state["lm_head.weight"] = read_rows(model.lm_head, "weight", rows)
    kv = args.n_kv_heads or args.n_heads
    head_dim = args.dim // args.n_heads
    for i, block in enumerate(model.layers):
        hf = _hf_layer(i)
        ffn, ffn_rows = _ffn_parts(model, i, args, [group])[0]
        if not isinstance(ffn, TowerSwiGLU):
            raise MotError(f"tower {group}'s FFN is a mixture of experts; only a SwiGLU tower exports as a Llama")
        qkv = read_rows(block.wqkv, "weight", attn_row)[0]
        gate, up = read_rows(ffn.w13, "weight", ffn_rows)[0].split(hidden)
        state.update({
            hf["attn_norm"]: read_rows(block.attn_norm, "weight", norm_row)[0],
            hf["ffn_norm"]: read_rows(block.ffn_norm, "weight", norm_row)[0],
            hf["q"]: qkv[: args.dim], hf["k"]: qkv[args.dim: args.dim + kv * head_dim],
            hf["v"]: qkv[args.dim + kv * head_dim:], hf["o"]: read_rows(block.wo, "weight", attn_row)[0],
            hf["gate"]: gate, hf["up"]: up, hf["down"]: read_rows(ffn.w2, "weight", ffn_rows)[0],
        })
    rope: dict[str, Any] = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": hidden, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "rms_norm_eps": args.norm_eps, "vocab_size": vocab_size, "max_position_embeddings": max_positions,
        "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "rope_theta": args.rope_theta, "rope_scaling": None if args.rope_scaling is None else rope,
        "rope_parameters": rope, **(extra_config or {}),
    }
    if source is not None:
        # The source's RoPE keys alone, in its layout: the run's RoPE is the source's (its shape
        # came from it), and a loader given both layouts need not read them alike.
        computed = {k: v for k, v in config.items() if k not in ROPE_KEYS}
        config = {**computed, **source, **{k: computed[k] for k in WEIGHT_KEYS}}
    for key in [k for k in DTYPE_KEYS if k in config] or ["torch_dtype"]:  # the source's key(s), else 4's
        config[key] = dtype
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return sum(v.numel() for v in state.values())


def start_from_pretrained(model: MoTTransformer, checkpoint: LlamaCheckpoint, config: RunConfig, vocab) -> str:
    """Load ``model.init_from`` into its modality's tower and rows, and into the towers that
    start as a copy of it (``tower.init``); returns the line that says what went where."""
    init = config.model.init_from
    groups = model.args.tower_groups
    source = groups[vocab.index(init.modality)]
    modalities = config.mixture.modalities
    copied = [n for i, n in enumerate(vocab.names) if groups[i] != source and modalities[n].tower.init == "copy"]
    scratch = [n for i, n in enumerate(vocab.names) if groups[i] != source and modalities[n].tower.init == "scratch"]
    count = load_llama(model, checkpoint, source, sorted({groups[vocab.index(n)] for n in copied}),
                       vocab.offsets[init.modality])
    line = f"init from {init.path}: {count / 1e6:.1f}M parameters into the tower and vocabulary rows of '{init.modality}'"
    if copied:
        line += f"; towers copied from it: {', '.join(copied)}"
    if scratch:
        line += f"; towers from scratch: {', '.join(scratch)}"
    return line
