"""Credit over a multi-turn episode: which tokens are actions, where rewards sit, advantages over actions.

Pure torch, on the whole episode layout of `rlhf.envs.episodes.Episodes`: tensors (B, T) over the first
messages, the agent's turns and the environment's replies, with an action mask (B, T) that is 1 on the
agent's sampled tokens only. Environment tokens are context, not actions: they get no reward, no
advantage, no return, and the losses (policy, value, KL, entropy) are averaged over the action mask.

- `token_rewards`: the KL penalty on each agent token, each turn's environment reward on the last token
  of that turn, and an episode score (a reward model's or a function's, if any) on the last agent token.

The advantages need nothing of their own: the estimators of `rlhf.ppo.core` run on the action mask.
`core.gae` skips masked positions, so its steps are the agent's tokens only, across turns (the value after
an agent token is the value of the NEXT agent token, the environment's reply between two turns skipped;
gamma and lam apply once per agent token; no bootstrap after the last agent token, also for an episode cut
by a limit, as for a single-turn reply without EOS); `core.returns_to_go` is REINFORCE++'s per-token return
over the same tokens; `core.sequence_returns` is the whole episode's return that GRPO and RLOO compare, and
`core.spread` puts one advantage per episode on its agent tokens (tests/test_credit.py checks each against
loops over the agent's tokens).

Shapes: B episodes, T tokens of the longest episode (prompt and all turns).
"""

import torch



def turn_ends(action_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True on the last token of each run of agent tokens (each agent turn's last token)."""
    mask = action_mask.bool()
    next_is_action = torch.zeros_like(mask)
    next_is_action[:, :-1] = mask[:, 1:]
    return mask & ~next_is_action


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,) long: the index of each row's last agent token; -1 for a row without one."""
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)  # (T,)
    return torch.where(action_mask.bool(), positions, -1).max(dim=1).values


def token_rewards(turn_rewards: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """The reward of every agent token.

    turn_rewards (B, T): the environment's reward of each turn at the last token of that turn (as in
    `Episodes.turn_rewards`); scores (B,): an episode score credited to the last agent token (zeros for
    none); kl (B, T): a per-token KL estimate; -> rewards (B, T), 0 off the action mask. The per-token KL
    penalty -kl_coef * kl counts on agent tokens only: environment tokens were not chosen by the policy.
    A row without an agent token gets nothing (no action to credit).
    """
    mask = action_mask.bool()
    rewards = torch.where(mask, -kl_coef * kl + turn_rewards, 0)  # (B, T)
    last = last_action_index(mask)  # (B,)
    score = torch.where(last >= 0, scores, 0).to(rewards.dtype)  # (B,)
    return rewards.scatter_add(1, last.clamp_min(0).unsqueeze(1), score.unsqueeze(1))
