"""One pass that checks every field of a config against the domain declared on the field, before a stage
writes anything. A value the trainer would only discover late (an `eval_steps` of 0 dividing by zero, a NaN
learning rate, an unknown scheduler) or would silently reinterpret (a negative `max_samples`, a zero
`forward_batch_size`) is a one-line UserError naming the field, the value and what was expected.

Where the domains are: on the fields' types (`eval_steps: PositiveInt[int] = 50`, see `policies.domains`,
re-exported by `rlhf.config`). A `Literal[...]` type accepts only its names (also for configs built in
Python); every float must be finite, also inside mappings (`weights`); `None` is accepted wherever the type
allows it. The rules between fields are each stage's `check()`, which calls `validate` first; the one rule
inside a section that several commands share (the tiny model's head counts) runs here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Iterator, Literal

from policies.config import TinyModelConfig
from policies.domains import Domain
from rlhf.errors import UserError


def _members(tp: Any) -> tuple:
    """`tp` and, for a union (`Optional[...]`), its members."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return (tp, *typing.get_args(tp))
    return (tp,)


def domain_of(tp: Any) -> Domain | None:
    """The Domain declared on a field's type (`Annotated[T, Domain(...), ...]`, possibly inside Optional)."""
    for member in _members(tp):
        if typing.get_origin(member) is typing.Annotated:
            found = next((m for m in member.__metadata__ if isinstance(m, Domain)), None)
            if found is not None:
                return found
            return domain_of(typing.get_args(member)[0])
    return None


def literal_names(tp: Any) -> tuple | None:
    """The names a `Literal[...]` (or `Optional[Literal[...]]`, or `Union[Literal[...], bool]`) type
    accepts; None for other types."""
    members = _members(typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp)
    for member in members:
        if typing.get_origin(member) is Literal:
            return typing.get_args(member) + ((True, False) if bool in members else ())
    return None


def fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, type with its annotations) of every field of the config class `cls` that is not a
    section, sections walked in order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _accepts(check: Domain, value: Any) -> bool:
    try:
        return bool(check.test(value))
    except (TypeError, ValueError):  # a config built in Python with a value of another type
        return False


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of the dataclass `cfg` (and of its sections) against its declared domain."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, name + ".")
            continue
        if value is None:
            continue
        tp = hints[f.name]
        names = literal_names(tp)
        if names is not None and value not in names:
            raise UserError(f"{name}: unknown value {value!r}; expected one of {', '.join(map(str, names))}")
        if isinstance(value, dict):  # a mapping's numbers (HelpSteer2 attribute weights) are finite too
            bad = [k for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise UserError(f"{name}.{bad[0]} must be a finite number, got {value[bad[0]]}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
        check = domain_of(tp)
        if check is not None and not _accepts(check, value):
            raise UserError(f"{name} must be {check.words}, got {value!r}")
    if isinstance(cfg, TinyModelConfig):
        _tiny_heads(cfg, prefix)


def _tiny_heads(cfg: TinyModelConfig, prefix: str) -> None:
    """The tiny Llama's attention shapes: heads split hidden_size, key/value heads group the heads, and
    rotary embeddings need an even head dimension (else a shape error deep in the first forward)."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"{prefix}hidden_size ({cfg.hidden_size}) must be divisible by {prefix}num_attention_heads "
                        f"({cfg.num_attention_heads})")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UserError(f"{prefix}num_attention_heads ({cfg.num_attention_heads}) must be divisible by "
                        f"{prefix}num_key_value_heads ({cfg.num_key_value_heads})")
    if (cfg.hidden_size // cfg.num_attention_heads) % 2:
        raise UserError(f"{prefix}hidden_size / {prefix}num_attention_heads = "
                        f"{cfg.hidden_size // cfg.num_attention_heads} must be even (rotary embeddings)")


def fits_tiny(model: Any, need: int, what: str) -> None:
    """A stage on the built-in tiny model: its sequences (`need` tokens, the fields named by `what`) fit the
    model's positions (beyond them rotary embeddings extrapolate without an error, and the model is silently
    trained out of its range)."""
    limit = model.tiny.max_position_embeddings
    if model.name_or_path == "tiny" and need > limit:
        raise UserError(f"{what} ({need}) exceeds model.tiny.max_position_embeddings ({limit})")
