"""The environment interface: a multi-turn task the policy (the agent) acts in, loaded by spec.

    class MyEnv:                                        # no base class needed: `Environment` is a Protocol
        def __init__(self, **options): ...              # `env.options` of the config
        def reset(self, row: dict, seed: int) -> list[dict]: ...   # the first messages
        def step(self, agent_message: str) -> StepResult: ...

    env:
      spec: my_envs.py:MyEnv                            # or module:Class, as a reward function's spec
      options: {max_value: 100}

An episode: `reset(row, seed)` starts it from a data row and returns the first messages (system and
user turns, `[{"role", "content"}]`), which the agent answers. Each `step(agent_message)` gets the
agent's reply as text (its sampled tokens decoded, without the EOS) and returns a `StepResult`: the
environment's reply (a `tool` result or a `user` turn; empty lets the agent speak again), a reward for
this turn (None: none), whether the episode is over, and `info`. The runner (`rlhf.envs.episodes`)
appends the reply's tokens, encoded once with the chat template, after the agent's sampled tokens; a
reply given with `done=True` goes into the transcript only, since no agent turn follows it.

Rules the runner relies on:
- An instance runs one episode at a time and `reset` starts it afresh: everything an episode depends
  on comes from `(row, seed)`. So a run resumes exactly from the seed stream alone (`EnvPool.state_dict`),
  with no environment state in the checkpoint.
- Environments run in the trainer's process, one instance per episode of a batch; a batch steps together.
- `info` keys the runner reads: `tool_calls` (int, summed over the turns) and `success` (bool, the last
  one given holds; the true objective the evaluation reports).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlhf.envs.config import EnvConfig
from rlhf.errors import UserError

Message = dict[str, str]
REPLY_ROLES = ("tool", "user", "system")  # never "assistant": the agent's turns are the sampled tokens


@dataclass(frozen=True)
class StepResult:
    """What the environment answers to one agent turn."""

    reply: list[Message] = field(default_factory=list)
    """The environment's turn(s): `tool` results or `user` messages; empty: none (the agent speaks again,
    or the episode is over)."""
    reward: float | None = None
    """This turn's reward, credited to the last token of the agent's turn; None: no reward (0)."""
    done: bool = False
    """The episode is over (solved, failed, or the environment's own turn limit)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything to log; the runner reads `tool_calls` (int) and `success` (bool)."""


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment (see the module docstring)."""

    def reset(self, row: dict, seed: int) -> list[Message]:
        """Start an episode from a data row: the first messages, which the agent answers."""
        ...

    def step(self, agent_message: str) -> StepResult:
        """The agent's reply (text, without EOS) -> the environment's reply, reward and whether it is over."""
        ...


def load_environment_class(spec: str) -> type:
    """The class named by `module:Class` or `path/to/file.py:Class`, checked to have `reset` and `step`."""
    from reward.errors import RewardError
    from reward.interface import import_spec

    try:
        module, name = import_spec(spec, "environment")
    except RewardError as e:  # the same one-line message, as the error type of this layer
        raise UserError(str(e)) from None
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        found = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_"))
        what = "is not a class" if cls is not None else "does not exist"
        raise UserError(f"environment '{spec}': '{name}' {what} (classes there: {', '.join(found) or 'none'})")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"environment '{spec}': class {name} has no {' and no '.join(missing)} method "
                        "(expected reset(row, seed) -> messages and step(agent_message) -> StepResult)")
    return cls


def make_environment(cls: type, cfg: EnvConfig) -> Environment:
    """One instance of `cls` built with `cfg.options`; options it does not take are a one-line error."""
    try:
        inspect.signature(cls).bind(**cfg.options)
    except TypeError as e:
        raise UserError(f"env.options {dict(cfg.options)} do not fit environment '{cfg.spec}' ({e})") from None
    return cls(**cfg.options)


def check_messages(messages: Any, where: str, roles: tuple[str, ...]) -> list[Message]:
    """`messages` as a list of {role, content} with roles among `roles`, or a one-line UserError."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages):
        raise UserError(f"{where}: expected a list of {{role: one of {', '.join(roles)}, content: text}}, "
                        f"got {str(messages)[:120]}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_step(result: Any, spec: str) -> StepResult:
    """An environment's `step` output checked: a StepResult with reply messages and a finite reward."""
    if not isinstance(result, StepResult):
        raise UserError(f"environment '{spec}': step() returned {type(result).__name__}, expected a StepResult")
    check_messages(result.reply, f"environment '{spec}': step() reply", REPLY_ROLES)
    if result.reward is not None and not (isinstance(result.reward, (int, float)) and math.isfinite(result.reward)):
        raise UserError(f"environment '{spec}': step() reward {result.reward!r} is not a finite number or None")
    return result

