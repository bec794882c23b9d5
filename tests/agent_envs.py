"""Environments for the PPO-on-environments tests (loaded by spec: `tests/agent_envs.py:Class`)."""

import os

from rlhf.envs.guess_number import GuessNumber

_resets = 0


class SeededGuess(GuessNumber):
    """Guess-the-number whose hidden number comes from the episode seed (the row gives only the range):
    a resumed run that lost the seed stream would play other games. The process dies (like `kill -9`)
    on reset number RLHF_TEST_CRASH_AT_RESET."""

    def reset(self, row, seed):
        global _resets
        _resets += 1
        if _resets == int(os.environ.get("RLHF_TEST_CRASH_AT_RESET", "0")):
            os._exit(137)
        return super().reset({"high": row["high"], "target": 1 + seed % int(row["high"])}, seed)
