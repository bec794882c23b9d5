"""`rlhf eval policy`: does the policy beat its reference on held-out prompts, by the reward's judgement?

    rlhf eval policy --policy runs/quickstart/ppo/policy --reference runs/quickstart/sft \
        --reward.spec runs/quickstart/reward --prompts.train builtin:quickstart_prompts

Both models answer the same prompts (each `samples_per_prompt` times); the reward scores both answers.
Reported, as means over all samples: the policy's win rate (ties count half), the mean reward of each,
the KL of the policy to the reference on the policy's own samples (sum over tokens of log pi - log ref,
the k1 estimate), response lengths, EOS and truncation rates; and a samples table (each prompt's first
sample), printed and written as JSON and Markdown (and to W&B when tracking is on).

With an environment (`--env.spec`), both models play one episode per data row of `--prompts.train`
(each `samples_per_prompt` times) with the same episode seeds, through the loop PPO and its held-out
evaluation run (`rlhf.envs.episodes`); the environment's rewards judge (no `--reward.spec`). Reported
for each model, as the held-out evaluation does: the success rate, mean return, agent turns, tool calls,
tokens and truncated share per episode; the win rate on returns (paired episodes, ties count half);
the KL over the agent's tokens of the policy's episodes. The whole transcripts of both go beside the
report (`eval_policy.episodes.jsonl`: a record per episode, `rlhf.envs.episodes.episode_records`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from rlhf.config import PositiveInt, Seed, TrackingConfig
from rlhf.envs.config import EnvConfig
from rlhf.errors import UserError
from rlhf.generation.engine import decode
from rlhf.generation.hf_engine import HFEngine, default_device
from rlhf.generation.prompts import encode_prompts, load_prompts, position_ids
from rlhf.generation.sampling import SamplingOptions
from rlhf.generation.vllm_engine import VLLMConfig
from rlhf.ppo import core
from rlhf.ppo.config import PromptDataConfig, RewardSpec
from rlhf.runtime import tracking


@dataclass
class EvalPolicyConfig(SamplingOptions):
    """Policy against reference, judged by a reward (`rlhf eval policy`). The sampling options
    (max_new_tokens, temperature, top_p, stop_token, max_prompt_length) are SamplingOptions'."""

    policy: str = "runs/quickstart/ppo/policy"
    """The policy: a model directory, a peft adapter directory, or a hub id."""
    reference: str = "runs/quickstart/sft"
    """The reference (usually the SFT model the policy started from)."""
    reward: RewardSpec = field(default_factory=RewardSpec)
    prompts: PromptDataConfig = field(default_factory=lambda: PromptDataConfig(max_samples=64))
    batch_size: PositiveInt[int] = 16
    """Prompts generated per batch."""
    seed: Seed[int] = 0
    """Sampling seed (the same for both models)."""
    samples_per_prompt: PositiveInt[int] = 1
    """Responses sampled per prompt by each model (more: less sampling noise in the means)."""
    num_samples: PositiveInt[int] = 8
    """Rows in the samples table."""
    output: Optional[str] = None
    """Where to write the JSON report (the Markdown goes beside it); default: POLICY/eval_policy.json."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_pickle_weights: bool = False
    """Load model or reward directories whose weights are only pickles (.bin). Unpickling can run code."""
    engine: Literal["hf", "vllm"] = "hf"
    """What samples the responses: `hf` (transformers' generate) or `vllm` (an engine in its own process;
    an adapter is served on its base). The KL is computed by the models themselves either way."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine, with `engine: vllm`."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """An environment to play episodes in (`env.spec` set): the data rows of prompts.train start them,
    max_new_tokens is the limit per agent turn, and the environment's rewards judge (reward.spec is not
    read). Empty spec: single-turn answers judged by reward.spec."""


def load_lm(path: str, allow_pickle_weights: bool = False):
    """A causal LM from a model directory, a peft adapter directory, or a hub id. Pickle-only weights
    (the adapter's or its base's) are refused unless allowed: peft loads adapter_model.bin on its own."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from policies.models import (LOAD_ERRORS, ModelLoadError, _check_exists, load_failure,
                                 refuse_pickle_weights_with_base)

    _check_exists(path)
    refuse_pickle_weights_with_base(path, allow_pickle_weights, "--allow_pickle_weights true")
    cls = AutoPeftModelForCausalLM if (Path(path) / "adapter_config.json").exists() else AutoModelForCausalLM
    try:
        return cls.from_pretrained(path, use_safetensors=None if allow_pickle_weights else True,
                                   trust_remote_code=False).eval()
    except LOAD_ERRORS as e:
        raise ModelLoadError(f"'{path}' could not be loaded as a causal LM ({load_failure(e)})") from None


def open_engine(path: str, model, tokenizer, cfg: EvalPolicyConfig, seed: int):
    """The engine that samples the model at `path` (`model`: it, loaded, for `engine: hf`)."""
    if cfg.engine == "hf":
        return HFEngine.for_model(model, tokenizer.pad_token_id, batch_size=cfg.batch_size)
    from rlhf.generation import vllm_backend

    context = cfg.env.max_total_tokens if cfg.env.spec else cfg.max_prompt_length  # the longest input
    return vllm_backend.serve(path, cfg.vllm, max_model_len=cfg.vllm.max_model_len or context + cfg.max_new_tokens,
                              seed=seed, pad_id=tokenizer.pad_token_id)


@torch.no_grad()
def sequence_logprob(model, ids, mask, responses, rmask, temperature: float, counted=None) -> torch.Tensor:
    """Sum of the response tokens' logprobs (B,), at the sampling temperature. `counted` (B, A): the tokens
    summed (default: all of `rmask`; in an episode the agent's, the environment's replies being context)."""
    device = next(model.parameters()).device
    full = torch.cat([ids, responses], 1).to(device)
    attn = torch.cat([mask, rmask.long()], 1).to(device)
    responses = responses.to(device)
    counted = (rmask if counted is None else counted).to(device)
    logits = model(input_ids=full, attention_mask=attn, position_ids=position_ids(attn)).logits
    logits = logits[:, ids.shape[1] - 1:-1] / (temperature if temperature > 0 else 1.0)
    return (core.logprobs_from_logits(logits, responses) * counted).sum(-1).cpu()


def check_env(cfg) -> None:
    """With `--env.spec` (`rlhf eval policy`, `rlhf generate`): the environment class loads and an agent
    turn ends at EOS, refused in one line before a model loads."""
    from rlhf.envs.interface import load_environment_class

    if cfg.stop_token != "eos":
        raise UserError(f"--stop_token {cfg.stop_token}: with --env.spec an agent turn ends at the tokenizer's EOS "
                        "(the chat template's end of turn); use `eos`")
    load_environment_class(cfg.env.spec)


def env_rows(cfg) -> list[dict]:
    """The data rows episodes start from: `--prompts.train` (its split, column_map and max_samples)."""
    from rlhf.envs.episodes import load_rows

    try:
        return load_rows(cfg.prompts.train, cfg.prompts.split, cfg.prompts.column_map, cfg.prompts.max_samples)
    except UserError as e:
        raise UserError(f"--prompts.train: {e}") from None


def play(cfg, engine, tokenizer, rows: list[dict]):
    """One episode per row in `cfg.env`, each turn sampled by `engine`, in the loop of PPO and its held-out
    evaluation (`rlhf.envs.episodes`): episode seeds from env.seed (None: --seed), agent turn k sampled
    with seed --seed + k, so two models play the same episodes up to what they sample."""
    from rlhf.envs.episodes import EngineSampler, EnvPool

    sampler = EngineSampler(engine, cfg.sampling(tokenizer), seed=cfg.seed)
    return EnvPool(cfg.env, cfg.seed).run(rows, tokenizer, sampler)


def evaluate(cfg: EvalPolicyConfig, reward=None) -> dict:
    from rlhf.validate import validate

    validate(cfg)  # every field's domain (also for configs built in Python)
    if cfg.env.spec:
        return evaluate_episodes(cfg)
    prompts = load_prompts(cfg.prompts)
    n, k = len(prompts), cfg.samples_per_prompt
    prompts = [p for p in prompts for _ in range(k)]  # N*K, each prompt's samples consecutive
    if reward is None:
        from reward.interface import load_reward

        reward = load_reward(cfg.reward.spec, kind=cfg.reward.kind, label=cfg.reward.label,
                             batch_size=cfg.reward.batch_size, allow_pickle_weights=cfg.allow_pickle_weights)
    policy, reference, tokenizer = load_pair(cfg)
    sampling = cfg.sampling(tokenizer)
    encoded = encode_prompts(tokenizer, prompts, cfg.max_prompt_length)

    rows, kl = {"policy": [], "reference": []}, []
    lengths, eos = {"policy": [], "reference": []}, {"policy": [], "reference": []}
    for name, model in (("policy", policy), ("reference", reference)):
        engine = open_engine(getattr(cfg, name), model, tokenizer, cfg, cfg.seed)
        try:
            gen = engine.generate(encoded, sampling, seed=cfg.seed)  # the same seed for both models
        finally:
            engine.close()
        rows[name] = decode(tokenizer, gen)
        lengths[name] = gen.response_mask.sum(-1).tolist()
        eos[name] = gen.stopped.tolist()
        if name == "policy":  # KL(policy || reference) on the policy's own samples, batch by batch
            for b in gen.chunks(cfg.batch_size):  # (b, P), (b, A)
                args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, cfg.temperature)
                kl += (sequence_logprob(policy, *args) - sequence_logprob(reference, *args)).tolist()
    from reward.interface import require_finite

    r_pol = require_finite(reward.score(prompts, rows["policy"]).float(), cfg.reward.spec)  # (N*K,)
    r_ref = require_finite(reward.score(prompts, rows["reference"]).float(), cfg.reward.spec)
    wins = (r_pol > r_ref).float() + 0.5 * (r_pol == r_ref).float()  # (N*K,)
    # The K samples of one prompt are correlated: the standard error is over the N per-prompt means.
    per_prompt = wins.view(n, k).mean(1)  # (N,)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    truncated = {name: [not e and length == cfg.max_new_tokens for e, length in zip(eos[name], lengths[name])]
                 for name in eos}
    report = {
        "n_prompts": n,
        "samples_per_prompt": k,
        "n_samples": n * k,
        "win_rate": wins.mean().item(),
        "win_rate_stderr": (per_prompt.std() / n ** 0.5).item() if n > 1 else None,
        "reward_policy": r_pol.mean().item(),
        "reward_reference": r_ref.mean().item(),
        "kl_policy_reference": mean(kl),
        "length_policy": mean(lengths["policy"]),
        "length_reference": mean(lengths["reference"]),
        "eos_rate_policy": mean(eos["policy"]),
        "eos_rate_reference": mean(eos["reference"]),
        "truncated_rate_policy": mean(truncated["policy"]),
        "truncated_rate_reference": mean(truncated["reference"]),
        "samples": [{"prompt": p[-1]["content"], "policy": a, "reference": b, "reward_policy": float(x),
                     "reward_reference": float(y)}
                    for p, a, b, x, y in list(zip(prompts, rows["policy"], rows["reference"], r_pol, r_ref))
                    [::k][:cfg.num_samples]],
        "policy": cfg.policy, "reference": cfg.reference, "reward": cfg.reward.spec,
    }
    return report


def load_pair(cfg: EvalPolicyConfig):
    """(policy, reference, tokenizer), the models on the GPU when there is one (generation and KL passes)."""
    from transformers import AutoTokenizer

    device = default_device()
    policy = load_lm(cfg.policy, cfg.allow_pickle_weights).to(device)
    reference = load_lm(cfg.reference, cfg.allow_pickle_weights).to(device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy, trust_remote_code=False)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"the tokenizer of '{cfg.policy}' needs a PAD token distinct from EOS")
    return policy, reference, tokenizer


def evaluate_episodes(cfg: EvalPolicyConfig) -> dict:
    """The report with an environment (see the module docstring); its `episodes` are the records of both
    models' episodes (`model`: policy or reference), which `main` writes as JSONL beside the report."""
    from rlhf.envs.episodes import episode_records, first_messages, outcome_means, split_at_prompt, transcript_text

    check_env(cfg)
    rows = env_rows(cfg)
    n, k = len(rows), cfg.samples_per_prompt
    rows = [r for r in rows for _ in range(k)]  # N*K, each row's episodes consecutive
    policy, reference, tokenizer = load_pair(cfg)
    records, kl = {}, []
    for name, model in (("policy", policy), ("reference", reference)):
        engine = open_engine(getattr(cfg, name), model, tokenizer, cfg, cfg.seed)
        try:
            ep = play(cfg, engine, tokenizer, rows)  # the same episode and sampling seeds for both models
        finally:
            engine.close()
        records[name] = episode_records(ep)
        if name == "policy":  # KL(policy || reference) over the agent's tokens of the policy's episodes
            lay = split_at_prompt(ep, tokenizer.pad_token_id)  # (B, P) prompts, (B, A) the rest
            for i in range(0, len(rows), cfg.batch_size):
                b = slice(i, i + cfg.batch_size)
                args = (lay.query_ids[b], lay.query_mask[b], lay.responses[b], lay.response_mask[b], cfg.temperature)
                kl += (sequence_logprob(policy, *args, counted=lay.action_mask[b])
                       - sequence_logprob(reference, *args, counted=lay.action_mask[b])).tolist()
    r_pol = torch.tensor([r["return"] for r in records["policy"]])  # (N*K,)
    r_ref = torch.tensor([r["return"] for r in records["reference"]])
    wins = (r_pol > r_ref).float() + 0.5 * (r_pol == r_ref).float()  # (N*K,), paired by row and episode seed
    per_row = wins.view(n, k).mean(1)  # (N,): the K episodes of one row are correlated
    report = {"env": cfg.env.spec, "n_rows": n, "samples_per_prompt": k, "n_episodes": n * k,
              "win_rate": wins.mean().item(), "win_rate_stderr": (per_row.std() / n ** 0.5).item() if n > 1 else None,
              "kl_policy_reference": sum(kl) / len(kl)}
    for name in ("policy", "reference"):
        report.update({f"{m}_{name}": v for m, v in outcome_means(records[name]).items()})
        success = torch.tensor([float(r["success"]) for r in records[name]], dtype=torch.float64)
        report[f"success_stderr_{name}"] = (success.std() / len(success) ** 0.5).item() if len(success) > 1 else 0.0
    report["samples"] = [
        {"prompt": first_messages(a["transcript"])[-1]["content"], "policy": transcript_text(a["transcript"]),
         "reference": transcript_text(b["transcript"]), "reward_policy": a["return"], "reward_reference": b["return"]}
        for a, b in list(zip(records["policy"], records["reference"]))[::k][:cfg.num_samples]]
    report.update(policy=cfg.policy, reference=cfg.reference, reward=f"the returns of {cfg.env.spec}")
    report["episodes"] = [{"model": name, "row": row, "sample": i % k, **rec} for name in records
                          for i, (row, rec) in enumerate(zip(rows, records[name]))]
    return report


def markdown_episodes(r: dict) -> str:
    lines = [f"# Policy evaluation: `{r['policy']}` vs `{r['reference']}`", "",
             f"Episodes in `{r['env']}` on {r['n_rows']} rows x {r['samples_per_prompt']} (the same episode "
             "seeds for both).", "", "| per episode | policy | reference |", "|---|---|---|"]
    for key, label, fmt in (("success", "success rate", ".3f"), ("return", "return", ".4f"),
                            ("turns", "agent turns", ".2f"), ("tool_calls", "tool calls", ".2f"),
                            ("tokens", "tokens", ".1f"), ("truncated", "truncated (cut by a limit)", ".2f")):
        lines.append(f"| {label} | {r[f'{key}_policy']:{fmt}} | {r[f'{key}_reference']:{fmt}} |")
    lines += ["", f"**Success rate of the policy: {r['success_policy']:.3f}** (± {r['success_stderr_policy']:.3f} "
              f"s.e.), of the reference {r['success_reference']:.3f}. Win rate on returns: {r['win_rate']:.3f} (ties "
              f"count half). KL(policy ‖ reference) over the agent's tokens: {r['kl_policy_reference']:.4f} nats.", "",
              "| first message | policy's episode | return | reference's episode | return |", "|---|---|---|---|---|"]
    return "\n".join(lines + sample_lines(r)) + "\n"


def sample_lines(r: dict) -> list[str]:
    clean = lambda t: t.replace("|", "\\|").replace("\n", " ")[:80]  # noqa: E731
    return [f"| {clean(s['prompt'])} | {clean(s['policy'])} | {s['reward_policy']:.3f} | {clean(s['reference'])} "
            f"| {s['reward_reference']:.3f} |" for s in r["samples"]]


def markdown(r: dict) -> str:
    if "env" in r:
        return markdown_episodes(r)
    lines = [f"# Policy evaluation: `{r['policy']}` vs `{r['reference']}`", "",
             f"Judged by `{r['reward']}` on {r['n_prompts']} prompts x {r['samples_per_prompt']} samples.", "",
             "| metric | policy | reference |", "|---|---|---|",
             f"| mean reward | {r['reward_policy']:.4f} | {r['reward_reference']:.4f} |",
             f"| response length (tokens) | {r['length_policy']:.2f} | {r['length_reference']:.2f} |",
             f"| EOS rate | {r['eos_rate_policy']:.2f} | {r['eos_rate_reference']:.2f} |",
             f"| truncated rate | {r['truncated_rate_policy']:.2f} | {r['truncated_rate_reference']:.2f} |", "",
             f"**Win rate of the policy: {r['win_rate']:.3f}** (± {r['win_rate_stderr'] or 0:.3f} s.e.; ties count "
             f"half). KL(policy ‖ reference) on the policy's samples: {r['kl_policy_reference']:.4f} nats.", "",
             "| prompt | policy | reward | reference | reward |", "|---|---|---|---|---|"]
    return "\n".join(lines + sample_lines(r)) + "\n"


def main(cfg: EvalPolicyConfig, reward=None) -> dict:
    from rlhf.evaluation.generate import write_jsonl
    from rlhf.runtime.outputs import check_output_file

    out = Path(cfg.output) if cfg.output else Path(cfg.policy) / "eval_policy.json"
    check_output_file(out, "--output")  # before the evaluation, not after it
    episodes_out = out.with_suffix(".episodes.jsonl")
    if cfg.env.spec:
        check_output_file(episodes_out, "--output")
    report = evaluate(cfg, reward)
    episodes = report.pop("episodes", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    if episodes is not None:
        write_jsonl(episodes, episodes_out)
    print(markdown(report))
    for name in ("policy", "reference"):
        if episodes is not None and report[f"truncated_{name}"] > 0.2:
            print(f"warning: {report[f'truncated_{name}']:.0%} of the {name}'s episodes were cut by a limit "
                  f"(env.max_turns {cfg.env.max_turns}, env.max_total_tokens {cfg.env.max_total_tokens}, or a turn "
                  f"reaching --max_new_tokens {cfg.max_new_tokens} without EOS)")
        elif episodes is None and report[f"truncated_rate_{name}"] > 0.2:
            print(f"warning: {report[f'truncated_rate_{name}']:.0%} of the {name}'s responses hit "
                  f"--max_new_tokens {cfg.max_new_tokens} without EOS; raise --max_new_tokens")
    print(f"written: {out} and {out.with_suffix('.md')}" + (f" and {episodes_out}" if episodes is not None else ""))
    run = tracking.start(cfg.tracking, {"eval_policy": {k: v for k, v in report.items() if k != "samples"}},
                         str(out.parent))
    if run is not None:
        import wandb

        run.log({k: v for k, v in report.items() if isinstance(v, float)})
        run.log({"eval/samples": wandb.Table(columns=list(report["samples"][0]),
                                             data=[list(s.values()) for s in report["samples"]])})
    tracking.finish(run)
    return report
