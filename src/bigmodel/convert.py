"""Turn a sharded DeepSpeed checkpoint folder into one .ckpt file that eval.py and generate.py load.

    python -m bigmodel.convert logs/train/runs/<run>/checkpoints/last.ckpt  [out.ckpt]

ZeRO stages 1-3 (with or without offload) save `last.ckpt/` as a folder of per-rank shards. This
gathers the float32 weights (DeepSpeed's zero_to_fp32, through Lightning's wrapper, on the CPU and
without a GPU or a process group), keeps Lightning's and bigmodel's plain-data records (step,
epoch, run config, tokenizer) and writes a single file that `torch.load(..., weights_only=True)`
reads. The default output is `<folder>.consolidated.ckpt` next to the folder.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

from bigmodel.errors import UserError

# DeepSpeed bookkeeping in the model-states file: not needed (nor all loadable) without DeepSpeed.
_DEEPSPEED_KEYS = {
    "ds_config",
    "ds_version",
    "buffer_names",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "optimizer",
    "lr_scheduler",
    "optimizer_states",
    "lr_schedulers",
}


def _plain(value) -> bool:
    """Whether `value` survives a `weights_only=True` round trip (tensors and plain data only)."""
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
        return True
    except Exception:
        return False


def convert(checkpoint_dir: str | Path, output_file: str | Path | None = None) -> Path:
    """Consolidate a DeepSpeed checkpoint folder into one weights-only-loadable .ckpt file."""
    src = Path(checkpoint_dir)
    if not src.is_dir():
        raise UserError(
            f"{src} is not a DeepSpeed checkpoint folder; pass the .ckpt folder that "
            "strategy=deepspeed_* wrote (a .ckpt file needs no conversion)"
        )
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UserError(f"converting needs deepspeed: pip install deepspeed ({e})") from None
    out = (
        Path(output_file)
        if output_file
        else src.with_name(src.name.removesuffix(".ckpt") + ".consolidated.ckpt")
    )
    try:
        state = convert_zero_checkpoint_to_fp32_state_dict(src, out)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(
            f"{src} is not a DeepSpeed checkpoint ({e}); pass the folder strategy=deepspeed_* wrote"
        ) from None
    clean = {k: v for k, v in state.items() if k not in _DEEPSPEED_KEYS and _plain(v)}
    clean["state_dict"] = {
        k: v.float().contiguous() if v.is_floating_point() else v
        for k, v in state["state_dict"].items()
    }
    torch.save(clean, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bigmodel.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint_dir", help="the DeepSpeed checkpoint folder (…/last.ckpt)")
    parser.add_argument("output_file", nargs="?", help="where to write the single .ckpt file")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint_dir, args.output_file)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}; use it as: python eval.py ckpt_path={out}")


if __name__ == "__main__":
    main()
