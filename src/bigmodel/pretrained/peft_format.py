"""LoRA adapters out in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)` loads over the
Hugging Face folder the run started from (`model.init_from`), computing what our adapted net does.

Our adapters sit on fused layers (q, k, v in `attn.qkv`; gate, up in a SwiGLU's `mlp.fc`), PEFT's
on the family's own modules (`q_proj`, ...); the family's adapter says which rows of our layer
each module is (`Family.modules`). Each module gets the adapters whose rows it holds: an adapter
of the whole fused layer gives every module its shared A and its own rows of B; adapters of
several roles that one module holds (q and v of GPT-2's `c_attn`) are stacked along the rank,
each B on its own rows (zeros on the others). The stacked rank is the same for every module
(unused columns are zeros) and `lora_alpha` is scaled with it, so alpha / rank, and the
function, stay ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import UserError
from bigmodel.files import readable_as_any_file
from bigmodel.pretrained.hf import family_for
from bigmodel.pretrained.lora import LoRALinear, SlicedLoRALinear

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def pieces(linear: LoRALinear) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """An adapted layer's adapters as (first row, end row, A (r, in), B (rows, r))."""
    if isinstance(linear, SlicedLoRALinear):
        return [(s, e, linear.lora_a[r], linear.lora_b[r]) for r, (s, e) in linear.rows.items()]
    return [(0, linear.out_features, linear.lora_a, linear.lora_b)]


def module_adapters(net: nn.Module) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The family's module names (`model.layers.0.self_attn.q_proj`) -> their (A, B) adapters."""
    family = family_for(net)
    layout = family.modules(net.config)
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, block in enumerate(net.blocks):
        for layer, parts in layout.items():
            linear = block.get_submodule(layer)
            if not isinstance(linear, LoRALinear):
                continue
            for module, start, end in parts:
                name = family.layer_prefix.format(i=i) + module
                for s, e, a, b in pieces(linear):
                    if s <= start and end <= e:  # the adapter spans the module: its rows of B
                        out.setdefault(name, []).append((a, b[start - s : end - s]))
                    elif start <= s and e <= end:  # the module holds the adapter's rows
                        full = b.new_zeros(end - start, b.shape[1])
                        full[s - start : e - start] = b
                        out.setdefault(name, []).append((a, full))
                    elif s < end and start < e:
                        raise UserError(
                            f"format=peft: the adapter rows {s}-{e} of blocks.{i}.{layer} cross "
                            f"the rows of {module}; adapt whole layers or roles"
                        )
    return out


def export_peft(task: nn.Module, out_dir: Path) -> None:
    """Write the net's LoRA adapters to `out_dir` in the PEFT format (see the module docstring)."""
    from safetensors.torch import save_file

    net = getattr(task, "net", task)
    family = family_for(net)
    adapted = [m for m in net.modules() if isinstance(m, LoRALinear)]
    if not adapted:
        raise UserError(
            "format=peft writes LoRA adapters, and this checkpoint has none (model.lora.rank=0); "
            "use format=hf for the whole model"
        )
    run: dict[str, Any] = getattr(task, "run_config", None) or {}
    model = run.get("model") or {}
    lora = model.get("lora") or {}
    rank = next(iter(pieces(adapted[0])))[2].shape[0]
    alpha = adapted[0].scaling * rank
    adapters = module_adapters(net)
    stack = max(len(v) for v in adapters.values())
    state = {}
    for name, parts in adapters.items():
        pad = (stack - len(parts)) * rank  # the same rank for every module: zero columns
        a = torch.cat([p[0] for p in parts])  # (k r, in)
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([p[1] for p in parts], dim=1)  # (rows, k r): sum over k of B_k A_k
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        key = f"base_model.model.{name}"
        state[f"{key}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        state[f"{key}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    # the modules by their names within a layer: PEFT matches them at the end of the full names
    layout = family.modules(net.config).values()
    targets = sorted(
        {m for parts in layout for m, _, _ in parts if any(n.endswith("." + m) for n in adapters)}
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.get("init_from"),
        "r": stack * rank,
        "lora_alpha": alpha * stack,  # alpha / r unchanged
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": targets,
        "fan_in_fan_out": family.fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    readable_as_any_file(out_dir / WEIGHTS)
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
