"""LoRA (Hu et al., 2021): train a low-rank update of chosen Linear layers, the rest frozen.

A targeted `nn.Linear` becomes a `LoRALinear` that keeps the very same weight and bias (frozen)
and adds `lora_b @ lora_a`, scaled by alpha / rank; `lora_b` starts at zero, so the adapted net
starts as the pretrained one. Targets are Linear layers of the blocks by name (`attn.qkv`) or
by role (`q`, `k`, `v`, `o`, `gate`, `up`, `down`, as the net's `roles()` places them): a role
that is part of a fused layer (q of `attn.qkv`, gate of a SwiGLU's `mlp.fc`) gets an update of
its own rows only (`SlicedLoRALinear`), exactly what an adapter on the family's separate
projection computes. Only the adapters are trainable, and only they are written into
checkpoints: the frozen weights come again from `model.init_from` when the net is rebuilt. Export
merges them into the weights (`merged_weight`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.errors import UserError

# the roles a net's `roles()` may name
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    rank: int = 0
    """Rank of each update; 0 switches LoRA off (every weight trains)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank, so a new rank needs no new learning rate."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(default_factory=lambda: ["attn.qkv"])
    """What to adapt in each block: Linear layers by name (attn.qkv, attn.proj, mlp.fc,
    mlp.proj) or roles (q, k, v, o, gate, up, down)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise UserError(f"model.lora.rank={self.rank} must be an integer >= 0 (0: no LoRA)")
        if not self.alpha > 0:
            raise UserError(f"model.lora.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.targets, str) or not self.targets:
            raise UserError(
                f"model.lora.targets={self.targets} must be a non-empty list, e.g. [attn.qkv]"
            )


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W and b frozen: (..., in) -> (..., "
    "out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: no copy
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's own init
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def delta(self) -> torch.Tensor:
        """The (out, in) update the adapters add to the weight, before scaling."""
        return self.lora_b @ self.lora_a

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scaling={self.scaling:g}"


class SlicedLoRALinear(LoRALinear):
    """LoRA on some row ranges of a fused Linear, one adapter per role: `rows` maps a role to its
    output rows (start, end). Parameters `lora_a.<role>` (rank, in), `lora_b.<role>` (rows, rank);
    rows of no role are not adapted."""

    def __init__(
        self,
        base: nn.Linear,
        rows: dict[str, tuple[int, int]],
        rank: int,
        alpha: float,
        dropout: float,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: no copy
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.rows = dict(sorted(rows.items(), key=lambda kv: kv[1]))
        self.lora_a, self.lora_b = nn.ParameterDict(), nn.ParameterDict()
        for role, (start, end) in self.rows.items():
            a = torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear's own init
            self.lora_a[role] = nn.Parameter(a)
            self.lora_b[role] = nn.Parameter(
                torch.zeros(end - start, rank, dtype=w.dtype, device=w.device)
            )
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def _spread(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each role's piece (..., its rows) -> (..., out), zeros where no role is."""
        parts, at = [], 0
        for role, (start, end) in self.rows.items():
            piece = pieces[role]
            if start > at:
                parts.append(piece.new_zeros(*piece.shape[:-1], start - at))
            parts.append(piece)
            at = end
        if at < self.out_features:
            parts.append(piece.new_zeros(*piece.shape[:-1], self.out_features - at))
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.lora_dropout(x)
        pieces = {r: F.linear(F.linear(dx, self.lora_a[r]), self.lora_b[r]) for r in self.rows}
        return F.linear(x, self.weight, self.bias) + self.scaling * self._spread(pieces)

    def delta(self) -> torch.Tensor:
        pieces = {r: (self.lora_b[r] @ self.lora_a[r]).t() for r in self.rows}  # (in, rows)
        return self._spread(pieces).t()

    def extra_repr(self) -> str:
        rank = next(iter(self.lora_a.values())).shape[0]
        return f"{nn.Linear.extra_repr(self)}, roles={list(self.rows)}, rank={rank}"


def merged_weight(linear: nn.Linear) -> torch.Tensor:
    """The (out, in) weight a plain Linear needs to compute what `linear` computes (in eval)."""
    if isinstance(linear, LoRALinear):
        return linear.weight + linear.scaling * linear.delta()
    return linear.weight


def supports_lora(net: nn.Module) -> bool:
    """A net LoRA can adapt: transformer blocks of named Linear layers (our GPT)."""
    return isinstance(getattr(net, "blocks", None), nn.ModuleList) and hasattr(net, "wte")


def resolve_targets(net: nn.Module, targets: list[str]) -> dict[str, dict[str, tuple] | None]:
    """Targets -> {Linear layer within a block: None (all of it) or {role: its rows}}."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    per_block = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.")})
    roles = net.roles() if hasattr(net, "roles") else {}
    out: dict[str, dict[str, tuple] | None] = {}
    for target in targets:
        if target in ROLES and target not in roles:
            raise UserError(
                f"model.lora.targets: {target} is no role of this model's blocks (it has "
                f"{', '.join(roles) or 'none'}); choose from those or a Linear layer: "
                f"{', '.join(per_block)}"
            )
        if target in roles:
            layer, rows = roles[target]
        elif target in per_block:
            layer, rows = target, None
        else:
            raise UserError(
                f"model.lora.targets: {target} is no Linear layer of the blocks; choose from "
                f"{', '.join(per_block)}" + (f", or a role: {', '.join(roles)}" if roles else "")
            )
        if layer in out and (rows is None or out[layer] is None):
            raise UserError(
                f"model.lora.targets: {target} adapts {layer}, which another target adapts too; "
                "name each layer or role once"
            )
        if rows is None:
            out[layer] = None
        else:
            out.setdefault(layer, {})[target] = rows
    return out


def apply_lora(net: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze `net` and put adapters on the `cfg.targets` layers or roles of each block; the
    names of the adapted layers. Checkpoints of the net then hold the adapters alone."""
    layers = resolve_targets(net, cfg.targets)
    for p in net.parameters():
        p.requires_grad_(False)
    adapted = []
    for i, block in enumerate(net.blocks):
        for layer, rows in layers.items():
            parent_name, _, attr = layer.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            base = getattr(parent, attr)
            if rows is None:
                adapter = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout)
            else:
                adapter = SlicedLoRALinear(base, rows, cfg.rank, cfg.alpha, cfg.dropout)
            setattr(parent, attr, adapter)
            adapted.append(f"blocks.{i}.{layer}")
    frozen = frozenset(
        n for n, p in net.named_parameters(remove_duplicate=False) if not p.requires_grad
    )
    # functools.partial of module-level functions: the net stays picklable (ddp_spawn)
    net.register_state_dict_post_hook(functools.partial(_drop_frozen, frozen))
    net.register_load_state_dict_post_hook(functools.partial(_frozen_not_missing, frozen))
    return adapted


def _drop_frozen(frozen: frozenset[str], module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] in frozen]:
        del state_dict[key]


def _frozen_not_missing(frozen: frozenset[str], module, incompatible_keys) -> None:
    # the frozen weights come from model.init_from, not from the checkpoint
    missing = incompatible_keys.missing_keys
    keep = [k for k in missing if not any(k == f or k.endswith("." + f) for f in frozen)]
    missing[:] = keep


def count_trainable(net: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, tied tensors once."""
    params = {id(p): p for p in net.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
