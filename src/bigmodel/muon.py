"""`optimizer=muon`: Muon for the hidden matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, 2024) replaces each hidden weight matrix's momentum by its nearest
semi-orthogonal matrix (five Newton-Schulz iterations) before the step: every direction of the
update moves at the same rate. It is for the matrices inside the net's `blocks`; embeddings, the
output head, norms and biases train better with AdamW (Muon's authors; modded-nanogpt).

torch ships `torch.optim.Muon` (2-D parameters only) and `torch.optim.AdamW`, but two optimizer
objects force Lightning into manual optimization, which refuses `gradient_clip_val` and gradient
accumulation. `MuonAdamW` is one `torch.optim.Optimizer` with two kinds of parameter group
(`"muon": True | False`), so clipping, accumulation, schedulers (each group keeps its own base
lr), `lr-*` logging, checkpoints and exact resume work as with any optimizer. Its Muon update is
`torch.optim.Muon`'s (tests/test_muon.py compares them on the same matrices) with two additions:

- `ns_dtype`: the Newton-Schulz iteration runs in bfloat16 (torch's choice, fast on GPUs and on
  CPUs with AVX-512 BF16 or AMX) or in float32 (for CPUs that emulate bfloat16, where it is many
  times slower). `auto` picks by the hardware of the parameter.
- momentum warmup (modded-nanogpt): the momentum rises linearly from `momentum_start` to
  `momentum` over the first `momentum_warmup_steps` steps; the step count is optimizer state.

Which parameters are Muon's is decided by `groups_for(net, weight_decay)` here (Task calls an
optimizer class's own `groups_for` where it has one): the 2-D-or-more weights inside the net's
`blocks` (conv kernels flattened to matrices), minus those it declares `no_weight_decay()`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import UserError
from bigmodel.optim import param_groups as decay_groups

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's, from Keller Jordan's post
NS_DTYPES = ("auto", "bfloat16", "float32")
ADJUST_LR = ("original", "match_rms_adamw", "none")


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run in hardware here (else torch emulates them, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def orthogonalize(
    g: torch.Tensor, steps: int, dtype: torch.dtype, eps: float = 1e-7
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon: g (A, B) -> ~U V^T (A, B).

    Runs on the wide orientation (the Gram matrix is the smaller side's square), with the
    spectral norm first brought under 1 by the Frobenius norm.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T  # (A, A), A <= B
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    if tall:
        x = x.T
    return x


def adjusted_lr(lr: float, shape: torch.Size, how: str) -> float:
    """torch.optim.Muon's per-shape lr: `original` sqrt(max(1, A/B)) (Keller Jordan);
    `match_rms_adamw` 0.2 sqrt(max(A, B)) (Moonshot: reuse AdamW's lr); `none` lr."""
    rows, cols = shape[0], math.prod(shape[1:])
    if how == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if how == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked `"muon": True`, AdamW on the others; one optimizer.

    Under a strategy that shards parameters (FSDP, DeepSpeed), each process holds a piece of
    each matrix, and a piece orthogonalized is not the matrix orthogonalized: the Task refuses
    such a pairing (`needs_whole_matrices`). DDP keeps whole matrices on every process.

    Args:
        params: parameter groups; each says `"muon": True` or False (plain tensors: AdamW).
        lr: Muon's learning rate (hidden matrices).
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's, as torch.optim.Muon has them.
        momentum_start, momentum_warmup_steps: the momentum rises linearly from
            momentum_start to momentum over the first momentum_warmup_steps steps (0: none).
        ns_dtype: the Newton-Schulz iteration's dtype: auto (bfloat16 where native), bfloat16,
            float32.
        weight_decay: decoupled, on both kinds (a group's own value wins: norms and biases 0).
        adam_lr, adam_betas, adam_eps: AdamW's, for the groups that are not Muon's.
    """

    needs_whole_matrices = True

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        adjust_lr_fn: str = "original",
        momentum_start: float = 0.85,
        momentum_warmup_steps: int = 0,
        weight_decay: float = 0.0,
        adam_lr: float = 0.003,
        adam_betas: tuple[float, float] | list[float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
    ) -> None:
        if ns_dtype not in NS_DTYPES:
            raise UserError(f"optimizer.ns_dtype={ns_dtype} is not one of {', '.join(NS_DTYPES)}")
        if adjust_lr_fn not in ADJUST_LR:
            raise UserError(
                f"optimizer.adjust_lr_fn={adjust_lr_fn} is not one of {', '.join(ADJUST_LR)}"
            )
        for key, value in (("lr", lr), ("adam_lr", adam_lr), ("weight_decay", weight_decay)):
            if value < 0:
                raise UserError(f"optimizer.{key}={value} must be >= 0")
        if not 0 <= momentum_start <= 1 or not 0 <= momentum < 1:
            raise UserError("optimizer.momentum must be in [0, 1) and momentum_start in [0, 1]")
        if ns_steps < 1 or momentum_warmup_steps < 0:
            raise UserError("optimizer.ns_steps must be >= 1 and momentum_warmup_steps >= 0")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "adjust_lr_fn": adjust_lr_fn,
            "momentum_start": momentum_start,
            "momentum_warmup_steps": momentum_warmup_steps,
            "betas": tuple(adam_betas),
            "eps": adam_eps,
            "muon": False,
        }
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            if not group.get("muon", False):
                # AdamW's groups: its own lr as their base (schedulers scale each group's)
                group.setdefault("lr", adam_lr)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"a Muon group holds a {p.ndim}-D parameter")

    def _ns_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        name = group["ns_dtype"]
        if name == "auto":
            name = "bfloat16" if bf16_is_native(p.device) else "float32"
        return getattr(torch, name)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            state["step"] += 1
            mu = self._momentum(group, int(state["step"].item()))
            g, buf = p.grad, state["momentum_buffer"]
            # torch.optim.Muon's moving average (the scale is normalized away by the iteration)
            buf.lerp_(g, 1 - mu)  # B_t = mu B_{t-1} + (1 - mu) g_t
            update = g.lerp(buf, mu) if group["nesterov"] else buf  # (1 - mu) g_t + mu B_t
            shape = update.shape
            ortho = orthogonalize(
                update.reshape(shape[0], -1), group["ns_steps"], self._ns_dtype(group, p)
            )
            p.mul_(1 - lr * wd)  # decoupled weight decay, at the unadjusted lr (as torch)
            step = adjusted_lr(lr, shape, group["adjust_lr_fn"])
            p.add_(ortho.reshape(shape).to(p.dtype), alpha=-step)

    @staticmethod
    def _momentum(group: dict, step: int) -> float:
        warmup = group["momentum_warmup_steps"]
        if warmup <= 0 or step > warmup:
            return group["momentum"]
        frac = (step - 1) / warmup
        return group["momentum_start"] + frac * (group["momentum"] - group["momentum_start"])

    def _adamw_step(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = int(state["step"].item())
            g = p.grad
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    # ------------------------------------------------------------------ what is Muon's
    @staticmethod
    def groups_for(net: nn.Module, weight_decay: float) -> list[dict]:
        """Muon: the weights of 2+ dimensions inside `net.blocks` that are decayed (not
        embeddings, norms or declared exceptions); AdamW: every other trainable parameter, with
        weight decay where `bigmodel.optim.param_groups` gives it."""
        blocks = getattr(_inner(net), "blocks", None)
        if not isinstance(blocks, nn.Module):
            raise UserError(
                f"optimizer=muon orthogonalizes the hidden matrices of a net's `blocks`, and "
                f"{type(_inner(net)).__name__} has none: use optimizer=adamw"
            )
        hidden = {id(p) for p in blocks.parameters() if p.ndim >= 2}
        # bigmodel.optim.param_groups: [decayed matrices, everything else (if any)]
        decayed, *rest = decay_groups(net, weight_decay)
        muon = [p for p in decayed["params"] if id(p) in hidden]
        decay = [p for p in decayed["params"] if id(p) not in hidden]
        no_decay = [p for group in rest for p in group["params"]]
        if not muon:
            raise UserError(
                f"optimizer=muon found no hidden matrices in {type(_inner(net)).__name__}.blocks "
                "to orthogonalize: use optimizer=adamw"
            )
        groups = [{"params": muon, "muon": True, "weight_decay": weight_decay}]
        if decay:
            groups.append({"params": decay, "muon": False, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "muon": False, "weight_decay": 0.0})
        return groups


def _inner(module: nn.Module) -> nn.Module:
    """The net of a task (`task.net`), or the module itself."""
    return getattr(module, "net", module)
