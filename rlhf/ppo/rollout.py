"""PPO's rollout: one iteration's experience, built once by `make_rollout` and only read afterwards.

  1. sample: `sample_responses` (the engine answers the prompts, the reward scores the answers) or, with an
     `env`, `sample_episodes` (multi-turn episodes in the environment, which gives the rewards); both
     give a `Sample` in one layout: the prompt (B, P) and the rest (B, A), with an action mask over the
     rest (single-turn: the response mask; episodes: the agent's tokens, not the environment's)
  2. forward passes: logprobs of the policy and the reference, values of the critic, entropy (all tokens)
  3. score: the reward (normalised, NaN-guarded, clipped, missing-EOS penalty)
  4. KL: the per-token KL estimate on the action tokens, and (with `kl_penalty: reward`) -kl_coef x KL in
     the per-token rewards; an environment's per-turn rewards at the end of each turn
  5. advantages by `ppo.advantage_estimator` over the action tokens (and GAE's returns)

Episodes: GAE steps over the agent's tokens across turns (`core.gae`
with the action mask), GRPO/RLOO take the trajectory's return (the sum of its rewards). An episode cut
by a limit counts as a response without EOS: `ppo.missing_eos_penalty` is subtracted at its last agent
token, and GAE does not bootstrap past it (the value after the last agent token is 0, as for a
single-turn response cut at max_new_tokens).

Shapes: B rollout batch, P prompt tokens, A response tokens, T = P + A."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from reward.interface import refuse_all_non_finite
from rlhf.errors import UserError
from rlhf.envs import credit
from rlhf.envs.episodes import EngineSampler, Episodes, first_messages, split_at_prompt, transcript_text
from rlhf.generation.engine import decode
from rlhf.generation.prompts import encode_prompts, position_ids
from rlhf.generation.sampling import Sampling
from rlhf.ppo import core
from rlhf.ppo.config import PPOHyperparameters

if TYPE_CHECKING:
    from rlhf.ppo.trainer import State


@dataclass(frozen=True)
class Rollout:
    """One iteration's experience on this process."""

    prompts: list  # B message lists
    texts: list  # B decoded responses, as the reward read them (episodes: the transcript after the prompt)
    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, A) padded after the stop token (episodes: agent turns and replies)
    response_mask: torch.Tensor  # (B, A) bool, the stop token included (episodes: every token after P)
    action_mask: torch.Tensor  # (B, A) bool: the policy's actions, where every loss and the KL count
    contains_eos: torch.Tensor  # (B,) bool: ended with the stop token (all True without one; episodes: not cut)
    logprobs: torch.Tensor  # (B, A) of the policy that sampled
    ref_logprobs: torch.Tensor  # (B, A)
    values: Optional[torch.Tensor]  # (B, A); None without a critic
    entropy: Optional[torch.Tensor]  # (B, A) of the policy; None when the sampler recorded none (episodes)
    raw_scores: torch.Tensor  # (B,) as the reward returned them
    nan_scores: torch.Tensor  # (B,) bool: the reward gave NaN/inf (counted as 0)
    scores: torch.Tensor  # (B,) after normalisation, clipping and EOS penalty
    kl: torch.Tensor  # (B, A) per-token KL estimate (0 outside the mask)
    turn_rewards: torch.Tensor  # (B, A) the environment's reward of each turn at its last token (0: single-turn)
    rewards: torch.Tensor  # (B, A)
    advantages: torch.Tensor  # (B, A)
    returns: Optional[torch.Tensor]  # (B, A); the value target (gae only)
    engine_logprob_diff: Optional[tuple[float, float]]  # mean and max |engine - trainer| logprob, all processes
    episodes: Optional[Episodes] = None  # the episodes (success, turns, tool calls, ...); None: single-turn
    logprobs_recorded: bool = False  # `logprobs` are the engine's, recorded as it sampled (no policy pass)

    @property
    def sequences(self):
        """(input_ids (B, T), attention_mask (B, T), position_ids (B, T)) of prompt + response."""
        ids = torch.cat([self.query_ids, self.responses], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask.long()], dim=1)
        return ids, mask, position_ids(mask)


def sampling(p: PPOHyperparameters, stop_id: Optional[int]) -> Sampling:
    """The rollouts' sampling options (the held-out evaluation starts from them too)."""
    return Sampling(p.temperature, p.top_p, p.max_new_tokens, stop_id)


@dataclass(frozen=True)
class Sample:
    """What step 1 hands on: the sampled tokens in PPO's layout and what the reward (or environment) gave."""

    prompts: list  # B message lists
    texts: list  # B texts for tables and logs
    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, A)
    response_mask: torch.Tensor  # (B, A) bool: the tokens after the prompt
    action_mask: torch.Tensor  # (B, A) bool: the sampled tokens among them
    contains_eos: torch.Tensor  # (B,) bool
    engine_logprobs: Optional[torch.Tensor]  # (B, A) the sampler's, None when it gave none
    engine_entropy: Optional[torch.Tensor]  # (B, A) the sampler's per-step entropy, None when it gave none
    raw_scores: torch.Tensor  # (B,) the whole response's or episode's reward, as given
    turn_rewards: torch.Tensor  # (B, A) the part of it placed at turn ends (zeros: all at the last token)
    episodes: Optional[Episodes] = None


def sample_responses(s: State, prompts: list, clock) -> Sample:
    """Single-turn: the engine answers `prompts` (B message lists), the reward scores the answers."""
    p, tok = s.cfg.ppo, s.tokenizer
    gen = s.engine.generate(encode_prompts(tok, prompts, p.max_prompt_length), s.sampling)
    clock.lap("time/generate")
    texts = decode(tok, gen)
    raw = torch.as_tensor(s.reward.score(prompts, texts), dtype=torch.float32).to(s.accelerator.device)
    clock.lap("time/score")
    return Sample(prompts, texts, gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask,
                  gen.response_mask, gen.stopped, gen.logprobs, gen.entropy, raw,
                  torch.zeros(gen.response_mask.shape, device=raw.device))


def sample_episodes(s: State, rows: list, clock) -> Sample:
    """Multi-turn: one episode per data row in the run's environments, each turn sampled by the engine
    (ppo.max_new_tokens per turn); the environment's rewards are the reward (no reward model)."""
    sampler = EngineSampler(s.engine, s.sampling)
    ep = s.env_pool.run(rows, s.tokenizer, sampler)
    clock.lap("time/generate")
    lay = split_at_prompt(ep, s.tokenizer.pad_token_id)
    dev = s.accelerator.device
    turn_rewards = lay.turn_rewards.to(dev)
    return Sample(prompts=[first_messages(t) for t in ep.transcripts], texts=[transcript_text(t) for t in ep.transcripts],
                  query_ids=lay.query_ids.to(dev), query_mask=lay.query_mask.to(dev), responses=lay.responses.to(dev),
                  response_mask=lay.response_mask.to(dev), action_mask=lay.action_mask.to(dev),
                  contains_eos=~ep.truncated.to(dev), engine_logprobs=lay.logprobs.to(dev) if sampler.recorded else None,
                  engine_entropy=None,
                  raw_scores=turn_rewards.sum(-1), turn_rewards=turn_rewards, episodes=ep)


def make_rollout(s: State, items: list, step: int, clock) -> Rollout:
    """Steps 1-5 above on this process's `items` (B prompts, or data rows with an env); `clock` marks
    each phase's time."""
    p, acc = s.cfg.ppo, s.accelerator
    # 1. sample (the policy's logprobs come with it when the engine records them), and score
    x = s.sample(s, items, clock)
    responses, action_mask = x.responses, x.action_mask
    # 2. forward passes over every token, at the sampling temperature
    ids = torch.cat([x.query_ids, responses], 1)
    mask = torch.cat([x.query_mask, x.response_mask.long()], 1)
    recompute = not p.logprobs_from_generation or x.engine_logprobs is None  # an engine that records none
    logprobs, ref_logprobs, values, entropy = forward_rollout(
        s.model, ids, mask, position_ids(mask), responses, x.query_ids.shape[1], p.temperature, s.sizes.forward,
        entropy=True, policy=recompute)
    if not recompute:
        logprobs, entropy = x.engine_logprobs, x.engine_entropy
    diff = engine_agreement(x.engine_logprobs, logprobs, action_mask, acc, step, s.cfg.vllm.max_logprob_diff) \
        if recompute and x.engine_logprobs is not None else None
    clock.lap("time/forward")
    # 3. the score credited at the last action: what the turn rewards did not place (single-turn: all of it)
    scores, nan = score(x.raw_scores - x.turn_rewards.sum(-1), x.contains_eos, s, step)
    # 4. KL on the actions, and the KL-penalised per-token rewards (turn rewards at the turns' ends)
    kl = core.kl_estimate(logprobs, ref_logprobs, p.kl_estimator) * action_mask
    kl_in_reward = s.kl_ctl.value if p.kl_penalty == "reward" else 0.0
    rewards = credit.token_rewards(x.turn_rewards, scores, kl, action_mask, kl_in_reward)
    # 5. advantages over the actions
    sum_over_processes = (lambda t: acc.reduce(t, "sum")) if s.sizes.world > 1 else None  # noqa: E731
    adv, returns = advantages(rewards, values, action_mask, p, sum_over_processes)
    return Rollout(prompts=x.prompts, texts=x.texts, query_ids=x.query_ids, query_mask=x.query_mask,
                   responses=responses, response_mask=x.response_mask, action_mask=action_mask,
                   contains_eos=x.contains_eos, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                   entropy=entropy, raw_scores=x.raw_scores, nan_scores=nan, scores=scores, kl=kl,
                   turn_rewards=x.turn_rewards, rewards=rewards, advantages=adv, returns=returns,
                   engine_logprob_diff=diff, episodes=x.episodes, logprobs_recorded=not recompute)


def score(raw: torch.Tensor, contains_eos: torch.Tensor, s: State, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), nan (B,) bool): the raw rewards (B,) normalised (`s.normalization`), NaN/inf counted as
    0, clipped, and penalised where the response never stopped."""
    p = s.cfg.ppo
    if s.normalization == "model":  # the stored statistics applied to the one scoring pass
        mean, std = s.reward.normalization
        scores = (raw - mean) / std
    else:
        scores = raw.clone()
    every = s.accelerator.gather(scores)  # (world * B,): one gather serves the NaN check and the statistics
    refuse_all_non_finite(every, s.reward, s.reward_name)  # every process, or none, stops
    nan = ~torch.isfinite(scores)
    if nan.any():
        warnings.warn(f"step {step}: {int(nan.sum())} reward(s) are NaN/inf; they count as 0 this step")
        scores = scores.masked_fill(nan, 0.0)
    if s.normalization == "running":
        s.moments.update(every.masked_fill(~torch.isfinite(every), 0.0))
        scores = (scores - s.moments.mean) / max(s.moments.std, 1e-8)
    if p.reward_clip is not None:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    return core.missing_eos_penalty(scores, contains_eos, p.missing_eos_penalty), nan


def engine_agreement(engine_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor, accelerator, step: int,
                     max_diff: float, engine: str = "the vLLM engine") -> tuple[float, float]:
    """Is the engine sampling from the policy's weights? (mean, max) |engine - trainer| logprob of the
    sampled tokens over every process; a mean above `max_diff` stops the run rather than train off-policy."""
    from rlhf.generation.vllm_engine import EngineError, logprob_diff

    diff_mean, diff_max = logprob_diff(engine_lp, trainer_lp, mask)
    diffs = accelerator.gather(torch.tensor([[diff_mean, diff_max]], device=accelerator.device))
    mean, worst = diffs[:, 0].mean().item(), diffs[:, 1].max().item()
    if mean > max_diff:
        raise EngineError(
            f"step {step}: the sampled-token logprobs of {engine} differ from the policy's by {mean:.4g} nats on "
            f"average (max {worst:.4g}), above vllm.max_logprob_diff={max_diff}: it is not sampling from the "
            "policy's weights (a stale sync, a dtype gap: vllm.dtype, or logits changed before sampling); the run "
            "stops rather than train off-policy")
    return mean, worst


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float):
    """logits (B, A + 1, V) of the last A + 1 positions (the model called with logits_to_keep=A + 1)
    -> logprobs of the response tokens (B, A) at the sampling temperature (divided after the upcast)."""
    return core.logprobs_from_logits(logits[:, :-1], responses, temperature)


@torch.no_grad()
def forward_rollout(ac, ids, mask, pos, responses, prompt_len, temperature, chunk, entropy: bool = False,
                    policy: bool = True, critic: bool = True):
    """Policy and reference logprobs and critic values (each (B, A); values None without a critic, or
    with `critic=False`), `chunk` rows at a time, and with `entropy` the policy's entropy per token (B, A)
    (else None): measured here, once per rollout, rather than in every training forward, where it would
    cost a softmax over (B, A, V) per micro-batch. `policy=False`: the policy's logprobs came from
    generation; no policy pass (logprobs and entropy None)."""
    lp, ref_lp, vals, ent = [], [], [], []
    for i in range(0, ids.shape[0], chunk):
        s = slice(i, i + chunk)
        keep = responses.shape[1] + 1
        logits, values = ac(ids[s], mask[s], pos[s], logits_to_keep=keep, values_only=not policy, values=critic)
        if policy:
            lp.append(response_logprobs(logits, responses[s], temperature))
        if entropy and policy:
            ent.append(core.entropy_from_logits(logits[:, :-1], temperature))
        if values is not None:  # None: a critic-free model
            vals.append(values[:, prompt_len - 1:-1].float())
        del logits
        ref_logits, _ = ac(ids[s], mask[s], pos[s], reference=True, logits_to_keep=keep)
        ref_lp.append(response_logprobs(ref_logits, responses[s], temperature))
    return ((torch.cat(lp) if policy else None), torch.cat(ref_lp), (torch.cat(vals) if vals else None),
            (torch.cat(ent) if ent else None))


def advantages(rewards: torch.Tensor, values: Optional[torch.Tensor], response_mask: torch.Tensor,
               p: PPOHyperparameters, all_reduce=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(advantages (B, A), returns (B, A) or None) of the per-token rewards (B, A) by
    `p.advantage_estimator`; the math is in ppo_core. rloo/grpo credit every token of a response with its
    sequence advantage (the sum of its rewards: score minus the KL penalty, against the group's baseline);
    gae and reinforce_pp are whitened over the global batch when `p.whiten_advantages` (for reinforce_pp
    that normalisation is its baseline)."""
    mask = response_mask.bool()
    est = p.advantage_estimator
    returns = None
    if est == "gae":
        adv, returns = core.gae(rewards, values, mask, p.gamma, p.lam)
    elif est == "reinforce_pp":
        adv = core.returns_to_go(rewards, mask, p.gamma)
    else:
        sequence = core.sequence_returns(rewards, mask)  # (B,)
        seq_adv = (core.rloo_advantages(sequence, p.samples_per_prompt) if est == "rloo" else
                   core.grpo_advantages(sequence, p.samples_per_prompt, p.grpo_std_normalization))
        return core.spread(seq_adv, mask), None
    if p.whiten_advantages:  # over the global batch (N+ details), not each process's slice
        adv = core.masked_whiten(adv, mask, all_reduce=all_reduce)
    return adv, returns


def reward_normalization(setting: str, reward, is_main: bool) -> str:
    """`none`, `running` or `model`: what `ppo.reward_normalization` resolves to for this reward."""
    stored = getattr(reward, "normalization", None)
    if setting == "auto":
        setting = "model" if stored is not None else "running"
        if is_main:
            print(f"ppo.reward_normalization=auto: {setting} (" + ("the reward's stored mean and std" if stored
                  else "the reward stores no statistics; running mean and std of this run") + ")")
    elif setting == "model" and stored is None:
        raise UserError("ppo.reward_normalization=model: the reward stores no normalisation statistics (a "
                        "function, or a model trained elsewhere); use `running`, `none` or `auto`")
    return setting
