"""Environments for the environment tests (loaded by spec: `tests/agent_envs.py:Class`)."""

import json
import os

from rlhf.envs.calculator import Calculator
from rlhf.envs.guess_number import GuessNumber
from rlhf.envs.interface import StepResult

_resets = 0


def _count_reset() -> None:
    """The process dies (like `kill -9`) on reset number RLHF_TEST_CRASH_AT_RESET."""
    global _resets
    _resets += 1
    if _resets == int(os.environ.get("RLHF_TEST_CRASH_AT_RESET", "0")):
        os._exit(137)


class SeededGuess(GuessNumber):
    """Guess-the-number whose hidden number comes from the episode seed (the row gives only the range):
    a resumed run that lost the seed stream would play other games."""

    def reset(self, row, seed):
        _count_reset()
        return super().reset({"high": row["high"], "target": 1 + seed % int(row["high"])}, seed)


class RecordingCalculator(Calculator):
    """The calculator, noting each episode it starts (row and seed) in the file RLHF_TEST_RESET_LOG.<rank>:
    which episodes each process of a run played."""

    def reset(self, row, seed):
        _count_reset()
        if path := os.environ.get("RLHF_TEST_RESET_LOG"):
            with open(f"{path}.{os.environ.get('RANK', '0')}", "a") as f:
                f.write(json.dumps({"a": row["a"], "b": row["b"], "seed": seed}) + "\n")
        return super().reset(row, seed)


class Countdown:
    """A deterministic multi-turn environment whose every reply, reward and outcome the test can recompute:
    the agent takes `row["turns"]` turns; after each the environment reports what it read, as a `tool`
    turn (a tool call) when the message has a digit, else as a `user` turn; a turn's
    reward is its length mod 3, halved. Success: the agent's characters and the seed add up to an odd
    number; the last turn is answered with `over` (transcript only) and +1 on success."""

    def __init__(self, bonus: float = 1.0):
        self.bonus = bonus
        self.left = self.seed = self.chars = 0

    def reset(self, row, seed):
        self.left, self.seed, self.chars = int(row["turns"]), seed, 0
        return [{"role": "system", "content": "count"}, {"role": "user", "content": f"take {self.left} turns"}]

    def step(self, agent_message):
        self.left -= 1
        self.chars += len(agent_message)
        reward = (len(agent_message) % 3) / 2
        if self.left <= 0:
            success = (self.chars + self.seed) % 2 == 1
            return StepResult(reply=[{"role": "user", "content": "over"}], reward=reward + self.bonus * success,
                              done=True, info={"success": success})
        tool = any(c.isdigit() for c in agent_message)
        reply = {"role": "tool" if tool else "user", "content": f"{self.seed % 97}: {len(agent_message)} read"}
        return StepResult(reply=[reply], reward=reward, info={"tool_calls": int(tool)})
