"""A built-in environment the agent needs: multiplication with a calculator tool.

The question ("What is 47 * 29?") is beyond what a small model can compute, but the tool is exact:
the agent writes `calc 47 * 29`, the tool answers `1363` in a `tool` turn, and the agent copies it.
Any other message is the agent's answer. True objective: the answer is exactly the product.

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


def tool_result(message: str) -> str | None:
    """The tool's reply to `message` if it is a call (the result, or `error` for a number too long), else None."""
    m = CALL.fullmatch(message.strip())
    if m is None:
        return None
    a, op, b = m.groups()
    if max(len(a), len(b)) > 12:  # keeps the tool's own work bounded
        return "error"
    return str(OPS[op](int(a), int(b)))


class Calculator:
    """Answer `a * b`, with a calculator tool (reward 1 for the exact product, 0 otherwise, at the answer)."""

    def __init__(self, reward_per_call: float = 0.0):
        self.reward_per_call = reward_per_call  # a shaping bonus for calling (0: only the outcome counts)
        self.answer = ""

    def reset(self, row: dict, seed: int) -> list[Message]:
        try:
            a, b = int(row["a"]), int(row["b"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"calculator: expected a row with integers 'a' and 'b', got {str(row)[:80]}") from None
        self.answer = str(a * b)
        return [{"role": "user", "content": question(a, b)}]

    def step(self, agent_message: str) -> StepResult:
        result = tool_result(agent_message)
        if result is not None:
            return StepResult(reply=[{"role": "tool", "content": result}], reward=self.reward_per_call or None,
                              info={"tool_calls": 1})
        success = agent_message.strip() == self.answer
        return StepResult(reward=float(success), done=True, info={"success": success})
