"""The MoT transformer: shared embeddings, MoT blocks, per-modality final norm, shared head,
and the modality-owned input adapters and output heads of continuous modalities.

Pure torch: no config system, no launcher, no plugin lookups. The engine turns a validated
config into ``ModelArgs`` and builds each plugin's modules, which it hands over as
``ModalityModules``.

Token ids are global: each discrete modality owns a contiguous range of one vocabulary, so a
position of any modality can predict a token of any other (text -> begin-of-image, ...).
Embeddings and the output head are shared; every other weight can be untied by modality.
Positions that carry continuous values are not embedded: their modality's adapter maps them
into the residual stream, on that modality's contiguous slice of the sorted batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from mot_core.model.attention import AttentionLayout, MaskCache, SDPABackend, make_backend
from mot_core.model.block import BlockArgs, ForwardContext, MoTBlock
from mot_core.errors import MotError
from mot_core.model.kv_cache import KVCache
from mot_core.model.frozen import assembled, split_rows, total_rows, write_rows
from mot_core.model.rope import RopeScaling, RotaryEmbedding
from mot_core.model.moe import MoEArgs, MoEFeedForward
from mot_core.model.routing import RoutingPlan, group_plan
from mot_core.model.towers import TowerRMSNorm, default_ffn_hidden


class ModalityModules(nn.Module):
    """The modules one modality owns: an input adapter for its continuous positions and an
    output head, either may be None. ``index``: the modality's index in the mixture; ``owner``:
    who built them (the plugin), named in errors about them."""

    def __init__(self, index: int, adapter: nn.Module | None = None, head: nn.Module | None = None,
                 owner: str = ""):
        super().__init__()
        self.index = index
        self.adapter = adapter
        self.head = head
        self.owner = owner


@dataclass(frozen=True)
class ContinuousInputs:
    """One modality's continuous positions in a batch, in its slice order.

    Attributes:
        values: (V, input_dim) inputs of the modality's V continuous positions.
        extras: name -> (V, ...) per-position tensors for the adapter (e.g. a timestep).
    """

    values: torch.Tensor
    extras: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    num_modalities: int
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    untie_ffn: bool = True
    untie_attention: bool = True
    untie_norm: bool = True
    qk_norm: tuple[bool, ...] = field(default=())
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    attention_backend: str = "sdpa"
    init_std: float = 0.02
    tie_embeddings: bool = False
    norm_placement: str = "pre"  # "pre": h + f(norm(h)); "post": h + norm(f(h)) (paper Algorithm 1)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    # Tower group of each modality, non-decreasing (modalities of a group are adjacent): a group
    # shares one tower of every untied component. () = one group per modality (MoT).
    groups: tuple[int, ...] = ()
    # FFN of each modality's tower: None = SwiGLU, MoEArgs = mixture of experts. () = all SwiGLU.
    ffn_kinds: tuple[MoEArgs | None, ...] = ()
    rope_scaling: RopeScaling | None = None
    # Tower groups that do not train (LMFusion: a pretrained text tower kept fixed), and
    # [start, end) ranges of vocabulary rows of the shared embedding and head that do not.
    frozen_groups: tuple[int, ...] = ()
    frozen_rows: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        groups = self.tower_groups
        if len(groups) != self.num_modalities or any(b - a not in (0, 1) for a, b in zip(groups, groups[1:])) or groups[0]:
            raise ValueError(f"groups must number the modalities' towers 0, 1, ... in order, got {self.groups}")
        kinds = self.ffn_kinds or (None,) * self.num_modalities
        if len(kinds) != self.num_modalities:
            raise ValueError("ffn_kinds needs one entry per modality")
        for tower in range(self.towers(self.untie_ffn)):
            members = {kinds[m] for m in range(self.num_modalities) if self.towers(self.untie_ffn) == 1 or groups[m] == tower}
            if len(members) > 1:
                raise ValueError("modalities that share an FFN tower must declare the same FFN")
        if any(not 0 <= g < self.num_groups for g in self.frozen_groups):
            raise ValueError(f"frozen_groups {self.frozen_groups} outside 0..{self.num_groups - 1}")

    def frozen_towers(self, untied: bool) -> tuple[int, ...]:
        """The towers of a component that do not train: the frozen groups' own towers when the
        component is untied; its one shared tower only when every group is frozen."""
        if not self.frozen_groups:
            return ()
        if self.towers(untied) > 1:
            return tuple(sorted(set(self.frozen_groups)))
        return (0,) if set(self.frozen_groups) == set(range(self.num_groups)) else ()

    @property
    def tower_groups(self) -> tuple[int, ...]:
        return self.groups or tuple(range(self.num_modalities))

    @property
    def num_groups(self) -> int:
        return max(self.tower_groups) + 1

    @property
    def routed(self) -> bool:
        """True when any component has more than one tower, i.e. the model needs a routing plan."""
        return self.num_groups > 1 and (self.untie_ffn or self.untie_attention or self.untie_norm)

    def towers(self, untied: bool) -> int:
        return self.num_groups if untied and self.num_groups > 1 else 1

    def ffn_tower_kinds(self) -> tuple[MoEArgs | None, ...]:
        """The FFN of each FFN tower (the kind its modalities declare)."""
        kinds = self.ffn_kinds or (None,) * self.num_modalities
        if self.towers(self.untie_ffn) == 1:
            return (kinds[0],)
        return tuple(kinds[self.tower_groups.index(g)] for g in range(self.num_groups))


class MoTTransformer(nn.Module):
    def __init__(self, args: ModelArgs, modality_modules: dict[str, ModalityModules] | None = None):
        """``modality_modules``: modality name -> the modules it owns (kept as submodules, so
        they train, checkpoint and move with the model). Their own initialisation is kept."""
        super().__init__()
        self.args = args
        qk_norm = args.qk_norm or (False,) * args.num_modalities
        if len(qk_norm) != args.num_modalities:
            raise ValueError("qk_norm needs one flag per modality")
        block_args = BlockArgs(
            dim=args.dim,
            n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads or args.n_heads,
            ffn_hidden=args.ffn_hidden or default_ffn_hidden(args.dim),
            norm_eps=args.norm_eps,
            ffn_towers=args.towers(args.untie_ffn),
            attention_towers=args.towers(args.untie_attention),
            norm_towers=args.towers(args.untie_norm),
            qk_norm=tuple(qk_norm),
            norm_placement=args.norm_placement,
            groups=args.tower_groups,
            ffn_kinds=args.ffn_tower_kinds(),
        )
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(MoTBlock(block_args, layer_id=i) for i in range(args.n_layers))
        self.final_norm = TowerRMSNorm(block_args.norm_towers, args.dim, args.norm_eps)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.dim // args.n_heads, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.backend = make_backend(args.attention_backend)
        self.decode_backend = SDPABackend()  # rectangular (new x cached) masks
        self.mask_cache = MaskCache()
        self.reset_parameters()
        self._freeze()
        self.modality_modules = nn.ModuleDict(modality_modules or {})
        self._adapters: dict[int, tuple[str, nn.Module]] = {}
        for name, modules in self.modality_modules.items():
            if not 0 <= modules.index < args.num_modalities:
                raise ValueError(f"modality '{name}' has index {modules.index}, outside 0..{args.num_modalities - 1}")
            if modules.adapter is not None:
                label = f"{modules.owner}: modality '{name}'" if modules.owner else f"modality '{name}'"
                self._adapters[modules.index] = (label, modules.adapter)

    def reset_parameters(self) -> None:
        """Every tower draws from the distribution the dense layer would: dense and MoT start
        statistically identical. Residual output projections are scaled by 1/sqrt(2L)."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for table in (self.embed, self.lm_head):
            for weight in ([] if table is None else table.parameters()):
                nn.init.normal_(weight, std=std)
        for layer in self.layers:
            layer.reset_parameters(std, out_std)
        self.final_norm.reset_parameters()

    def _freeze(self) -> None:
        """Move the frozen towers and vocabulary rows (``args.frozen_*``) out of training."""
        args = self.args
        attention, ffn, norm = (args.frozen_towers(u) for u in (args.untie_attention, args.untie_ffn, args.untie_norm))
        for layer in self.layers:
            layer.freeze_towers(attention, ffn, norm)
        self.final_norm.freeze_towers(norm)
        rows = [r for start, end in args.frozen_rows for r in range(start, end)]
        split_rows(self.embed, "weight", rows)
        if self.lm_head is not None:
            split_rows(self.lm_head, "weight", rows)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) global ids -> (..., dim) rows of the shared embedding."""
        return F.embedding(ids, assembled(self.embed, "weight"))

    @property
    def head_weight(self) -> torch.Tensor:
        """(vocab, dim) output projection over the global vocabulary."""
        return assembled(self.embed if self.lm_head is None else self.lm_head, "weight")

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        modality: torch.Tensor,
        plan: RoutingPlan,
        layout: AttentionLayout,
        cache: KVCache | None = None,
        continuous: dict[int, ContinuousInputs] | None = None,
    ) -> torch.Tensor:
        """Run the network up to the final norm.

        Args:
            tokens: (B, S) long global token ids.
            positions: (B, S) long RoPE positions (restart per packed document).
            modality: (B, S) long modality ids.
            plan: routing plan of ``modality`` (always given: heads and losses read each
                modality's contiguous slice of the output).
            layout: attention layout of the batch (with ``cache``: of the new tokens only).
            cache: KV cache for incremental decoding; the new tokens are appended to it and
                attend to everything cached (SDPA with an explicit mask; same maths).
            continuous: modality index -> its continuous inputs, for every modality with
                ``plan.num_values(m) > 0`` (those positions' ``tokens`` are placeholders).
        Returns:
            (N, dim) final hidden states, N = B*S, in modality-sorted order.
        """
        batch, seq = tokens.shape
        if seq > self.args.max_seq_len:
            raise MotError(f"sequence length {seq} exceeds model.max_seq_len={self.args.max_seq_len}")
        routed = self.args.routed
        flat_tokens = tokens.reshape(-1)
        if plan.value_counts and any(plan.value_counts):
            h = self._embed_with_adapters(plan.sort(flat_tokens), plan, continuous or {})
            if not routed:
                h = plan.unsort(h)
        else:
            h = self.embed_ids(plan.sort(flat_tokens) if routed else flat_tokens)
        cos, sin = self.rope.tables(positions)
        ctx = ForwardContext(
            plan=plan if routed else None,
            tower_plan=group_plan(plan, self.args.tower_groups) if routed and self.args.groups else None,
            modality=modality,
            batch=batch,
            seq=seq,
            cos=cos,  # kept fp32: apply_rotary rotates in fp32 and casts back
            sin=sin,
            backend=self.backend if cache is None else self.decode_backend,
            mask=self.mask_cache.get(self.backend, layout) if cache is None else cache.begin(layout.document, layout.span),
            cache=cache,
        )
        for layer in self.layers:
            if self.args.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        if cache is not None:
            cache.commit()
        if not routed:
            h = plan.sort(h)  # the dense baseline sorts once, at the end, for per-modality heads
        return self.final_norm(h, ctx.towers if routed else plan)

    def _embed_with_adapters(self, sorted_tokens: torch.Tensor, plan: RoutingPlan,
                             continuous: dict[int, ContinuousInputs]) -> torch.Tensor:
        """(N,) modality-sorted ids -> (N, dim): each modality's token positions through the
        shared table, its continuous positions (the end of its slice) through its adapter.
        Every piece is a contiguous slice; one concatenation assembles the stream."""
        pieces = []
        table = assembled(self.embed, "weight")  # once: with frozen rows it is a concatenation
        for m in range(plan.num_modalities):
            start, end = plan.bounds(m)
            n_values = plan.num_values(m)
            if end - n_values > start:
                pieces.append(F.embedding(sorted_tokens[start : end - n_values], table))
            if not n_values:
                continue
            if m not in self._adapters:
                raise MotError(f"modality {m} has {n_values} continuous positions in the batch but no input adapter")
            label, adapter = self._adapters[m]
            inputs = continuous.get(m)
            if inputs is None or inputs.values.shape[0] != n_values:
                got = "none" if inputs is None else f"{inputs.values.shape[0]} rows"
                raise MotError(f"{label}: the batch has {n_values} continuous positions but {got} of values")
            try:
                out = adapter(inputs.values, inputs.extras)
            except MotError:
                raise
            except Exception as exc:  # a bug in the plugin's module: one line naming it, not a traceback
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise MotError(f"{label}: its input adapter raised {type(exc).__name__}: {message}") from exc
            if not isinstance(out, torch.Tensor) or out.shape != (n_values, self.args.dim):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise MotError(
                    f"{label}: its input adapter returned {shape}, expected "
                    f"({n_values}, model.dim={self.args.dim})"
                )
            pieces.append(out.to(self.embed.weight.dtype))  # the stream's dtype, as the embedding gives it
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token: one tower of each component (for
        an MoE FFN: its router and the experts a token uses on average), the shared embedding
        and head, and the largest modality-owned adapter + head (a token goes through at most
        one modality's)."""
        total = sum(p.numel() for p in self.parameters())
        active = sum(layer.active_parameters() for layer in self.layers)
        table = self.args.vocab_size * self.args.dim
        active += self.args.dim + table * (1 if self.lm_head is None else 2)  # a final-norm tower, embedding, head
        owned = [sum(p.numel() for p in m.parameters()) for m in self.modality_modules.values()]
        return {"total": total, "active_per_token": active + max(owned, default=0)}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x the matmul parameters a token uses (embedding lookup
        free, output head not) + causal attention (6 x layers x seq_len x dim)."""
        counts = self.parameter_counts()["active_per_token"]
        norms = sum(p.numel() // p.shape[0] for n, p in self.named_parameters()
                    if "norm" in n and not n.startswith("modality_modules.") and not n.endswith("_frozen"))
        matmul = counts - self.args.vocab_size * self.args.dim - norms
        return 6.0 * matmul + 6.0 * self.args.n_layers * seq_len * self.args.dim

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the MoE routers' auxiliary losses (load balance, z-loss) of the last forward,
        already weighted; None when the model has no MoE or none ran."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def router_stats(self, names: list[str]) -> dict[str, float]:
        """Routing statistics of the last forward per modality, over every MoE layer: each
        expert's share of the modality's assignments, the share of its tokens no expert took
        (expert choice), and the auxiliary loss. Reads device tensors: call when logging."""
        layers = [m for m in self.moe_layers() if m.stats]
        if not layers:
            return {}
        out: dict[str, float] = {}
        assignments = sum(m.stats["assignments"] for m in layers)
        tokens = sum(m.stats["tokens"] for m in layers)
        dropped = sum(m.stats["dropped"] for m in layers)
        for index, name in enumerate(names):
            total = float(assignments[index].sum())
            if not total and not float(tokens[index]):
                continue
            for expert, share in enumerate((assignments[index] / max(total, 1.0)).tolist()):
                out[f"router/{name}/expert{expert}"] = share
            out[f"router/{name}/dropped"] = float(dropped[index] / tokens[index].clamp(min=1))
        aux = self.auxiliary_loss()
        if aux is not None:
            out["router/aux_loss"] = float(aux.detach())
        return out


def whole_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, tuple[int, ...]]]:
    """State-dict name -> (module, attribute, whole shape) of every tensor as the model uses it:
    a tensor split into trainable and frozen rows appears once, under its own name, with the
    shape of both parts together."""
    out = {}
    for key in model.state_dict():
        prefix, _, attr = key.rpartition(".")
        if attr.endswith("_frozen"):
            continue
        module = model.get_submodule(prefix) if prefix else model
        tensor = getattr(module, attr)
        if tensor.dim() == 0:
            out[key] = (module, attr, ())
            continue
        rows = total_rows(module, attr) if isinstance(tensor, nn.Parameter) else tensor.shape[0]
        out[key] = (module, attr, (rows, *tensor.shape[1:]))
    return out


def warm_start_from_dense(model: MoTTransformer, dense_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a dense checkpoint into every tower of ``model`` (paper: MoT from a dense init).

    Tower weights are stacked (G, ...): a dense tensor (1, ...) is broadcast to all G towers;
    shared tensors must match exactly. Returns the names copied; raises MotError on mismatch.
    ``dense_state`` may read lazily (``checkpoint.LazyWeights``: a ``shape(name)`` method spares
    reading a tensor twice); under FSDP2 each worker writes only the rows it holds.
    """
    own = whole_tensors(model)
    missing = sorted(set(own) - set(dense_state))
    unexpected = sorted(set(dense_state) - set(own))
    if missing or unexpected:
        raise MotError(
            f"warm start: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    shape_of = getattr(dense_state, "shape", None) or (lambda n: tuple(dense_state[n].shape))
    for name, (_, _, shape) in own.items():  # check every shape before touching any weight
        source = shape_of(name)
        broadcastable = len(shape) > 0 and len(source) == len(shape) and source[0] == 1 and source[1:] == shape[1:]
        if source != shape and not broadcastable:
            raise MotError(f"warm start: '{name}' has shape {source} in the checkpoint, {shape} in the model")
    with torch.no_grad():
        for name, (module, attr, shape) in own.items():
            target = getattr(module, attr)
            if isinstance(target, nn.Parameter) and shape:
                write_rows(module, attr, range(shape[0]), dense_state[name])
            else:
                target.copy_(dense_state[name].expand_as(target))
    return list(own)
