"""A built-in environment the agent needs: multiplication with a calculator tool.

The question ("What is 47 * 29?") is beyond what a small model can compute, but the tool is exact:
the agent writes `calc 47 * 29`, the tool answers `1 3 6 3` in a `tool` turn, and the agent copies it.
Any other message is the agent's answer. True objective: the answer is exactly the product, written as
the tool writes numbers (digits spaced by default; `spaced_digits: false` for `1363`).

    env:
      spec: rlhf.envs.calculator:Calculator
    rows: {"a": 47, "b": 29}     # builtin:calc_train, builtin:calc_eval; demonstrations builtin:calc_sft
"""

from __future__ import annotations

import re

from rlhf.envs.interface import Message, StepResult
from rlhf.errors import UserError

CALL = re.compile(r"calc (-?\d+) ([-+*]) (-?\d+)")
"""A tool call: the whole agent message, e.g. `calc 47 * 29`."""
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}?"


def call(a: int, b: int) -> str:
    """The tool call that computes the answer to `question(a, b)`."""
    return f"calc {a} * {b}"


def render(n: int, spaced_digits: bool = True) -> str:
    """A number as the tool writes it and the answer must be: `1 3 6 3` with spaced digits, else `1363`.
    Spaced, each digit is one token of the tiny tokenizer, so copying the result is copying digits, the
    same ten tokens every time, rather than BPE pieces that split each number its own way (`13 6 3`,
    `2 40 1`); the tiny model learns to copy them from the demonstrations far more reliably."""
    return " ".join(str(n)) if spaced_digits else str(n)


def tool_result(message: str, spaced_digits: bool = True) -> str | None:
    """The tool's reply to `message` if it is a call (the result, or `error` for a number too long), else None."""
    m = CALL.fullmatch(message.strip())
    if m is None:
        return None
    a, op, b = m.groups()
    if max(len(a), len(b)) > 12:  # keeps the tool's own work bounded
        return "error"
    return render(OPS[op](int(a), int(b)), spaced_digits)


class Calculator:
    """Answer `a * b`, with a calculator tool (reward 1 for the exact product, 0 otherwise, at the answer)."""

    def __init__(self, reward_per_call: float = 0.0, spaced_digits: bool = True):
        self.reward_per_call = reward_per_call  # a shaping bonus for calling (0: only the outcome counts)
        self.spaced_digits = spaced_digits  # how the tool writes numbers, and so how the answer must be written
        self.answer = ""

    def reset(self, row: dict, seed: int) -> list[Message]:
        try:
            a, b = int(row["a"]), int(row["b"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"calculator: expected a row with integers 'a' and 'b', got {str(row)[:80]}") from None
        self.answer = render(a * b, self.spaced_digits)
        return [{"role": "user", "content": question(a, b)}]

    def step(self, agent_message: str) -> StepResult:
        result = tool_result(agent_message, self.spaced_digits)
        if result is not None:
            return StepResult(reply=[{"role": "tool", "content": result}], reward=self.reward_per_call or None,
                              info={"tool_calls": 1})
        success = agent_message.strip() == self.answer
        return StepResult(reward=float(success), done=True, info={"success": success})
