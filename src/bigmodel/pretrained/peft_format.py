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


# -------------------------------------------------------------------------------------- in
# adapter_config.json settings whose other values compute something else than B A alpha / r
_PLAIN = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "rank_pattern": {}}
_PLAIN_TOO = {"alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None}


def base_folder(folder: str | Path) -> Path | None:
    """The base model folder of a PEFT adapter folder (its adapter_config.json's
    `base_model_name_or_path`); None for a folder without adapter_config.json."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e}); write it again with peft") from None
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(
            f"model.init_from={folder} holds PEFT adapters over base_model_name_or_path={base}, "
            f"which is no model folder here: set it in {path} to the base model's folder"
        )
    return Path(base)


def merge_peft(net: nn.Module, folder: str | Path) -> int:
    """Add the LoRA updates of a PEFT adapter folder into `net`'s weights (its base already
    loaded): what `PeftModel.merge_and_unload` gives. Returns the number of modules merged."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    for key, plain in {**_PLAIN, **_PLAIN_TOO}.items():
        if (config.get(key) or plain) != plain:
            raise UserError(
                f"{folder / CONFIG}: {key}={config[key]} is not supported (only {plain!r}); "
                "merge the adapters with peft and pass the merged folder"
            )
    if (folder / WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / WEIGHTS), device="cpu")
    elif (folder / "adapter_model.bin").is_file():
        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"model.init_from={folder} has {CONFIG} but no {WEIGHTS}")
    state = {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in state.items()
    }
    scaling = float(config["lora_alpha"]) / float(config["r"])
    family = family_for(net)
    used, merged = set(), 0
    with torch.no_grad():
        for i, block in enumerate(net.blocks):
            for layer, parts in family.modules(net.config).items():
                linear = block.get_submodule(layer)
                for module, start, end in parts:
                    key = f"base_model.model.{family.layer_prefix.format(i=i)}{module}"
                    a, b = state.get(f"{key}.lora_A.weight"), state.get(f"{key}.lora_B.weight")
                    if a is None or b is None:
                        continue
                    delta = (b.float() @ a.float()) * scaling  # (rows, in)
                    if delta.shape != (end - start, linear.in_features):
                        raise UserError(
                            f"{key} in {folder} is {tuple(delta.shape)}, but the base model's "
                            f"{module} is {(end - start, linear.in_features)}: another base"
                        )
                    linear.weight[start:end] += delta.to(linear.weight.dtype)
                    used.update((f"{key}.lora_A.weight", f"{key}.lora_B.weight"))
                    merged += 1
    extra = sorted(set(state) - used)
    if extra or not merged:
        what = f"{extra[0]} has no place in this model" if extra else "no adapter matches it"
        raise UserError(f"the PEFT adapters of model.init_from={folder}: {what}")
    return merged
