"""What this machine runs fast: `precision=auto` picks bf16-mixed only where bf16 pays.

bf16 matmuls need hardware for them. On a CPU with AMX or AVX-512 BF16 they run 2-8x faster
than fp32; on one without (AVX2 only, most laptops and many cloud cores) torch emulates them,
about 50-100x slower than fp32 (768x128x512: 128 GFLOP/s fp32 against 1.3 bf16 on an AVX2
EPYC). One config cannot be right on both, so the experiments that chase speed say `auto`.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("bigmodel")

AUTO = "auto"
_BF16_NAMES = ("bf16-mixed", "bf16-true", "bf16")


def device_kind(accelerator: str | None) -> str:
    """`trainer.accelerator` -> the device the Trainer will use: "cuda", "mps" or "cpu"."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    if name == "mps" or (name == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu" if name in ("auto", "cpu") else name


def cpu_bf16_instructions() -> str | None:
    """The name of this CPU's bf16 matmul instructions (AMX, AVX-512 BF16), or None."""
    for name, probe in (
        ("AMX", "_is_amx_tile_supported"),
        ("AVX-512 BF16", "_is_avx512_bf16_supported"),
    ):
        check = getattr(torch.cpu, probe, None)  # private probes: absent on some builds
        if check is not None and check():
            return name
    return None


def fast_bf16(kind: str) -> tuple[bool, str]:
    """Whether bf16 matmuls beat fp32 on this device kind, and why, in words."""
    if kind == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU has bf16" if ok else "this GPU has no bf16"
    if kind == "cpu":
        found = cpu_bf16_instructions()
        if found:
            return True, f"this CPU has {found}"
        return False, "this CPU has neither AMX nor AVX-512 BF16"
    return False, f"bf16 is not measured on {kind} here"


def resolve_precision(precision: object, accelerator: str | None) -> object:
    """`auto` -> bf16-mixed where bf16 is fast, else 32-true; other values pass through.

    An explicit bf16 on a CPU without bf16 instructions is kept (the user asked) with one
    warning naming the cost and the fix.
    """
    kind = device_kind(accelerator)
    if str(precision) == AUTO:
        ok, why = fast_bf16(kind)
        chosen = "bf16-mixed" if ok else "32-true"
        log.info(f"precision=auto: {chosen} ({why})")
        return chosen
    if str(precision) in _BF16_NAMES and kind == "cpu" and cpu_bf16_instructions() is None:
        log.warning(
            f"precision={precision}: this CPU has no bf16 instructions, so bf16 matmuls are "
            "emulated, often 50x slower than fp32; use precision=32-true or precision=auto"
        )
    return precision
