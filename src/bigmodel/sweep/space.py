"""The search space: Hydra sweep syntax to Optuna distributions, and a trial back to overrides.

`hydra.sweeper.params` and sweep syntax on the command line (`choice`, `range`, `interval`,
`tag(log, ...)`) become Optuna distributions; every plain override is fixed for all trials. A
trial's parameters go back to the trial's job as Hydra override text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from bigmodel.errors import UserError


def _categorical(values: Sequence[Any]) -> CategoricalDistribution:
    # Optuna stores numbers, strings, booleans and None; anything else (lists, dicts) is kept as
    # its override text, which Hydra parses back unchanged.
    kept = [
        v if v is None or isinstance(v, (bool, int, float)) else Transformer.encode(v)
        for v in values
    ]
    return CategoricalDistribution(kept)


def distribution(override: Override) -> BaseDistribution:
    """An Optuna distribution from Hydra sweep syntax.

    `a,b,c` / `choice(a,b,c)` -> categorical; `range(1,9,2)` -> int (or stepped float);
    `interval(1e-4,1e-2)` -> float, `tag(log,interval(...))` -> log-uniform, int bounds -> int.
    """
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_choice_sweep():
        return _categorical(list(override.sweep_iterator(transformer=Transformer.identity)))
    if isinstance(value, RangeSweep):
        if value.shuffle or log_scale:
            return _categorical(list(override.sweep_iterator(transformer=Transformer.identity)))
        values = list(value.range())
        if not values:
            raise UserError(
                f"{override.input_line} is an empty range; give range(start, stop, step)"
            )
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=float(value.step))
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(
        f"{override.input_line} is not a search space; use choice(a,b), range(a,b,step), "
        "interval(a,b) or tag(log,interval(a,b))"
    )


def search_space(params: dict[str, Any] | None, arguments: Sequence[str]):
    """-> (distributions by override key, fixed task overrides).

    `hydra.sweeper.params` and sweep syntax on the command line both join the search space
    (the command line wins); every other argument is fixed for all trials.
    """
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    space = {o.get_key_element(): distribution(o) for o in parser.parse_overrides(lines)}
    fixed = []
    for o in parser.parse_overrides(list(arguments)):
        if o.is_sweep_override():
            space[o.get_key_element()] = distribution(o)
        else:  # a plain value fixes a key, taking it out of the search
            space.pop(o.get_key_element(), None)
            fixed.append(o.input_line)
    return space, fixed


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in params.items()]
