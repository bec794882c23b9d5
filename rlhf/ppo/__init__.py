"""PPO for language models (`rlhf ppo`), and the critic-free estimators (GRPO, RLOO, REINFORCE++).

`rlhf.ppo.main` and the config classes keep their import paths for users' scripts. They are loaded on
first use, so `rlhf.ppo.core` (the pure math) imports without the trainer and what it pulls in."""

_CONFIGS = ("PPOConfig", "PPOHyperparameters", "PromptDataConfig", "RewardSpec")


def __getattr__(name: str):
    if name == "main":
        from rlhf.ppo.trainer import main

        return main
    if name in _CONFIGS:
        from rlhf.ppo import config

        return getattr(config, name)
    raise AttributeError(f"module 'rlhf.ppo' has no attribute {name!r}")
