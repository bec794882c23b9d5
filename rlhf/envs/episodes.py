"""Roll out a batch of multi-turn episodes, token in, token out.

    episodes = run_episodes(envs, rows, tokenizer, sample_fn, limits, seed)

`sample_fn(prompts) -> (sampled, logprobs)` is the seam to the generation engines: for each prompt (a
list of token ids) the ids it sampled, ending with EOS when the model stopped (anything after the first
EOS is dropped here), and their logprobs under the sampling distribution. It is called once per turn
with the episodes still live; the engine's own limit on new tokens is the per-turn limit.

Each episode's ids are: the first messages with the assistant header (`ChatTurns.prompt_ids`), then
for each turn the sampled ids as they were sampled and the environment's reply encoded once
(`ChatTurns.reply_ids`). The decoded agent text goes to the environment only; it is never encoded again.

An episode ends when the environment says `done`, or it is cut by a limit (`truncated`): a reply
without EOS (the engine's per-turn limit), `limits.max_total_tokens` (the sampled ids past it are
dropped; a reply that leaves no room for another agent token is not appended), or
`limits.max_turns` agent turns without `done`. A cut episode is treated like a single-turn reply
without EOS: the trainer may subtract its missing-EOS penalty (`contains_eos = ~truncated`), and GAE
does not bootstrap past the last agent token (the value after it is 0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlhf.envs.config import EnvConfig
from rlhf.envs.interface import (
    Environment,
    Message,
    check_messages,
    check_step,
    load_environment_class,
    make_environment,
)
from rlhf.envs.turns import ChatTurns
from rlhf.errors import UserError

SampleFn = Callable[[list[list[int]]], tuple[list[list[int]], list[list[float]]]]
"""(prompt id lists) -> (sampled id lists, their logprob lists), one of each per prompt."""


@dataclass(frozen=True)
class Episodes:
    """A batch of finished episodes. B episodes, T the longest one's tokens; rows are right-padded."""

    ids: torch.Tensor  # (B, T) long: first messages, agent turns and replies; PAD after the end
    attention_mask: torch.Tensor  # (B, T) long: 1 on the episode's tokens
    prompt_lengths: torch.Tensor  # (B,) long: tokens of the first messages and the first assistant header
    action_mask: torch.Tensor  # (B, T) bool: the agent's sampled tokens (policy, value, KL, entropy terms)
    logprobs: torch.Tensor  # (B, T) float32: the sampler's logprob of ids[b, t]; 0 off the action mask
    turn_ends: torch.Tensor  # (B, T) bool: the last token of each agent turn, where its reward sits
    turn_rewards: torch.Tensor  # (B, T) float32: the environment's reward of each turn at its last token
    returns: torch.Tensor  # (B,) float32: the sum of the turn rewards
    turns: torch.Tensor  # (B,) long: agent turns taken
    tool_calls: torch.Tensor  # (B,) long: `info["tool_calls"]` summed over the turns
    tokens: torch.Tensor  # (B,) long: the episode's tokens (= attention_mask.sum(1))
    success: torch.Tensor  # (B,) bool: the last `info["success"]` the environment gave (False if none)
    truncated: torch.Tensor  # (B,) bool: cut by a limit (see the module docstring), not ended by the environment
    transcripts: list[list[Message]]  # the conversations, agent turns decoded: for reading and reports
    seeds: list[int]  # the seed each episode was started with (`reset(row, seed)`)


@dataclass
class _Episode:
    """One live episode's state while the batch steps."""

    env: Environment
    seed: int
    messages: list[Message]
    ids: list[int]
    prompt_length: int
    actions: list[bool]
    logprobs: list[float]
    turn_ends: list[int]
    turn_rewards: list[float]
    turns: int = 0
    tool_calls: int = 0
    success: bool = False
    done: bool = False
    truncated: bool = False


def episode_seeds(seed: int, n: int) -> list[int]:
    """The seed of each of `n` episodes of a batch seeded `seed`."""
    rng = random.Random(seed)
    return [rng.randrange(2 ** 32) for _ in range(n)]


def _start(env: Environment, row: dict, seed: int, turns: ChatTurns, limits: EnvConfig, index: int) -> _Episode:
    try:
        first = env.reset(row, seed)
    except (KeyError, TypeError, ValueError) as e:  # a row without what the environment reads: the data's fault
        raise UserError(f"row {index}: environment '{limits.spec}' cannot start an episode from "
                        f"{str(row)[:80]} ({type(e).__name__}: {e})") from None
    messages = check_messages(first, f"environment '{limits.spec}': reset() of row {index}",
                              ("system", "user", "tool", "assistant"))
    ids = turns.prompt_ids(messages)
    if len(ids) >= limits.max_total_tokens:
        raise UserError(f"row {index}: the first messages take {len(ids)} tokens, leaving none of "
                        f"env.max_total_tokens={limits.max_total_tokens} for the agent")
    return _Episode(env=env, seed=seed, messages=list(messages), ids=ids, prompt_length=len(ids),
                    actions=[False] * len(ids), logprobs=[0.0] * len(ids), turn_ends=[], turn_rewards=[])


def _act(ep: _Episode, sampled: list[int], logprobs: list[float], turns: ChatTurns, limits: EnvConfig) -> None:
    """Append one agent turn to `ep`, step its environment, and append the reply (or end the episode)."""
    if len(sampled) != len(logprobs):
        raise ValueError(f"sample_fn returned {len(sampled)} ids but {len(logprobs)} logprobs for one prompt")
    if turns.eos_id in sampled:  # an engine may pad past EOS: the turn ends at the first one
        end = sampled.index(turns.eos_id) + 1
        sampled, logprobs = sampled[:end], logprobs[:end]
    room = limits.max_total_tokens - len(ep.ids)
    cut = len(sampled) > room
    sampled, logprobs = sampled[:room], logprobs[:room]
    ep.ids += sampled
    ep.actions += [True] * len(sampled)
    ep.logprobs += [float(x) for x in logprobs]
    ep.turns += 1
    stopped = bool(sampled) and sampled[-1] == turns.eos_id
    text = turns.tokenizer.decode(sampled[:-1] if stopped else sampled, skip_special_tokens=False)
    ep.messages.append({"role": "assistant", "content": text})
    if sampled:
        ep.turn_ends.append(len(ep.ids) - 1)
        ep.turn_rewards.append(0.0)
    if cut or not stopped:  # an unfinished reply is not shown to the environment
        ep.done = ep.truncated = True
        return
    result = check_step(ep.env.step(text), limits.spec)
    ep.turn_rewards[-1] = float(result.reward or 0.0)
    ep.tool_calls += int(result.info.get("tool_calls", 0))
    ep.success = bool(result.info.get("success", ep.success))
    ep.messages += result.reply
    if result.done:
        ep.done = True
        return
    reply = turns.reply_ids(result.reply)
    if ep.turns >= limits.max_turns or len(ep.ids) + len(reply) >= limits.max_total_tokens:
        ep.done = ep.truncated = True
        return
    ep.ids += reply
    ep.actions += [False] * len(reply)
    ep.logprobs += [0.0] * len(reply)


def _batch(episodes: list[_Episode], pad_id: int) -> Episodes:
    """Right-pad the episodes into tensors."""
    B, T = len(episodes), max(len(e.ids) for e in episodes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    action_mask = torch.zeros((B, T), dtype=torch.bool)
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    turn_ends = torch.zeros((B, T), dtype=torch.bool)
    turn_rewards = torch.zeros((B, T), dtype=torch.float32)
    for b, e in enumerate(episodes):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        attention_mask[b, :n] = 1
        action_mask[b, :n] = torch.tensor(e.actions)
        logprobs[b, :n] = torch.tensor(e.logprobs)
        turn_ends[b, e.turn_ends] = True
        turn_rewards[b, e.turn_ends] = torch.tensor(e.turn_rewards)
    return Episodes(
        ids=ids, attention_mask=attention_mask, action_mask=action_mask, logprobs=logprobs,
        prompt_lengths=torch.tensor([e.prompt_length for e in episodes]),
        turn_ends=turn_ends, turn_rewards=turn_rewards, returns=turn_rewards.sum(dim=1),
        turns=torch.tensor([e.turns for e in episodes]), tool_calls=torch.tensor([e.tool_calls for e in episodes]),
        tokens=attention_mask.sum(dim=1), success=torch.tensor([e.success for e in episodes]),
        truncated=torch.tensor([e.truncated for e in episodes]), transcripts=[e.messages for e in episodes],
        seeds=[e.seed for e in episodes])


def run_episodes(envs: Sequence[Environment], rows: Sequence[dict], tokenizer, sample_fn: SampleFn,
                 limits: EnvConfig, seed: int, *, seeds: Sequence[int] | None = None) -> Episodes:
    """Run one episode per (environment, row) to its end, stepping the live ones together; the episode
    of row i is seeded `episode_seeds(seed, B)[i]`, or `seeds[i]` when they are given."""
    if len(envs) != len(rows) or not rows:
        raise ValueError(f"expected one environment per row and at least one row, got {len(envs)} and {len(rows)}")
    seeds = episode_seeds(seed, len(rows)) if seeds is None else list(seeds)
    if len(seeds) != len(rows):
        raise ValueError(f"expected one seed per row, got {len(seeds)} for {len(rows)}")
    turns = ChatTurns(tokenizer)
    episodes = [_start(env, row, s, turns, limits, i) for i, (env, row, s) in enumerate(zip(envs, rows, seeds))]
    while live := [e for e in episodes if not e.done]:
        sampled, logprobs = sample_fn([list(e.ids) for e in live])
        if len(sampled) != len(live) or len(logprobs) != len(live):
            raise ValueError(f"sample_fn returned {len(sampled)} samples for {len(live)} prompts")
        for e, s, lp in zip(live, sampled, logprobs):
            _act(e, list(s), list(lp), turns, limits)
    return _batch(episodes, tokenizer.pad_token_id)


OUTCOMES = ("success", "return", "turns", "tool_calls", "tokens", "truncated")
"""What each episode ends with; their means over episodes are the evaluation's metrics (`eval/success`, ...)."""


def episode_values(ep: Episodes) -> dict[str, list[float]]:
    """Each episode's `OUTCOMES` as floats, by name: what the held-out evaluation gathers and averages."""
    tensors = (ep.success, ep.returns, ep.turns, ep.tool_calls, ep.tokens, ep.truncated)
    return {name: t.float().tolist() for name, t in zip(OUTCOMES, tensors)}


def outcome_means(records: Sequence[dict]) -> dict[str, float]:
    """The mean of each of `OUTCOMES` over episode records (`episode_records`)."""
    return {name: sum(float(r[name]) for r in records) / len(records) for name in OUTCOMES}


def episode_records(ep: Episodes) -> list[dict]:
    """Each episode as a JSON-able record: its seed, the whole transcript (the first messages, every agent
    turn with its reward and its sampled ids, EOS included when it stopped, every environment reply, a
    last one given with `done` included), its `OUTCOMES`, and all its token ids (each agent turn was
    sampled after the ids before it)."""
    records = []
    for b, transcript in enumerate(ep.transcripts):
        n = int(ep.tokens[b])
        ids, actions = ep.ids[b, :n].tolist(), ep.action_mask[b, :n].tolist()
        ends = ep.turn_ends[b, :n].nonzero().flatten().tolist()
        after = [int(ep.prompt_lengths[b]) - 1] + ends[:-1]  # each turn starts at the first action after these
        spans = [(next(t for t in range(a + 1, n) if actions[t]), end) for a, end in zip(after, ends)]
        # the agent's turns are the last `turns` assistant messages (replies are never assistant turns); a
        # turn that sampled nothing (only ever the last, which it ends) has no ids and no reward
        assistant = [i for i, m in enumerate(transcript) if m["role"] == "assistant"]
        agent = assistant[len(assistant) - int(ep.turns[b]):]
        messages = [dict(m) for m in transcript]
        for j, i in enumerate(agent):
            if j < len(spans):
                start, end = spans[j]
                messages[i].update(reward=float(ep.turn_rewards[b, end]), ids=ids[start:end + 1])
            else:
                messages[i].update(reward=0.0, ids=[])
        records.append({"seed": ep.seeds[b], "transcript": messages, "success": bool(ep.success[b]),
                        "return": float(ep.returns[b]), "turns": int(ep.turns[b]),
                        "tool_calls": int(ep.tool_calls[b]), "tokens": n, "truncated": bool(ep.truncated[b]),
                        "ids": ids})
    return records


class EnvPool:
    """The environments of a process: the class loaded once, one instance per episode slot, and the
    stream of batch seeds, whose state is all a checkpoint needs to resume the episodes exactly (an
    environment keeps nothing across episodes that `reset(row, seed)` does not set).

    Each process of a run has a stream of its own, derived from the seed and its rank: with one stream
    for all, every rank would start its i-th episode with the same seed, and an environment that draws
    its task from the seed would play the same games on every rank. Rank 0's stream is the one-process
    run's."""

    def __init__(self, cfg: EnvConfig, run_seed: int, rank: int = 0):
        if not cfg.spec:
            raise UserError("env.spec is empty: expected module:Class or path/to/file.py:Class")
        self.cfg = cfg
        self.cls = load_environment_class(cfg.spec)
        self.instances: list[Environment] = []
        seed = cfg.seed if cfg.seed is not None else run_seed
        self.rng = random.Random(seed if rank == 0 else f"{seed}/rank{rank}")  # a str seeds through sha512

    def environments(self, n: int) -> list[Environment]:
        """`n` instances, made on first need and reused (each `reset` starts afresh)."""
        while len(self.instances) < n:
            self.instances.append(make_environment(self.cls, self.cfg))
        return self.instances[:n]

    def run(self, rows: Sequence[dict], tokenizer, sample_fn: SampleFn) -> Episodes:
        """One episode per row, seeded from the next seed of the stream."""
        return run_episodes(self.environments(len(rows)), rows, tokenizer, sample_fn, self.cfg,
                            self.rng.randrange(2 ** 32))

    def state_dict(self) -> dict:
        """JSON-able state: the seed stream's position."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


@dataclass(frozen=True)
class PromptAndRest:
    """An episode batch laid out as PPO's prompt + response: the first messages left-padded (B, P), the rest
    of each episode (agent turns and environment replies) right-padded (B, A)."""

    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P) long
    responses: torch.Tensor  # (B, A): agent turns and environment replies, PAD after the episode's end
    response_mask: torch.Tensor  # (B, A) bool: the episode's tokens after the first messages
    action_mask: torch.Tensor  # (B, A) bool: the agent's sampled tokens among them
    logprobs: torch.Tensor  # (B, A) float32: the sampler's, 0 off the action mask
    turn_rewards: torch.Tensor  # (B, A) float32: each turn's environment reward at its last token


def split_at_prompt(ep: Episodes, pad_id: int) -> PromptAndRest:
    """`ep` (right-padded (B, T)) as prompt + rest, the layout the PPO forward passes and losses use."""
    B = len(ep.ids)
    P = int(ep.prompt_lengths.max())
    A = max(int((ep.tokens - ep.prompt_lengths).max()), 1)
    query_ids = torch.full((B, P), pad_id, dtype=torch.long)
    query_mask = torch.zeros((B, P), dtype=torch.long)
    responses = torch.full((B, A), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, A), dtype=torch.bool)
    action_mask = torch.zeros((B, A), dtype=torch.bool)
    logprobs = torch.zeros((B, A), dtype=torch.float32)
    turn_rewards = torch.zeros((B, A), dtype=torch.float32)
    for b in range(B):
        p, n = int(ep.prompt_lengths[b]), int(ep.tokens[b])
        query_ids[b, P - p:], query_mask[b, P - p:] = ep.ids[b, :p], 1
        rest = slice(p, n)
        responses[b, :n - p], response_mask[b, :n - p] = ep.ids[b, rest], True
        action_mask[b, :n - p] = ep.action_mask[b, rest]
        logprobs[b, :n - p] = ep.logprobs[b, rest]
        turn_rewards[b, :n - p] = ep.turn_rewards[b, rest]
    return PromptAndRest(query_ids, query_mask, responses, response_mask, action_mask, logprobs, turn_rewards)


class EngineSampler:
    """A `sample_fn` over a generation engine (`rlhf.generation.engine.Engine`): one `generate` per turn
    with `sampling` (its `max_new_tokens` is the per-turn limit). `seed` None: the engine's own stream
    (torch's generator for HF, which a checkpoint restores); else turn k is drawn with seed + k, so an
    evaluation repeats exactly. `recorded` turns False when the engine returned no logprobs (the
    trainer's forward pass gives them; zeros are handed to the runner meanwhile)."""

    def __init__(self, engine, sampling, seed: int | None = None):
        self.engine, self.sampling, self.seed = engine, sampling, seed
        self.calls, self.recorded = 0, True

    def __call__(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        seed = None if self.seed is None else self.seed + self.calls
        self.calls += 1
        gen = self.engine.generate(prompts, self.sampling, seed=seed)
        ids, mask = gen.response_ids.cpu(), gen.response_mask.cpu()  # (B, A)
        logprobs = gen.logprobs.float().cpu() if gen.logprobs is not None else torch.zeros(ids.shape)
        self.recorded = self.recorded and gen.logprobs is not None
        return ([row[m].tolist() for row, m in zip(ids, mask)], [row[m].tolist() for row, m in zip(logprobs, mask)])


def load_rows(source: str, split: str = "train", column_map: dict[str, str] | None = None,
              max_samples: int | None = None) -> list[dict]:
    """The data rows episodes start from (`reset(row, seed)`), as dicts: a local file, `builtin:NAME` or a
    hub dataset, columns renamed by `column_map` ({column in the file: name read})."""
    from rlhf.data import sources

    ds = sources.rename_columns(sources.load_rows(source, split=split), column_map or {}, source)
    rows = [dict(r) for r in ds]
    return rows[:max_samples] if max_samples is not None else rows


def first_messages(transcript: list[Message]) -> list[Message]:
    """The messages before the agent's first turn."""
    k = next((i for i, m in enumerate(transcript) if m["role"] == "assistant"), len(transcript))
    return transcript[:k]


def transcript_text(transcript: list[Message]) -> str:
    """The agent turns and replies of a transcript as one line, for sample tables and logs."""
    rest = transcript[len(first_messages(transcript)):]
    return " | ".join(f"{m['role']}: {m['content']}" for m in rest)
