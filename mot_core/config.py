"""Run configuration: one YAML file, merged with command-line overrides, validated.

    OmegaConf.merge(yaml, cli dotlist)  ->  resolve interpolations  ->  pydantic (extra=forbid)
    -> each plugin validates its own ``options`` section with its own model.

Every validation problem becomes one ``MotError`` line naming the key, e.g.
``config error: train.steps: Input should be a valid integer (got 'abc')``.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator,
)

from mot_core import filesystems
from mot_core.errors import MotError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(Section):
    dir: str = Field("runs/default", description="the run folder: config.yaml, metrics.jsonl, checkpoints, the "
                     "tokenizers (state/) and, by default, the shards (tokens/); created if missing; or an "
                     "object-store URI (s3://bucket/runs/name): worked on in a local copy ($MOT_RUN_CACHE) "
                     "and pushed to the store after every checkpoint")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds Python, NumPy (which takes < 2**32) and torch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when there is a GPU, else the CPU")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest checkpoint in run.dir if there is one"
    )

    @field_validator("dir")
    @classmethod
    def _no_secret(cls, value: str) -> str:
        problem = filesystems.uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class UntieSection(Section):
    """Which components get one tower per modality (paper Fig. 14 ablation). All False is the
    dense baseline; all True is full MoT."""

    ffn: bool = Field(True, description="one FFN per tower (per modality, or per tower group)")
    attention: bool = Field(True, description="one W_Q/W_K/W_V/W_O (and QK-norm) per tower; attention itself stays "
                            "global over the whole sequence")
    norm: bool = Field(True, description="one RMSNorm per tower for each sublayer and the final norm")


class FFNSection(Section):
    """A tower's feed-forward: SwiGLU, or a mixture of SwiGLU experts (``type: moe``)."""

    type: Literal["swiglu", "moe"] = Field("swiglu", description="swiglu: one SwiGLU FFN; moe: a mixture of SwiGLU experts")
    experts: PositiveInt = Field(4, description="moe: number of experts (each the size of the SwiGLU FFN)")
    router: Literal["expert_choice", "top_k"] = Field(
        "expert_choice", description="moe: expert_choice (the paper's MoE baseline; not causal) or top_k token choice"
    )
    top_k: PositiveInt = Field(1, description="moe, top_k router: experts per token")
    capacity_factor: PositiveFloat = Field(1.0, description="moe, expert_choice: average experts per token")
    balance: Literal["aux_loss", "bias"] = Field(
        "aux_loss", description="moe, top_k: load-balancing auxiliary loss (Switch) or selection bias (DeepSeek-V3)"
    )
    aux_loss_weight: float = Field(0.01, ge=0, description="moe, top_k with balance aux_loss: weight of the load-balancing loss")
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

    type: Literal["linear", "llama3"] = Field(description="linear: positions divided by factor; llama3: Llama 3.1's "
                                               "frequency-dependent scaling")
    factor: PositiveFloat = Field(description="how much longer the context is than the one trained")
    low_freq_factor: PositiveFloat = Field(1.0, description="llama3: wavelengths above original / low_freq_factor are "
                                           "scaled by factor")
    high_freq_factor: PositiveFloat = Field(4.0, description="llama3: wavelengths below original / high_freq_factor are "
                                            "kept")
    original_max_position_embeddings: PositiveInt = Field(8192, description="llama3: the context length trained before "
                                                          "scaling")


class InitFromSection(Section):
    """A pretrained checkpoint the run starts from (its first start only)."""

    format: Literal["hf"] = Field("hf", description="hf: a local Hugging Face Llama-family folder (config.json + "
                                  "safetensors); nothing is downloaded")
    path: str = Field(description="the checkpoint folder")
    modality: str = Field("text", description="the modality whose tower and vocabulary rows it fills")


class ModelSection(Section):
    dim: PositiveInt = Field(256, description="the width of the residual stream")
    n_layers: PositiveInt = Field(4, description="MoT blocks")
    n_heads: PositiveInt = Field(4, description="attention heads (dim / n_heads: the head size, even for RoPE)")
    n_kv_heads: PositiveInt | None = Field(None, description="key/value heads for grouped-query attention; default: "
                                           "n_heads")
    ffn_hidden: PositiveInt | None = Field(None, description="the SwiGLU's hidden width; default: 8/3 dim rounded up "
                                           "to a multiple of 64")
    max_seq_len: PositiveInt = Field(2048, description="the longest sequence the RoPE tables cover (train.seq_len, "
                                     "and prompt plus generation)")
    rope_theta: PositiveFloat = Field(10000.0, description="RoPE base frequency")
    norm_eps: PositiveFloat = Field(1e-5, description="RMSNorm epsilon")
    init_std: PositiveFloat = Field(0.02, description="standard deviation of the initial weights")
    tie_embeddings: bool = Field(False, description="the LM head shares the embedding table's weights")
    attention_backend: Literal["sdpa", "flex", "xformers"] = Field(
        "sdpa", description="sdpa: torch's scaled_dot_product_attention with a dense mask; flex: flex_attention with "
        "a block mask (compiled on CUDA; no backward on CPU); xformers: CUDA only, chosen after a capability check")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the backward "
                                           "pass (less memory, about a third more compute)")
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

    steps: PositiveInt = Field(200, description="optimizer steps of the whole run (may grow on resume)")
    batch_size: PositiveInt = Field(8, description="rows of the GLOBAL batch, whatever the number of workers (split "
                                    "evenly over them)")
    seq_len: PositiveInt = Field(256, description="positions per row; documents are packed into rows")
    lr: PositiveFloat = Field(3e-3, description="AdamW's peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine schedule ends at lr x min_lr_ratio")
    warmup_steps: int = Field(20, ge=0, description="linear warmup from lr / warmup_steps to lr")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay of matrices (not of norms or biases)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA; on a CPU with native bf16 matmul (AMX or AVX-512 BF16) "
        "what the run's own whole training step, timed in both at start (cached per machine and shape), favours; "
        "fp32 elsewhere (MOT_CPU_BF16=1/0 overrides); weights, optimizer and norms stay fp32")
    log_every: PositiveInt = Field(10, description="steps between printed lines, router statistics and token "
                                   "shares (metrics.jsonl gets every step)")
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        ["jsonl"], description="where every metrics record goes: jsonl is <run.dir>/metrics.jsonl, always written "
        "whatever this list says (the framework reads it back: resume, mot compare); tensorboard (<run.dir>/tensorboard), "
        "wandb and mlflow each need their extra: pip install 'mot-framework[NAME]'",
    )
    tracker: Tracker = Field(default_factory=Tracker, description="project, run name and stores of the trackers")
    eval_every: int = Field(100, ge=0, description="0: evaluate only at the end")
    eval_batches: PositiveInt = Field(8, description="validation batches of batch_size rows (mot eval --full scores "
                                      "every held-out position)")
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
    keep_checkpoints: PositiveInt = Field(2, description="the newest checkpoints kept; older ones are deleted")
    progress: bool = Field(True, description="a progress bar on a terminal (plain lines elsewhere)")
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

    @field_validator("storage_path")
    @classmethod
    def _no_secret(cls, value: str | None) -> str | None:
        problem = value is not None and filesystems.uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value


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
    mode: Literal["min", "max"] = Field("min", description="whether a lower or a higher metric is better")
    grace_steps: PositiveInt = Field(50, description="asha: steps every trial runs before it may be stopped")
    cpus_per_trial: PositiveFloat = Field(1.0, description="CPUs Ray Tune reserves for each trial (and its torch "
                                          "threads)")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs Ray Tune reserves for each trial")
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
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="a record a source cannot read (a truncated tar, an undecodable image, a missing "
        "caption, a wrong column type, an empty document): error stops with one line naming it; skip leaves it out "
        "and `mot data tokenize` reports how many it skipped per source and why (also in each split's index.json)")

    @field_validator("dir")
    @classmethod
    def _no_secret(cls, value: str | None) -> str | None:
        problem = value is not None and filesystems.uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class StorageSection(Section):
    """Object storage: how ``s3://`` URIs (``data.dir``, ``launch.storage_path``) reach their
    server. No credentials here, ever: the AWS SDK reads them from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_PROFILE and the AWS credentials file, so a
    run's saved config.yaml holds no secret."""

    endpoint: str | None = Field(
        None, description="the S3 endpoint of every s3:// URI that names none in its query "
        "(?endpoint_override=...), e.g. http://127.0.0.1:8333 for a local SeaweedFS or MinIO; default: "
        "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS. Credentials only from the AWS variables or files",
    )
    region: str | None = Field(None, description="the S3 region; default: AWS_REGION / AWS_DEFAULT_REGION, else the "
                               "bucket's own on AWS (us-east-1 at another endpoint)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        problem = value is not None and filesystems.endpoint_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class TowerSection(Section):
    """Per-modality tower settings (plugins may recommend defaults via mot_tower_defaults)."""

    ffn: FFNSection | None = Field(None, description="this tower's FFN; default: model.ffn")
    group: str | None = Field(
        None,
        description="share the tower of the modality named here (its weights, for every untied component); "
        "default: a tower of its own. Dense = every modality in one group, MoT = one group each",
    )
    qk_norm: bool = Field(False, description="RMSNorm over each head's queries and keys (Chameleon's stabiliser)")
    init: Literal["copy", "scratch"] = Field(
        "copy", description="with model.init_from or model.warm_start: start this tower as a copy of the pretrained "
        "tower (the paper's and Bagel's warm start) or from the model's own random init",
    )
    trainable: bool = Field(True, description="false: this tower (every untied component) does not train (LMFusion)")
    vocab_rows_trainable: bool = Field(
        True, description="false: this modality's rows of the shared embedding and LM head do not train",
    )


class ModalityEntry(Section):
    loss: str | None = Field(None, description="the loss's registered name; default: the modality's default_loss")
    loss_options: dict[str, Any] = Field({}, description="the loss's options (validated by its own model)")
    loss_weight: float = Field(1.0, ge=0, description="w_m in the objective sum_m w_m * loss_m (Transfusion's lambda)")
    tower: TowerSection = TowerSection()
    evaluators: list[str] | None = Field(None, description="registered evaluator names; default: the modality's "
                                         "default_evaluators")
    evaluator_options: dict[str, dict[str, Any]] = Field(
        {}, description="evaluator name -> its options (validated by the evaluator's own model)"
    )
    options: dict[str, Any] = Field({}, description="the modality's options (validated by its plugin's own model; "
                                    "`mot config show` prints them resolved)")


class DatasetEntry(Section):
    weight: PositiveFloat = Field(1.0, description="the source's share of the training tokens (or documents: "
                                  "mixture.weight_unit), normalised over the sources")
    options: dict[str, Any] = Field({}, description="the data source's options (validated by its plugin's own model)")


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
    storage: StorageSection = StorageSection()
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
    return _merged(base, overrides, f"config file {path}")


def merge_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dict + ``key=value`` overrides -> plain dict with interpolations resolved."""
    try:
        base = OmegaConf.create(data)
    except (OmegaConfBaseException, ValueError) as exc:
        raise MotError(f"config error: {str(exc).splitlines()[0]}") from None
    return _merged(base, overrides, "the config")


def _merged(base: DictConfig, overrides, what: str) -> dict[str, Any]:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise MotError(f"override '{bad[0]}' is not of the form key=value (e.g. train.steps=100)")
    try:
        dotlist = OmegaConf.create({})
        for override in overrides:
            key, _, text = override.partition("=")
            OmegaConf.update(dotlist, key, override_value(key, text))
        merged = OmegaConf.merge(base, dotlist)
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise MotError(f"config error: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MotError(f"{what} must hold a mapping at the top level")
    return data


# Override values: `key=value` after a config path. OmegaConf's dotlist reads every value as YAML,
# where `*x` is an alias, `&x` an anchor, `!x` a tag and `[a-c]` inside a flow list a syntax error:
# a glob ended in a YAML traceback, and `&x` silently became null. Here a value is read as the
# type its key has in the schema: a string key takes the text as it is, a list-of-strings key a
# `[a, b]` list of texts, a number or a bool the YAML reading or a one-line error; elsewhere (a
# plugin's options, a section) the YAML reading, or the text where YAML would read it specially.

class _Unreadable(Exception):
    """The text is not plain YAML: YAML cannot read it, or reads an alias, anchor or tag in it."""


def _yaml_value(text: str) -> Any:
    """``text`` as OmegaConf reads a dotlist value; ``_Unreadable`` where YAML reads it specially."""
    from omegaconf.basecontainer import get_yaml_loader

    try:
        if any(isinstance(t, (yaml.AliasToken, yaml.AnchorToken)) for t in yaml.scan(text)):
            raise _Unreadable
        return yaml.load(text, Loader=get_yaml_loader())
    except yaml.YAMLError:
        raise _Unreadable from None


def _list_items(text: str) -> list[str] | None:
    """The items of a ``[a, b]`` list as texts (split at commas outside brackets and quotes, each
    item unquoted); None if ``text`` is not one."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(inner):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and not inner[start:i].strip():  # a quoted item (not an apostrophe in one)
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    items = [item.strip() for item in items]
    if items == [""]:
        return []
    unquoted = []
    for item in items:
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            try:
                item = str(_yaml_value(item))
            except _Unreadable:
                pass
        unquoted.append(item)
    return unquoted


def _plain_value(text: str) -> Any:
    """A value YAML would read specially, read without YAML's special meanings: a ``[a, b]`` list
    of items (each read as YAML where it is plain, else its text), or else the text itself."""
    items = _list_items(text)
    if items is None:
        return text
    values = []
    for item in items:
        try:
            value = _yaml_value(item)
            values.append(item if isinstance(value, (list, dict)) else value)
        except _Unreadable:
            values.append(item)
    return values


def key_annotation(key: str) -> Any:
    """The schema's type of a dotted config key; None where the schema does not fix it (a
    plugin's options, an unknown key)."""
    annotation: Any = RunConfig
    for part in key.split("."):
        model = _section_of(annotation)
        if model is not None:
            field = model.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    return None if annotation is Any else annotation


def _section_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
        return options[0]
    return None


def _value_kind(annotation: Any) -> tuple[str, bool]:
    """('str' | 'list_str' | 'scalar' | 'other', whether null is allowed) for a schema type."""
    if annotation is None:
        return "other", True
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        optional = len(options) < len(args)
        if len(options) != 1:
            return "other", optional
        annotation, args = options[0], typing.get_args(options[0])
    if annotation is str or typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in args):
        return "str", optional
    if typing.get_origin(annotation) is list and args == (str,):
        return "list_str", optional
    if annotation in (int, float, bool):
        return "scalar", optional
    return "other", optional


def override_value(key: str, text: str) -> Any:
    """The value of the override ``key=text``, read as the type of ``key`` (see above); a one-line
    ``MotError`` naming the key, the value and the type where it cannot be one."""
    annotation = key_annotation(key)
    kind, optional = _value_kind(annotation)
    try:
        read = _yaml_value(text)
        readable = True
    except _Unreadable:
        read, readable = None, False
    if readable and read is None and optional:
        return None
    if kind == "str":
        return read if readable and isinstance(read, str) else text
    if kind == "list_str":
        items = _list_items(text)
        if items is not None:
            return items
    if kind == "scalar" and not readable:
        raise MotError(f"override {key}={text}: {key} takes a value of type {_type_name(annotation)}; '{text}' is not one")
    return read if readable else _plain_value(text)


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


def config_keys() -> list[tuple[str, str, str, str]]:
    """Every key of the run config as (dotted key, type, default, description), in the order
    of the schema; ``<name>`` stands for a modality's or a dataset's name (``mot config keys``,
    and the reference in docs/configuration.md)."""
    rows: list[tuple[str, str, str, str]] = []

    def section_of(annotation: Any) -> type[BaseModel] | None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = field.annotation
            if typing.get_origin(annotation) is dict:
                value = typing.get_args(annotation)[1]
                inner = section_of(value)
                if inner is not None:  # named entries: mixture.modalities.<name>, mixture.datasets.<name>
                    walk(inner, f"{key}.<name>.")
                    continue
            inner = section_of(annotation)
            if inner is not None and inner is not FFNSection or (inner is FFNSection and key == "model.ffn"):
                walk(inner, f"{key}.")
                continue
            rows.append((key, _type_name(annotation), _default_text(field), field.description or ""))

    walk(RunConfig, "")
    return rows


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    text = str(annotation).replace("typing.", "")
    for plain, name in ((int, "int"), (float, "float"), (bool, "bool"), (str, "str")):
        if annotation is plain:
            return name
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text).replace("mot_core.config.FFNSection", "FFN (as model.ffn)")
    return re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text).replace("NoneType", "None")


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return "(section)"
    return json.dumps(default) if not isinstance(default, str) else default


def config_keys_markdown() -> str:
    """``config_keys`` as a Markdown table (the generated part of docs/configuration.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, description in config_keys():
        cells = [f"`{key}`", kind, f"`{default}`" if default not in ("required", "(section)") else default,
                 description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
