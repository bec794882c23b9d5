"""A built-in game with feedback: find a hidden number from higher/lower hints.

The agent says a number from 1 to `high`; the game master answers `higher` or `lower` (a user turn)
until the agent names the number or has used `max_guesses` guesses. Halving the range finds any
number up to 31 within 5 guesses. True objective: the number is found.

    env:
      spec: rlhf.envs.guess_number:GuessNumber
      options: {max_guesses: 5}
    rows: {"high": 16, "target": 11}    # builtin:guess_train, builtin:guess_eval; demonstrations builtin:guess_sft
"""

from __future__ import annotations

from rlhf.envs.interface import Message, StepResult
from rlhf.errors import UserError


def question(high: int) -> str:
    return f"Guess my number from 1 to {high}."


def hint(guess: int, target: int) -> str:
    """The game master's answer to a wrong guess."""
    return "higher" if target > guess else "lower"


class GuessNumber:
    """Find `target` in 1..`high` (reward 1 when found, 0 when the guesses run out)."""

    def __init__(self, max_guesses: int = 5):
        if max_guesses < 1:
            raise UserError(f"guess_number: max_guesses expects a positive integer, got {max_guesses}")
        self.max_guesses = max_guesses
        self.high = self.target = self.guesses = 0

    def reset(self, row: dict, seed: int) -> list[Message]:
        try:
            self.high, self.target = int(row["high"]), int(row["target"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"guess_number: expected a row with integers 'high' and 'target', got {str(row)[:80]}") \
                from None
        if not 1 <= self.target <= self.high:
            raise UserError(f"guess_number: target {self.target} is not in 1..{self.high}")
        self.guesses = 0
        return [{"role": "user", "content": question(self.high)}]

    def step(self, agent_message: str) -> StepResult:
        self.guesses += 1
        text = agent_message.strip()
        guess = int(text) if text.isdigit() and len(text) < 6 else None
        if guess == self.target:
            return StepResult(reply=[{"role": "user", "content": "correct"}], reward=1.0, done=True,
                              info={"success": True})
        if self.guesses >= self.max_guesses:
            return StepResult(reward=0.0, done=True, info={"success": False})
        reply = hint(guess, self.target) if guess is not None else f"say a number from 1 to {self.high}"
        return StepResult(reply=[{"role": "user", "content": reply}], info={"success": False})
