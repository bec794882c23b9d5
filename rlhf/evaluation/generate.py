"""`rlhf generate`: sample a model on prompts and write the responses as JSON Lines, to look at a model.

    rlhf generate --model runs/quickstart/ppo/policy --prompts.train builtin:quickstart_prompts \
        --samples_per_prompt 4 --output samples.jsonl [--reward.spec reward.examples:exact_answer]

One row per response: {"prompt": [messages], "response": text, "sample": k, "length": tokens, "eos": bool}
(+ "reward" when --reward.spec is given); the samples of one prompt are consecutive rows.

With an environment, one episode per data row of --prompts.train, run as PPO runs them:

    rlhf generate --model runs/agent_quickstart/ppo/policy --env.spec rlhf.envs.calculator:Calculator \
        --prompts.train builtin:calc_eval --max_new_tokens 12 --env.max_turns 3 --env.max_total_tokens 96

One row per episode: {"row": data row, "sample": k, "seed": episode seed, "transcript": [messages], "success",
"return", "turns", "tool_calls", "tokens", "truncated", "ids"}; the transcript holds every message (the first
messages, each agent turn with its "reward" and sampled "ids", each environment reply); see
`rlhf.envs.episodes.episode_records`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional


from rlhf.config import PositiveInt, Seed
from rlhf.envs.config import EnvConfig
from rlhf.errors import UserError
from rlhf.evaluation.eval_policy import check_env, env_rows, load_lm, open_engine, play
from rlhf.generation.engine import decode
from rlhf.generation.hf_engine import default_device
from rlhf.generation.prompts import encode_prompts, load_prompts
from rlhf.generation.sampling import SamplingOptions
from rlhf.generation.vllm_engine import VLLMConfig
from rlhf.ppo.config import PromptDataConfig, RewardSpec


@dataclass
class GenerateConfig(SamplingOptions):
    """Sample a model on prompts and write the responses as JSONL (`rlhf generate`). The sampling options
    (max_new_tokens, temperature, top_p, stop_token, max_prompt_length) are SamplingOptions'."""

    model: str = "runs/quickstart/sft"
    """A model directory, a peft adapter directory, a merged model, or a hub id."""
    prompts: PromptDataConfig = field(default_factory=lambda: PromptDataConfig(max_samples=16))
    output: Optional[str] = None
    """JSONL file to write; default: MODEL/generations.jsonl (./generations.jsonl for a hub id)."""
    samples_per_prompt: PositiveInt[int] = 1
    """Responses sampled per prompt."""
    batch_size: PositiveInt[int] = 16
    """Sequences generated per batch."""
    seed: Seed[int] = 0
    """Sampling seed."""
    reward: RewardSpec = field(default_factory=lambda: RewardSpec(spec=""))
    """Optional: score every response (adds a `reward` field); empty spec: no reward."""
    allow_pickle_weights: bool = False
    """Load model or reward directories whose weights are only pickles (.bin). Unpickling can run code."""
    engine: Literal["hf", "vllm"] = "hf"
    """What samples: `hf` (transformers' generate) or `vllm` (an engine in its own process; an adapter is
    served on its base)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine, with `engine: vllm`."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """An environment to play episodes in (`env.spec` set): the data rows of prompts.train start them,
    max_new_tokens is the limit per agent turn, and a row per episode holds its whole transcript."""


def check(cfg: GenerateConfig) -> None:
    """Refuse bad options before anything is loaded."""
    from policies.models import _check_exists
    from rlhf.validate import validate

    validate(cfg)  # every field's domain (also for configs built in Python)
    if cfg.output is not None:
        from rlhf.runtime.outputs import check_output_file

        check_output_file(cfg.output, "--output")
    _check_exists(cfg.model)  # a missing local path: one line naming the command that writes it
    if cfg.env.spec:
        if cfg.reward.spec:
            raise UserError("--reward.spec: with --env.spec the environment's rewards score the episodes; "
                            "give one of the two")
        check_env(cfg)


def output_path(cfg: GenerateConfig) -> Path:
    if cfg.output:
        return Path(cfg.output)
    return Path(cfg.model) / "generations.jsonl" if Path(cfg.model).is_dir() else Path("generations.jsonl")


def generate(cfg: GenerateConfig, reward=None) -> list[dict]:
    """The rows: each prompt's `samples_per_prompt` responses (with an env: episodes), consecutive."""
    check(cfg)
    if cfg.env.spec:
        return episodes(cfg)
    try:
        prompts = load_prompts(cfg.prompts)
    except UserError as e:
        raise UserError(f"--prompts.train: {e}") from None
    if reward is None and cfg.reward.spec:
        from reward.interface import load_reward

        reward = load_reward(cfg.reward.spec, kind=cfg.reward.kind, label=cfg.reward.label,
                             batch_size=cfg.reward.batch_size, allow_pickle_weights=cfg.allow_pickle_weights)
    model, tokenizer = load_model(cfg)
    sampling = cfg.sampling(tokenizer)
    k = cfg.samples_per_prompt
    repeated = [p for p in prompts for _ in range(k)]  # N*K, each prompt's samples consecutive
    engine = open_engine(cfg.model, model, tokenizer, cfg, cfg.seed)
    try:
        gen = engine.generate(encode_prompts(tokenizer, repeated, cfg.max_prompt_length), sampling, seed=cfg.seed)
    finally:
        engine.close()
    texts, lengths, eos = decode(tokenizer, gen), gen.response_mask.sum(-1).tolist(), gen.stopped.tolist()
    rows = [{"prompt": p, "response": t, "sample": i % k, "length": n, "eos": e}
            for i, (p, t, n, e) in enumerate(zip(repeated, texts, lengths, eos))]
    if reward is not None:
        for row, r in zip(rows, reward.score(repeated, texts).tolist()):
            row["reward"] = r if math.isfinite(r) else None  # JSON has no NaN: a reward that gave none is null
        missing = sum(row["reward"] is None for row in rows)
        if missing:
            warnings.warn(f"reward '{cfg.reward.spec}' gave {missing} non-finite score(s) of {len(rows)}; "
                          "written as null")
    return rows


def load_model(cfg: GenerateConfig):
    """(the model for `engine: hf`, else None: the engine loads the weights itself; the tokenizer)."""
    from transformers import AutoTokenizer

    model = None
    if cfg.engine == "hf":
        model = load_lm(cfg.model, cfg.allow_pickle_weights).to(default_device())
    else:  # safetensors only, as here
        from policies.models import refuse_pickle_weights_with_base

        refuse_pickle_weights_with_base(cfg.model, cfg.allow_pickle_weights, "--allow_pickle_weights true")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=False)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"--model: the tokenizer of '{cfg.model}' needs a PAD token distinct from EOS")
    return model, tokenizer


def episodes(cfg: GenerateConfig) -> list[dict]:
    """With an env: one episode per data row, each row's `samples_per_prompt` episodes consecutive; a
    record per episode (`rlhf.envs.episodes.episode_records`) with its row and sample number."""
    from rlhf.envs.episodes import episode_records

    k = cfg.samples_per_prompt
    rows = [r for r in env_rows(cfg) for _ in range(k)]
    model, tokenizer = load_model(cfg)
    engine = open_engine(cfg.model, model, tokenizer, cfg, cfg.seed)
    try:
        ep = play(cfg, engine, tokenizer, rows)
    finally:
        engine.close()
    return [{"row": row, "sample": i % k, **rec} for i, (row, rec) in enumerate(zip(rows, episode_records(ep)))]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Atomically: a reader (or a failed run) never leaves half a file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(cfg: GenerateConfig, reward=None) -> list[dict]:
    rows = generate(cfg, reward)
    out = output_path(cfg)
    write_jsonl(rows, out)
    n = len(rows)
    if cfg.env.spec:
        from rlhf.envs.episodes import outcome_means

        m = outcome_means(rows)
        print(f"{n} episodes ({n // cfg.samples_per_prompt} rows x {cfg.samples_per_prompt}) in {cfg.env.spec}: "
              f"success rate {m['success']:.3f}, mean return {m['return']:.4f}, per episode {m['turns']:.2f} turns, "
              f"{m['tool_calls']:.2f} tool calls, {m['tokens']:.1f} tokens; truncated {m['truncated']:.2f}\n"
              f"written: {out}")
        return rows
    summary = (f"{n} responses ({n // cfg.samples_per_prompt} prompts x {cfg.samples_per_prompt}): "
               f"mean length {sum(r['length'] for r in rows) / n:.1f} tokens, "
               f"EOS rate {sum(r['eos'] for r in rows) / n:.2f}")
    scored = [r["reward"] for r in rows if r.get("reward") is not None]  # null: the reward gave no number
    if scored:
        summary += f", mean reward {sum(scored) / len(scored):.4f}" + (
            f" over the {len(scored)} scored" if len(scored) < n else "")
    print(f"{summary}\nwritten: {out}")
    return rows
