"""PPO's metrics (TRL's names: `objective/kl`, `policy/clipfrac`, `val/explained_variance`, ...), as
means over every process, and where they go: metrics.jsonl, W&B, the console's warnings and samples."""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf.ppo import core
from rlhf.ppo.rollout import Rollout

if TYPE_CHECKING:
    from rlhf.ppo.trainer import State


class Stopwatch:
    """Wall time of each phase of an iteration: `lap(name)` records the time since the previous lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    def total(self) -> float:
        return self.last - self.start


def step_metrics(step: int, r: Rollout, train_stats: dict[str, float], s: State, clock: Stopwatch) -> dict:
    """One iteration's row. With `kl_penalty: loss` the reward carries no KL: `objective/non_score_reward`
    is 0 and `objective/rlhf_reward` the score (the KL the loss holds down is `loss/kl`)."""
    acc = s.accelerator
    g = lambda x: acc.gather(x.detach().float().reshape(-1)).mean().item()  # noqa: E731  (per-sequence values)
    tokens = TokenStats(r.action_mask, (lambda t: acc.reduce(t, "sum")) if s.sizes.world > 1 else None)
    mask = r.action_mask
    seq_kl = r.kl.sum(-1)  # (B,)
    kl_in_reward = s.kl_ctl.value if s.cfg.ppo.kl_penalty == "reward" else 0.0
    n_tokens = acc.gather((r.query_mask.sum() + r.response_mask.sum()).reshape(1)).sum().item()
    lr = s.scheduler.get_last_lr()
    diff = r.engine_logprob_diff
    return {
        "step": step,
        "objective/scores": g(r.raw_scores),
        "objective/scores_normalized": g(r.scores),
        "objective/kl": g(seq_kl),
        "objective/non_score_reward": g(-kl_in_reward * seq_kl),
        "objective/rlhf_reward": g(r.scores + r.turn_rewards.sum(-1) - kl_in_reward * seq_kl),
        "objective/kl_coef": s.kl_ctl.value,
        "objective/nan_scores": g(r.nan_scores.float()),
        **({"val/explained_variance": tokens.explained_variance(r.values, r.returns),
            "val/mean": tokens.mean(r.values),
            "val/returns_mean": tokens.mean(r.returns)} if r.values is not None else {}),
        "policy/advantages_mean": tokens.mean(r.advantages),
        "policy/advantages_std": tokens.std(r.advantages),
        "response/length": g(mask.sum(-1)),
        # what this iteration sampled, all processes: the sample budget the benchmarks compare
        "rollout/samples": acc.gather(torch.tensor([mask.shape[0]], device=mask.device)).sum().item(),
        "rollout/sampled_tokens": acc.gather(mask.sum().reshape(1)).sum().item(),
        "response/eos_rate": g(r.contains_eos.float()),
        **({"policy/entropy": tokens.mean(r.entropy)} if r.entropy is not None else {}),
        **{k: g(torch.tensor(v)) for k, v in train_stats.items()},
        "lr": lr[0],
        **({"lr_critic": lr[1]} if len(lr) > 1 else {}),
        **clock.laps,
        "time/step": clock.total(),
        "tokens_per_second": n_tokens / clock.total(),
        **({"rollout/logprob_diff": diff[0], "rollout/logprob_diff_max": diff[1]} if diff is not None else {}),
        "memory/peak_gb": peak_memory_gb(),
        "memory/model_gb": s.model_bytes / 1e9,
        **(episode_metrics(r.episodes, lambda t: g(t.to(acc.device))) if r.episodes is not None else {}),
    }


def episode_metrics(ep, g) -> dict[str, float]:
    """Means over the episodes of every process (`g` gathers and averages): the true objective
    (`env/success`), the environment's return, agent turns, tool calls, tokens and the share cut by a limit."""
    return {"env/success": g(ep.success), "env/return": g(ep.returns), "env/turns": g(ep.turns),
            "env/tool_calls": g(ep.tool_calls), "env/tokens": g(ep.tokens), "env/truncated": g(ep.truncated)}


class TokenStats:
    """Statistics over the response tokens (mask (B, A)) of every process together, as over one batch:
    a process with longer responses weighs more. `sum_over_processes` None: this process alone."""

    def __init__(self, mask: torch.Tensor, sum_over_processes=None):
        self.mask, self.all_reduce = mask, sum_over_processes

    def mean(self, x: torch.Tensor) -> float:
        if self.all_reduce is None:
            return core.masked_mean(x, self.mask).item()
        return core.global_masked_moments(x.float(), self.mask, self.all_reduce)[0].item()

    def var(self, x: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is None:
            return core.masked_var(x, self.mask)
        return core.global_masked_moments(x.float(), self.mask, self.all_reduce)[1]

    def std(self, x: torch.Tensor) -> float:
        return self.var(x).sqrt().item()

    def explained_variance(self, values: torch.Tensor, returns: torch.Tensor) -> float:
        """1 - Var[R - V] / Var[R] (see core.explained_variance)."""
        if self.all_reduce is None:
            return core.explained_variance(values, returns, self.mask).item()
        var_returns = self.var(returns)
        return torch.where(var_returns == 0, math.nan, 1 - self.var(returns - values) / var_returns).item()


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def log_row(accelerator, run, out: Path, metrics: dict) -> None:
    """One row of metrics to metrics.jsonl and W&B (main process)."""
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if run is not None:
            run.log(metrics, step=metrics["step"])


def report(s: State, r: Rollout, metrics: dict, eos_history: list[float]) -> None:
    """The row to metrics.jsonl and W&B, the warnings it calls for, and every `sample_every` steps a table
    of samples."""
    cfg, step = s.cfg, metrics["step"]
    warn(metrics, eos_history, step - 1, cfg.ppo.max_new_tokens)
    log_row(s.accelerator, s.run, Path(cfg.output_dir), metrics)
    if s.accelerator.is_main_process and cfg.sample_every and step % cfg.sample_every == 0:
        log_samples(s.run, r.prompts, r.texts, r.raw_scores, cfg.num_samples, step)


def warn(m: dict, eos_history: list[float], step: int, max_new_tokens: int) -> None:
    if not eos_history and m["response/eos_rate"] < 0.5:
        warnings.warn(f"step {step + 1}: only {m['response/eos_rate']:.0%} of the responses ended with the stop token "
                      f"within ppo.max_new_tokens={max_new_tokens}: the rest are cut off and scored unfinished; "
                      "raise ppo.max_new_tokens (or check ppo.stop_token)")
    if m["objective/kl"] < -0.01:
        warnings.warn(f"step {step + 1}: objective/kl is negative ({m['objective/kl']:.4f}): the k1 estimate is "
                      "only unbiased for sampled tokens; check that sampling and logprobs use the same temperature")
    eos_history.append(m["response/eos_rate"])
    if len(eos_history) > 3 and max(eos_history[:3]) > 0.5 and m["response/eos_rate"] < 0.1:
        warnings.warn(f"step {step + 1}: the EOS rate collapsed to {m['response/eos_rate']:.2f}: responses run to "
                      "max_new_tokens; consider ppo.missing_eos_penalty")
    if not math.isfinite(m["objective/scores"]):
        warnings.warn(f"step {step + 1}: the reward is NaN")


def log_samples(run, prompts, texts, scores, n, step) -> None:
    rows = [(p[-1]["content"], t, float(s)) for p, t, s in zip(prompts[:n], texts[:n], scores[:n])]
    print(f"\nsamples at step {step}:")
    for prompt, text, score in rows:
        print(f"  [{score:+.3f}] {prompt[:60]!r} -> {text[:80]!r}")
    if run is not None:
        import wandb

        run.log({"samples": wandb.Table(columns=["prompt", "response", "score"], data=rows)}, step=step)
