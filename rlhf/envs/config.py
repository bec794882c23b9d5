"""The `env` config section: which environment, its options, and the limits every episode runs under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from rlhf.config import PositiveInt, Seed


@dataclass
class EnvConfig:
    """A multi-turn environment the policy acts in (see `rlhf.envs.interface`)."""

    spec: str = ""
    """The environment class: `module:Class` or `path/to/file.py:Class` (as a reward function's spec)."""
    options: dict[str, Union[bool, int, float, str]] = field(default_factory=dict)
    """Keyword arguments the class is built with, e.g. `{max_value: 100}`."""
    max_turns: PositiveInt[int] = 4
    """Agent turns per episode at most; an episode still going after them is cut (`truncated`)."""
    max_total_tokens: PositiveInt[int] = 256
    """Tokens per episode at most (first messages, agent turns and replies); a turn that would pass it is
    cut there and the episode ends (`truncated`)."""
    seed: Seed[Optional[int]] = None
    """Seed of the stream of episode seeds; None: the run's seed."""
