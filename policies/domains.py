"""What a config field accepts, declared on the field itself: its type carries its domain.

    eval_steps: PositiveInt[int] = 50
    save_steps: PositiveInt[Optional[int]] = None      # None: the field's documented default
    top_p: Probability[float] = 1.0
    label_smoothing: domain(lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")[float] = 0.0

Each alias is `Annotated[T, Domain(test, words), <help hint>]`: one place states the default (the field's
value) and the domain (its type), `rlhf.validate.validate` checks every field of any config against it
(parsed or built in Python), and `--help` shows the words after the default. A `Literal[...]` or `bool`
type is its own domain. Here, not in `rlhf`, because `policies` declares config fields too and never
imports `rlhf`; `rlhf.config` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, TypeVar

import tyro

T = TypeVar("T")


@dataclass(frozen=True)
class Domain:
    """The values a field accepts: `test(value)` is True for them; `words` says which, for errors and --help.
    None is always accepted where the type allows it (it means "the default" there)."""

    test: Callable[[Any], bool]
    words: str


def domain(test: Callable[[Any], bool], words: str):
    """A generic alias `X[T]` = T restricted to the values `test` accepts (see the module docstring)."""
    hint = tyro.conf.arg(help_behavior_hint=lambda default: f"(default: {default}; {words})")
    return Annotated[T, Domain(test, words), hint]


PositiveInt = domain(lambda v: v >= 1, "a positive integer")
NonNegativeInt = domain(lambda v: v >= 0, "an integer >= 0")
Positive = domain(lambda v: v > 0, "a number > 0")
NonNegative = domain(lambda v: v >= 0, "a number >= 0")
Fraction = domain(lambda v: 0 <= v < 1, "a fraction in [0, 1)")
Probability = domain(lambda v: 0 < v <= 1, "a number in (0, 1]")
Unit = domain(lambda v: 0 <= v <= 1, "a number in [0, 1]")
AnyNumber = domain(lambda v: True, "any finite number")  # floats are always checked finite
# numpy's and torch's generators take 32-bit seeds: a larger one fails inside set_seed
Seed = domain(lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")


def attention_implementation(name: str) -> bool:
    """A kernel transformers knows, or a hub kernel named owner/name (`kernels-community/flash-attn`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return "/" in name or name in ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())
