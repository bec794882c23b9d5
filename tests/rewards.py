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
    def score(self, prompts, responses, normalize=False):
        return torch.full((len(responses),), float("nan"))
