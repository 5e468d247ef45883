"""Run configuration: one YAML file, merged with command-line overrides, validated.

    OmegaConf.merge(yaml, cli dotlist)  ->  resolve interpolations  ->  pydantic (extra=forbid)
    -> each plugin validates its own ``options`` section with its own model.

Every validation problem becomes one ``MotError`` line naming the key, e.g.
``config error: train.steps: Input should be a valid integer (got 'abc')``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from mot_core.errors import MotError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(Section):
    dir: str = "runs/default"
    seed: int = Field(0, ge=0, lt=2**32, description="seeds Python, NumPy (which takes < 2**32) and torch")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest checkpoint in run.dir if there is one"
    )


class UntieSection(Section):
    """Which components get one tower per modality (paper Fig. 14 ablation). All False is the
    dense baseline; all True is full MoT."""

    ffn: bool = True
    attention: bool = True
    norm: bool = True


class FFNSection(Section):
    """A tower's feed-forward: SwiGLU, or a mixture of SwiGLU experts (``type: moe``)."""

    type: Literal["swiglu", "moe"] = "swiglu"
    experts: PositiveInt = Field(4, description="moe: number of experts (each the size of the SwiGLU FFN)")
    router: Literal["expert_choice", "top_k"] = Field(
        "expert_choice", description="moe: expert_choice (the paper's MoE baseline; not causal) or top_k token choice"
    )
    top_k: PositiveInt = Field(1, description="moe, top_k router: experts per token")
    capacity_factor: PositiveFloat = Field(1.0, description="moe, expert_choice: average experts per token")
    balance: Literal["aux_loss", "bias"] = Field(
        "aux_loss", description="moe, top_k: load-balancing auxiliary loss (Switch) or selection bias (DeepSeek-V3)"
    )
    aux_loss_weight: float = Field(0.01, ge=0)
    z_loss_weight: float = Field(0.001, ge=0, description="router z-loss (ST-MoE)")
    bias_rate: float = Field(0.001, ge=0, description="balance: bias, the step of the selection-bias update")
    inference_router: Literal["top_k", "expert_choice"] = Field(
        "top_k",
        description="moe with expert_choice, at evaluation and generation: top_k with the same router (causal) or "
        "expert_choice (as trained; each token's route then depends on later tokens; never used when decoding)",
    )
    inference_top_k: PositiveInt = Field(1, description="moe: experts per token when inference_router is top_k")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "FFNSection":
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.inference_top_k > self.experts:
            raise ValueError(f"inference_top_k={self.inference_top_k} exceeds experts={self.experts}")
        return self


class RopeScalingSection(Section):
    """RoPE frequency scaling of long-context checkpoints (read from an HF config.json)."""

    type: Literal["linear", "llama3"]
    factor: PositiveFloat
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    original_max_position_embeddings: PositiveInt = 8192


class InitFromSection(Section):
    """A pretrained checkpoint the run starts from (its first start only)."""

    format: Literal["hf"] = Field("hf", description="hf: a local Hugging Face Llama-family folder (config.json + "
                                  "safetensors); nothing is downloaded")
    path: str = Field(description="the checkpoint folder")
    modality: str = Field("text", description="the modality whose tower and vocabulary rows it fills")


class ModelSection(Section):
    dim: PositiveInt = 256
    n_layers: PositiveInt = 4
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt | None = None
    ffn_hidden: PositiveInt | None = None
    max_seq_len: PositiveInt = 2048
    rope_theta: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02
    tie_embeddings: bool = False
    attention_backend: Literal["sdpa", "flex", "xformers"] = "sdpa"
    activation_checkpointing: bool = False
    norm_placement: Literal["pre", "post"] = Field(
        "pre",
        description="pre: x + f(norm(x)) (Llama, Transfusion); post: x + norm(f(x)), no input norm "
        "(the MoT paper's Algorithm 1 and its Chameleon setting)",
    )
    untie: UntieSection = UntieSection()
    ffn: FFNSection = Field(FFNSection(), description="the FFN of every tower that declares none (tower.ffn)")
    warm_start: str | None = Field(None, description="dense checkpoint dir copied into every tower")
    init_from: InitFromSection | None = Field(
        None, description="a pretrained LM loaded into one modality's tower (shapes come from its config.json); "
        "other towers start as a copy of it or from scratch (tower.init)",
    )
    rope_scaling: RopeScalingSection | None = None


class TrainSection(Section):
    class Tracker(Section):
        """Where the experiment trackers of ``train.loggers`` put the run (all optional)."""

        project: str = Field("mot", min_length=1, description="W&B project and MLflow experiment name")
        name: str | None = Field(None, description="the run's name in W&B and MLflow; default: the run folder's name")
        mlflow_tracking_uri: str | None = Field(
            None, description="MLflow tracking URI (a folder, file://, sqlite:// or http(s)://); default: a file store "
            "in <run.dir>/mlruns",
        )
        wandb_mode: Literal["offline", "online"] = Field(
            "offline", description="offline: the W&B run is written under wandb_dir only (`wandb sync` uploads it "
            "later); online: streamed to W&B as it runs (needs `wandb login`)",
        )
        wandb_dir: str | None = Field(None, description="the folder W&B writes its wandb/ folder in; default: <run.dir>")

    steps: PositiveInt = 200
    batch_size: PositiveInt = 8
    seq_len: PositiveInt = 256
    lr: PositiveFloat = 3e-3
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on a CPU with native bf16 matmul (AMX or AVX-512 BF16, "
        "detected from /proc/cpuinfo; MOT_CPU_BF16=1/0 overrides), fp32 elsewhere; weights and optimizer stay fp32")
    log_every: PositiveInt = 10
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        ["jsonl"], description="where every metrics record goes: jsonl is <run.dir>/metrics.jsonl, always written "
        "whatever this list says (the framework reads it back: resume, mot compare); tensorboard (<run.dir>/tensorboard), "
        "wandb and mlflow each need their extra: pip install 'mot-framework[NAME]'",
    )
    tracker: Tracker = Field(default_factory=Tracker, description="project, run name and stores of the trackers")
    eval_every: int = Field(100, ge=0, description="0: evaluate only at the end")
    eval_batches: PositiveInt = 8
    eval_sampling: Literal["mixed", "per_source"] = Field(
        "per_source", description="how validation rows are drawn: per_source (the default) shares the eval_batches x "
        "batch_size rows equally between the sources, each spread over its own held-out data, so every modality is "
        "scored on a fixed sample whatever the other sources' sizes; mixed reads all sources as one stream (each "
        "scored in proportion to its held-out size, so a small source next to a large one gets few rows)")
    eval_at_start: bool = Field(
        False, description="validate before the first step too (a step-0 record in metrics.jsonl): where a "
        "pretrained or warm-started model begins",
    )
    checkpoint_every: int = Field(100, ge=0, description="0: checkpoint only at the end")
    keep_checkpoints: PositiveInt = 2
    progress: bool = True
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient: stop the run (nothing non-finite is saved) or skip that update"
    )
    max_consecutive_skips: int = Field(
        5, ge=0, description="on_nonfinite=skip: more updates skipped in a row stop the run (exit 2, naming the last "
        "good checkpoint)",
    )
    max_total_skips: int = Field(20, ge=0, description="on_nonfinite=skip: more skipped updates in all stop the run")


class LaunchSection(Section):
    """``mot launch``: data-parallel training on a Ray cluster (ignored by ``mot train``)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "fsdp2", description="ddp: a full replica per worker; fsdp2: parameters, gradients and optimizer state "
        "sharded over workers (fully_shard per block)",
    )
    num_workers: PositiveInt = Field(2, description="data-parallel workers (--num-workers overrides)")
    gpus_per_worker: float = Field(0, ge=0, description="0: CPU workers (gloo); >0: GPU workers (NCCL)")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps checkpoints: a shared folder or an object-store URI "
        "(s3://, gs://); default <run.dir>/ray",
    )
    max_failures: int = Field(3, ge=-1, description="restarts of the worker group from the last checkpoint; -1: no limit")
    reshard_after_forward: bool = Field(
        True, description="fsdp2: free each block's gathered weights after its forward (less memory, one more "
        "all-gather in the backward)",
    )


class SweepSection(Section):
    """``mot sweep``: trials of ``mot train`` on Ray Tune (ignored by ``mot train``). Each
    trial is one combination of the grid's values and one of the variants."""

    grid: dict[str, list[Any]] = Field(
        {}, description="dotted config key -> the values to try (every combination is a trial)")
    variants: dict[str, dict[str, Any]] = Field(
        {}, description="name -> dotted config key -> value: named sets of settings tried like one more grid axis "
        "(e.g. the tower grid: dense, MoE-4x, MoT)",
    )
    samples: PositiveInt = Field(1, description="repeats of every combination (seed = run.seed + repeat)")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="asha: stop weak trials early on `metric`")
    metric: str | None = Field(None, description="the metric that ranks trials (and asha stops on); default: the "
                               "first modality's val/<modality>/loss")
    mode: Literal["min", "max"] = "min"
    grace_steps: PositiveInt = Field(50, description="asha: steps every trial runs before it may be stopped")
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: float = Field(0, ge=0)
    max_concurrent: int = Field(0, ge=0, description="trials at once; 0: as many as the resources allow")


class DataSection(Section):
    """Tokenized shards: ``mot data tokenize`` (or the first ``mot train`` / ``mot launch``)
    encodes every source once into memory-mapped Arrow shards that training streams."""

    dir: str | None = Field(
        None, description="where the shards go: a folder or an object-store URI (s3://, gs://); default "
        "<run.dir>/tokens",
    )
    shard_tokens: PositiveInt = Field(1 << 24, description="tokens per shard file (2^24 int32 ids: 64 MiB)")
    fit_sample_documents: PositiveInt = Field(
        20_000, description="documents of each source's training split that fitted tokenizers read (the first "
        "ones of each part): fitting is bounded whatever the corpus size",
    )
    encode_batch_documents: PositiveInt = Field(256, description="documents encoded per call of encode_batch")


class TowerSection(Section):
    """Per-modality tower settings (plugins may recommend defaults via mot_tower_defaults)."""

    ffn: FFNSection | None = Field(None, description="this tower's FFN; default: model.ffn")
    group: str | None = Field(
        None,
        description="share the tower of the modality named here (its weights, for every untied component); "
        "default: a tower of its own. Dense = every modality in one group, MoT = one group each",
    )
    qk_norm: bool = False
    init: Literal["copy", "scratch"] = Field(
        "copy", description="with model.init_from or model.warm_start: start this tower as a copy of the pretrained "
        "tower (the paper's and Bagel's warm start) or from the model's own random init",
    )
    trainable: bool = Field(True, description="false: this tower (every untied component) does not train (LMFusion)")
    vocab_rows_trainable: bool = Field(
        True, description="false: this modality's rows of the shared embedding and LM head do not train",
    )


class ModalityEntry(Section):
    loss: str | None = None
    loss_options: dict[str, Any] = {}
    loss_weight: float = Field(1.0, ge=0)
    tower: TowerSection = TowerSection()
    evaluators: list[str] | None = None
    evaluator_options: dict[str, dict[str, Any]] = Field(
        {}, description="evaluator name -> its options (validated by the evaluator's own model)"
    )
    options: dict[str, Any] = {}


class DatasetEntry(Section):
    weight: PositiveFloat = 1.0
    options: dict[str, Any] = {}


class MixtureSection(Section):
    modalities: dict[str, ModalityEntry] = Field(min_length=1)
    datasets: dict[str, DatasetEntry] = Field(min_length=1)
    weight_unit: Literal["tokens", "documents"] = Field(
        "tokens",
        description="what datasets.<name>.weight is a share of: tokens (the convention of data mixtures; a source "
        "is drawn in proportion to weight / its mean document length) or documents drawn",
    )


class RunConfig(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    launch: LaunchSection = LaunchSection()
    data: DataSection = DataSection()
    sweep: SweepSection = SweepSection()
    mixture: MixtureSection

    @model_validator(mode="after")
    def _resolve_towers(self) -> "RunConfig":
        """Fill each tower's effective FFN and group (so the saved config shows them) and
        check the groups: a group names a declared modality that leads its own group, and
        modalities of one group declare the same FFN."""
        modalities = self.mixture.modalities
        for name, entry in modalities.items():
            leader = entry.tower.group or name
            if leader not in modalities:
                raise ValueError(
                    f"mixture.modalities.{name}.tower.group names '{leader}', which is not a declared modality "
                    f"(declared: {', '.join(modalities)})"
                )
            if (modalities[leader].tower.group or leader) != leader:
                raise ValueError(
                    f"mixture.modalities.{name}.tower.group names '{leader}', which itself shares the tower of "
                    f"'{modalities[leader].tower.group}'; name '{modalities[leader].tower.group}' directly"
                )
            entry.tower.group = leader
            entry.tower.ffn = entry.tower.ffn or self.model.ffn
        names = list(modalities)
        for name, entry in modalities.items():
            # Towers that must be one: the group's (untied FFN), or every modality's (tied FFN).
            other = entry.tower.group if self.model.untie.ffn else names[0]
            if entry.tower.ffn != modalities[other].tower.ffn:
                why = "whose tower it shares" if self.model.untie.ffn else "with which it shares one FFN (model.untie.ffn: false)"
                raise ValueError(
                    f"mixture.modalities.{name}.tower.ffn ({entry.tower.ffn.type}) differs from the FFN of '{other}' "
                    f"({modalities[other].tower.ffn.type}), {why}"
                )
            leader = modalities[entry.tower.group]
            for key in ("trainable", "init"):
                if getattr(entry.tower, key) != getattr(leader.tower, key):
                    raise ValueError(f"mixture.modalities.{name}.tower.{key} differs from that of '{entry.tower.group}', "
                                     "whose tower it shares; set both alike")
        frozen = {n for n, e in modalities.items() if not e.tower.trainable}
        if frozen and frozen != set(names):
            for component, untied in (("ffn", self.model.untie.ffn), ("attention", self.model.untie.attention),
                                      ("norm", self.model.untie.norm)):
                if not untied:
                    raise ValueError(
                        f"mixture.modalities.{sorted(frozen)[0]}.tower.trainable is false but model.untie.{component} "
                        "is false: that component is one tower shared with modalities that train; untie it or "
                        "freeze every modality's tower"
                    )
        init_from = self.model.init_from
        if init_from is not None:
            if init_from.modality not in modalities:
                raise ValueError(f"model.init_from.modality '{init_from.modality}' is not a declared modality "
                                 f"(declared: {', '.join(names)})")
            if self.model.warm_start:
                raise ValueError("model.init_from and model.warm_start both give the starting weights; keep one")
        scratch = [n for n, e in modalities.items() if e.tower.init == "scratch"]
        if scratch and self.model.warm_start:
            raise ValueError(f"mixture.modalities.{scratch[0]}.tower.init is scratch but model.warm_start copies a "
                             "dense checkpoint into every tower; drop one of them")
        return self


def _format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"]))
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{loc}'{_suggest(exc, err)}")
        elif err["type"] == "missing":
            problems.append(f"missing required key '{loc}'")
        elif err["type"] == "value_error" and not err["loc"]:
            # a whole-model check: the run config's names its keys; a plugin's options model
            # (prefix: where its options sit) gets that path, which its message cannot know
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{prefix}: {message}" if prefix else message)
        elif err["type"] == "value_error":
            problems.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
        else:
            problems.append(f"{loc}: {err['msg']} (got {err['input']!r})")
    return "config error: " + "; ".join(problems)


def _suggest(exc: ValidationError, err: dict) -> str:
    """'did you mean' for a mistyped key, from the fields of the model that rejected it."""
    model = exc.title and _MODELS_BY_TITLE.get(exc.title)
    if model is None:
        return ""
    for part in err["loc"][:-1]:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(model.model_fields)})"


_MODELS_BY_TITLE: dict[str, type[BaseModel]] = {"RunConfig": RunConfig}


def validate_section(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    """Validate a plugin's options section; errors name the full key path."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        _MODELS_BY_TITLE.setdefault(exc.title, model)
        raise MotError(_format_validation_error(exc, where)) from None


def load_raw_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """YAML file + ``key=value`` overrides -> plain dict with interpolations resolved."""
    path = Path(path)
    if path.is_dir():
        raise MotError(f"config {path} is a folder; give a YAML file")
    if not path.is_file():
        raise MotError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MotError(f"config file {path} is not UTF-8 text (a binary file?); give a YAML file") from None
    except OSError as exc:
        raise MotError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MotError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if parsed is not None and not isinstance(parsed, dict):
        kind = "a list" if isinstance(parsed, list) else f"a single {type(parsed).__name__}"
        raise MotError(f"config file {path} must hold a mapping (key: value) at the top level, not {kind}")
    try:
        base = OmegaConf.create(text if parsed is not None else {})  # OmegaConf's YAML loader reads 1e-3 as a float
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as exc:
        raise MotError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(base, DictConfig):
        raise MotError(f"config file {path} must hold a mapping (key: value) at the top level, not a list")
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise MotError(f"override '{bad[0]}' is not of the form key=value (e.g. train.steps=100)")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise MotError(f"config error: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MotError(f"config file {path} must hold a mapping at the top level")
    return data


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise MotError(_format_validation_error(exc)) from None


def dump_config(config: RunConfig, plugin_options: dict[str, dict[str, Any]] | None = None) -> str:
    """The resolved config as YAML, with each plugin's options filled in by its own model."""
    data = config.model_dump(mode="json")
    ffns = [data["model"]["ffn"]] + [m["tower"]["ffn"] for m in data["mixture"]["modalities"].values()]
    for ffn in ffns:  # a SwiGLU tower has no MoE settings to show
        if ffn and ffn["type"] == "swiglu":
            for key in list(ffn)[1:]:
                del ffn[key]
    for where, options in (plugin_options or {}).items():
        node = data
        *parents, leaf = where.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = options
    return yaml.safe_dump(data, sort_keys=False)
