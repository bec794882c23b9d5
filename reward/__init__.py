"""Models and functions that judge: reward models, classifiers, Python reward functions.

`load_reward(spec)` gives any of them behind one interface, `Reward.score(prompts, responses)`.
"""

from reward.errors import RewardError
from reward.interface import (
    ClassifierReward,
    FunctionReward,
    PreferenceReward,
    Reward,
    load_reward,
)

__all__ = ["Reward", "RewardError", "load_reward", "PreferenceReward", "ClassifierReward", "FunctionReward"]
