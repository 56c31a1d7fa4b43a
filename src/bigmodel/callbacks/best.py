"""Best-checkpoint bookkeeping that stays right through every kind of resume.

Lightning's ModelCheckpoint keeps, in each checkpoint, the files it ranks best (`best_k_models`,
`best_model_path`). Two things made that record wrong:

1. When the run validates once an epoch, ModelCheckpoint ranks and writes its files at the end
   of the training epoch, after the validation; `last.ckpt` (bigmodel.callbacks.last) is written
   at the end of the validation, before that, so it named the previous best, a file the
   ranking then deleted. Here every ModelCheckpoint that would wait for the epoch's end does its
   work at the end of the validation instead, where the runner orders `last.ckpt` after it.
2. Resumed in another folder (`ckpt_path=...` starts a new run directory), Lightning keeps only
   `best_model_path`, a file of the earlier folder, and restarts the ranking: the first
   validation of the resumed run became "the best" however it compared. Resumed in the same
   folder (`resume=auto`), it took the record as it was, files since deleted included.
   Here the record is carried over: files that no longer exist are dropped (with one warning),
   the rest are linked (or copied) into this run's checkpoint folder, so that the ranking goes
   on from the whole history and only ever deletes files of its own folder, and the test stage
   finds the best file in the run it tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from bigmodel.callbacks.last import LastCheckpoint

log = logging.getLogger("bigmodel")


def _ranked(cb: ModelCheckpoint) -> bool:
    """A checkpoint callback that ranks files by a metric (LastCheckpoint keeps one file)."""
    return not isinstance(cb, LastCheckpoint) and cb.monitor is not None and cb.save_top_k != 0


def _same_dir(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as the same file as `src` (or folder: DeepSpeed writes a checkpoint as one), hard
    links where the file system allows, else copies; made beside it under a temporary name and
    renamed, so a kill midway leaves no torn checkpoint."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, copy_function=_link)
        else:
            _link(str(src), str(tmp))
        os.replace(tmp, dst)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()


def carry_over(state: dict[str, Any], cb: ModelCheckpoint, write_files: bool) -> dict[str, Any]:
    """A ModelCheckpoint's saved state, made true for `cb` in this run's folder.

    Drops files that no longer exist; keeps the best `save_top_k`; brings the files of another
    folder into `cb.dirpath` (when `write_files`: the first process of a distributed run);
    recomputes best and k-th from what is left, as Lightning's ranking computes them.
    """
    scores = dict(state.get("best_k_models") or {})
    best = state.get("best_model_path")
    if best and best not in scores and state.get("best_model_score") is not None:
        scores[best] = state["best_model_score"]
    gone = [p for p in scores if not os.path.exists(p)]
    for p in gone:
        del scores[p]
    better_first = sorted(scores, key=lambda p: float(scores[p]), reverse=cb.mode == "max")
    if cb.save_top_k > 0:
        better_first = better_first[: cb.save_top_k]
    other_dir = not _same_dir(state.get("dirpath"), cb.dirpath)
    kept: dict[str, Any] = {}
    for p in better_first:
        if other_dir:
            new = Path(cb.dirpath) / Path(p).name
            if write_files:
                _link_or_copy(Path(p), new)
            kept[str(new)] = scores[p]
        else:
            kept[p] = scores[p]
    if gone:
        log.warning(
            f"the checkpoint's record of the best files of {cb.monitor} names "
            f"{len(gone)} that no longer exist ({', '.join(gone)}); going on without them"
        )
    state = {**state, "dirpath": cb.dirpath, "best_k_models": kept}
    order = list(kept)  # best first
    state["best_model_path"] = order[0] if order else ""
    state["best_model_score"] = kept[order[0]] if order else None
    full = cb.save_top_k > 0 and len(order) == cb.save_top_k
    state["kth_best_model_path"] = order[-1] if full else ""
    state["kth_value"] = kept[order[-1]] if full else cb.kth_value
    if other_dir:  # its own `last` file of the earlier folder is not this run's
        state["last_model_path"] = ""
    return state


class BestCheckpoints(L.Callback):
    """Keep every ranking ModelCheckpoint's record true across resumes (module docstring).

    The runner adds it to every training (it has no settings and saves no state).
    """

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this on every callback before any callback loads its state: the
        # records are corrected in the checkpoint itself, then loaded as usual
        if trainer.state.fn != "fit":
            return
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and _ranked(cb) and cb.state_key in states:
                states[cb.state_key] = carry_over(
                    states[cb.state_key], cb, write_files=trainer.is_global_zero
                )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before the checkpoint callbacks (Lightning puts them last): from the first
        # validation on, each ranks and writes here rather than at the epoch's end, before
        # last.ckpt is written (see 1. above)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for cb in trainer.checkpoint_callbacks:
            if (
                isinstance(cb, ModelCheckpoint)
                and not isinstance(cb, LastCheckpoint)
                and cb._save_on_train_epoch_end is None
                and cb._should_save_on_train_epoch_end(trainer)
            ):
                cb._save_on_train_epoch_end = False
