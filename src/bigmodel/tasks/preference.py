"""Preference tuning of a decoder on pairs of replies (`experiment=dpo`, `data=preference`).

Losses, on the log-probabilities of the replies' tokens summed per sequence (`logps`) and their
token counts (`n`), for a batch of B pairs:

- `dpo` (Rafailov et al. 2023, eq. 7): -log sigma(beta ((pi_c - ref_c) - (pi_r - ref_r))), where
  ref are the log-probabilities under a frozen reference, the starting weights. At the first step
  the policy is the reference, so the loss is ln 2 exactly.
- `simpo` (Meng et al. 2024, eq. 6), reference-free: -log sigma(beta pi_c / n_c - beta pi_r / n_r
  - gamma).
- `orpo` (Hong et al. 2024, eqs. 6-7), reference-free: the chosen reply's negative
  log-likelihood (mean per token) - lambda log sigma(log odds_c - log odds_r), where the odds of
  a reply are p / (1 - p) with p its mean per-token probability exp(pi / n).

Metrics (`train/`, `val/`, `test/`): loss, rewards_chosen, rewards_rejected, rewards_accuracy (the
share of pairs whose chosen reward is higher), rewards_margin (their mean difference), logps_chosen
and logps_rejected (summed per reply, mean over pairs). The rewards are those of each loss: beta
(pi - ref) for DPO, beta pi / n for SimPO, lambda pi / n for ORPO.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.errors import UserError
from bigmodel.tasks.base import Task
from bigmodel.tasks.protocols import LanguageNet

IGNORE = -100
LOSSES = ("dpo", "simpo", "orpo")


def sequence_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the scored targets of each sequence and their counts.

    logits (N, T, V), y (N, T) with IGNORE where nothing is scored -> (N,), (N,)."""
    scored = y != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1), scored.sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss (mean over pairs) and the implicit rewards of chosen and rejected replies."""
    reward_c = beta * (chosen - ref_chosen)
    reward_r = beta * (rejected - ref_rejected)
    return -F.logsigmoid(reward_c - reward_r).mean(), reward_c, reward_r


def simpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO's loss: length-normalised log-probabilities as rewards, a target margin gamma."""
    reward_c = beta * chosen / n_chosen
    reward_r = beta * rejected / n_rejected
    return -F.logsigmoid(reward_c - reward_r - gamma).mean(), reward_c, reward_r


def orpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's loss: the chosen reply's NLL per token plus lambda x the odds-ratio term."""
    mean_c, mean_r = chosen / n_chosen, rejected / n_rejected
    log_odds = (mean_c - mean_r) - (
        torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r))
    )
    nll = -chosen.sum() / n_chosen.sum()
    loss = nll - lam * F.logsigmoid(log_odds).mean()
    return loss, lam * mean_c, lam * mean_r


REFERENCE = "reference."  # the reference's keys in a checkpoint's state dict


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (those tied to another under each name), whatever
    state-dict hooks the module has (LoRA's drop its frozen weights)."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


class PreferenceModel(Task):
    """DPO (with a frozen reference: the starting weights), SimPO or ORPO on a `LanguageNet`.

    Args:
        loss_type: dpo, simpo or orpo.
        beta: DPO's and SimPO's inverse temperature (DPO ~0.1, SimPO ~2).
        gamma: SimPO's target reward margin.
        orpo_lambda: ORPO's weight of the odds-ratio term.

    The reference is a frozen copy of the net made when fitting starts: the starting weights
    (`model.init_from`). It lives outside the module tree (no optimizer, summary or device move
    sees it) and travels in the checkpoint's state dict under `reference.`, so that a resumed
    run, the test of the best checkpoint and eval.py score against the same starting weights.
    A DPO checkpoint is about twice the size of its net's; SimPO and ORPO keep no reference.
    """

    learning = "preference tuning"

    def __init__(
        self,
        net: LanguageNet,
        optimizer: functools.partial | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
        loss_type: str = "dpo",
        beta: float = 0.1,
        gamma: float = 0.5,
        orpo_lambda: float = 0.1,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        if loss_type not in LOSSES:
            raise UserError(f"model.loss_type={loss_type} is not one of: {', '.join(LOSSES)}")
        if not beta > 0:
            raise UserError(f"model.beta={beta} must be > 0")
        self.loss_type, self.beta, self.gamma, self.orpo_lambda = (
            loss_type,
            beta,
            gamma,
            orpo_lambda,
        )
        # a list keeps the frozen copy out of the module tree: not in checkpoints, optimizers,
        # the model summary or the device moves Lightning makes (it is moved on first use)
        self._reference: list[nn.Module] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def setup(self, stage: str) -> None:
        # fitting from the starting weights: a resumed run has its reference from the checkpoint
        # already (its weights are loaded into the task before fitting starts)
        if stage == "fit" and self.loss_type == "dpo" and not self._reference:
            self._set_reference(copy.deepcopy(self.net))
        super().setup(stage)

    def _set_reference(self, reference: nn.Module) -> None:
        reference.eval().requires_grad_(False)
        self._reference[:] = [reference]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )
        if self._reference:
            for name, tensor in _tensors(self._reference[0]).items():
                state[f"{prefix}{REFERENCE}{name}"] = tensor if keep_vars else tensor.detach()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        saved = {k[len(REFERENCE) :]: v for k, v in state_dict.items() if k.startswith(REFERENCE)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(REFERENCE)}
        result = super().load_state_dict(rest, strict=strict, assign=assign)
        if saved:
            reference = self._reference[0] if self._reference else copy.deepcopy(self.net)
            tensors = _tensors(reference)
            if set(saved) != set(tensors):
                raise UserError(
                    "the checkpoint's DPO reference does not fit this net; resume with the "
                    "model config it was trained with"
                )
            with torch.no_grad():
                for name, value in saved.items():
                    tensors[name].copy_(value)
            self._set_reference(reference)
        return result

    def _reference_logps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self._reference:
            return None
        reference = self._reference[0]
        param = next(self.net.parameters())
        first = next(reference.parameters())
        if first.device != param.device or first.dtype != param.dtype:
            reference.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            return sequence_logps(reference(x), y)[0]

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch  # (2B, T): the B chosen replies, then the B rejected ones
        b = x.shape[0] // 2
        logps, n = sequence_logps(self.net(x), y)
        chosen, rejected = logps[:b], logps[b:]
        if self.loss_type == "dpo":
            ref = self._reference_logps(x, y)
            if ref is None:  # a checkpoint evaluated alone: the reference is itself
                ref = logps.detach()
            loss, reward_c, reward_r = dpo_loss(chosen, rejected, ref[:b], ref[b:], self.beta)
        elif self.loss_type == "simpo":
            loss, reward_c, reward_r = simpo_loss(
                chosen, rejected, n[:b], n[b:], self.beta, self.gamma
            )
        else:
            loss, reward_c, reward_r = orpo_loss(chosen, rejected, n[:b], n[b:], self.orpo_lambda)
        pairs = (x[:b],)  # metrics are weighted by pairs
        self.log_metric(f"{split}/loss", loss, pairs, prog_bar=split != "test")
        with torch.no_grad():
            values = {
                "rewards_chosen": reward_c.mean(),
                "rewards_rejected": reward_r.mean(),
                "rewards_accuracy": (reward_c > reward_r).float().mean(),
                "rewards_margin": (reward_c - reward_r).mean(),
                "logps_chosen": chosen.mean(),
                "logps_rejected": rejected.mean(),
            }
        for name, value in values.items():
            self.log_metric(f"{split}/{name}", value, pairs)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def eval_flops(self, batch) -> int | None:
        forward = self.forward_flops(batch)
        return None if forward is None else forward * (2 if self._reference else 1)
