"""Programmatic rewards for the PPO tests (`tests/rewards.py:digit_fraction` as a reward spec)."""

import torch


def digit_fraction(prompts, responses):
    """Share of the response's characters that are digits: easy for PPO to raise, cheap to compute."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


class DigitReward:
    """The same as an object with the reward interface, for calling ppo.main directly."""

    def score(self, prompts, responses, normalize=False):
        return torch.tensor(digit_fraction(prompts, responses), dtype=torch.float32)


class NaNReward:
    """`DigitReward` with NaN for every other response: a reward that fails now and then (all NaN is an error)."""

    def score(self, prompts, responses, normalize=False):
        scores = torch.tensor(digit_fraction(prompts, responses), dtype=torch.float32)
        return scores.index_fill(0, torch.arange(0, len(responses), 2), float("nan"))


_calls = 0


def digit_fraction_then_crash(prompts, responses):
    """`digit_fraction`, but the process dies (like `kill -9`) on call number RLHF_TEST_CRASH_AT_CALL."""
    import os

    global _calls
    _calls += 1
    if _calls == int(os.environ.get("RLHF_TEST_CRASH_AT_CALL", "0")):
        os._exit(137)
    return digit_fraction(prompts, responses)


def response_chars(prompts, responses):
    """Length of the response in characters: differs between almost any two answers."""
    return [float(len(r)) for r in responses]


class LengthReward:
    """Characters per response / 100: every sampled token moves it, so even a random-init policy raises
    it within a few PPO steps (the vLLM engine tests start from one)."""

    def score(self, prompts, responses, normalize=False):
        return torch.tensor([len(r) / 100 for r in responses], dtype=torch.float32)
