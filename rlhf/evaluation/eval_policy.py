"""`rlhf eval policy`: does the policy beat its reference on held-out prompts, by the reward's judgement?

    rlhf eval policy --policy runs/quickstart/ppo/policy --reference runs/quickstart/sft \
        --reward.spec runs/quickstart/reward --prompts.train builtin:quickstart_prompts

Both models answer the same prompts (each `samples_per_prompt` times); the reward scores both answers.
Reported, as means over all samples: the policy's win rate (ties count half), the mean reward of each,
the KL of the policy to the reference on the policy's own samples (sum over tokens of log pi - log ref,
the k1 estimate), response lengths, EOS and truncation rates; and a samples table (each prompt's first
sample), printed and written as JSON and Markdown (and to W&B when tracking is on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from rlhf.config import PositiveInt, Seed, TrackingConfig
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

    return vllm_backend.serve(path, cfg.vllm, max_model_len=cfg.vllm.max_model_len or cfg.max_prompt_length
                              + cfg.max_new_tokens, seed=seed, pad_id=tokenizer.pad_token_id)


@torch.no_grad()
def sequence_logprob(model, ids, mask, responses, rmask, temperature: float) -> torch.Tensor:
    """Sum of the response tokens' logprobs (B,), at the sampling temperature."""
    device = next(model.parameters()).device
    full = torch.cat([ids, responses], 1).to(device)
    attn = torch.cat([mask, rmask.long()], 1).to(device)
    responses, rmask = responses.to(device), rmask.to(device)
    logits = model(input_ids=full, attention_mask=attn, position_ids=position_ids(attn)).logits
    logits = logits[:, ids.shape[1] - 1:-1] / (temperature if temperature > 0 else 1.0)
    return (core.logprobs_from_logits(logits, responses) * rmask).sum(-1).cpu()


def evaluate(cfg: EvalPolicyConfig, reward=None) -> dict:
    from transformers import AutoTokenizer

    from rlhf.validate import validate

    validate(cfg)  # every field's domain (also for configs built in Python)
    prompts = load_prompts(cfg.prompts)
    n, k = len(prompts), cfg.samples_per_prompt
    prompts = [p for p in prompts for _ in range(k)]  # N*K, each prompt's samples consecutive
    if reward is None:
        from reward.interface import load_reward

        reward = load_reward(cfg.reward.spec, kind=cfg.reward.kind, label=cfg.reward.label,
                             batch_size=cfg.reward.batch_size, allow_pickle_weights=cfg.allow_pickle_weights)
    device = default_device()  # generation and the KL passes on the GPU when there is one
    policy = load_lm(cfg.policy, cfg.allow_pickle_weights).to(device)
    reference = load_lm(cfg.reference, cfg.allow_pickle_weights).to(device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy, trust_remote_code=False)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"the tokenizer of '{cfg.policy}' needs a PAD token distinct from EOS")
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


def markdown(r: dict) -> str:
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
    clean = lambda t: t.replace("|", "\\|").replace("\n", " ")[:80]  # noqa: E731
    lines += [f"| {clean(s['prompt'])} | {clean(s['policy'])} | {s['reward_policy']:.3f} | {clean(s['reference'])} "
              f"| {s['reward_reference']:.3f} |" for s in r["samples"]]
    return "\n".join(lines) + "\n"


def main(cfg: EvalPolicyConfig, reward=None) -> dict:
    from rlhf.runtime.outputs import check_output_file

    out = Path(cfg.output) if cfg.output else Path(cfg.policy) / "eval_policy.json"
    check_output_file(out, "--output")  # before the evaluation, not after it
    report = evaluate(cfg, reward)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    for name in ("policy", "reference"):
        if report[f"truncated_rate_{name}"] > 0.2:
            print(f"warning: {report[f'truncated_rate_{name}']:.0%} of the {name}'s responses hit "
                  f"--max_new_tokens {cfg.max_new_tokens} without EOS; raise --max_new_tokens")
    print(f"written: {out} and {out.with_suffix('.md')}")
    run = tracking.start(cfg.tracking, {"eval_policy": {k: v for k, v in report.items() if k != "samples"}},
                         str(out.parent))
    if run is not None:
        import wandb

        run.log({k: v for k, v in report.items() if isinstance(v, float)})
        run.log({"eval/samples": wandb.Table(columns=list(report["samples"][0]),
                                             data=[list(s.values()) for s in report["samples"]])})
    tracking.finish(run)
    return report
