"""Held-out evaluation during PPO (the `eval` block of `rlhf ppo`): the true objective next to the proxy.

Every `eval.every` iterations, and once before the first (the starting policy), the policy answers
held-out prompts it never trains on. Two rewards score the same answers: `eval.reward`, the judge the
user trusts (a function with the exact answer, a second reward model, a classifier), and the training
reward (the proxy PPO optimises). Logged as `eval/...` next to the training metrics:

  eval/reward, eval/proxy          mean held-out and training reward of sampled answers
  eval/reward_stderr               its standard error over the held-out answers
  eval/kl                          KL(policy || reference) on those answers (sum over tokens, k1)
  eval/length, eval/eos_rate       response length (tokens) and share that ended with the stop token
  eval/greedy/reward, .../proxy    the same for greedy answers (with `eval.greedy`)
  eval/proxy_agreement             share of answer pairs the judge tells apart that the proxy orders
                                   the same way (the proxy's AUC for a 0/1 judge; 0.5 = no signal)
  eval/hacking                     1 when the proxy rose while the held-out reward fell (below)

With an environment (`env.spec` of PPO), `eval.prompts` are data rows and each evaluation runs one
episode per row (the same episode seeds every time): `eval/reward` is the success rate (the
environment's `info["success"]`, the true objective), `eval/proxy` the mean return (what PPO
optimises), with eval/success, eval/return, eval/turns, eval/tool_calls, eval/tokens, eval/truncated,
and eval/kl summed over the agent's tokens only.

A rising proxy with a falling held-out reward is reward hacking (Gao et al. 2022, "Scaling laws for
reward model overoptimization"): a warning says so on the console, and `eval/hacking` records it.
Sampling is seeded by the step inside a forked RNG, so evaluating never changes the training run
(a resumed run logs the same numbers) and every evaluation sees the same held-out prompts.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from rlhf.config import EvalRewardSpec, HeldOutConfig, PositiveInt  # noqa: F401  (EvalRewardSpec: its old home)
from rlhf.errors import UserError
from rlhf.generation.engine import Engine, decode
from rlhf.generation.prompts import encode_prompts, load_prompts
from rlhf.generation.sampling import Sampling


@dataclass
class EvalConfig(HeldOutConfig):
    """Held-out evaluation during PPO: the true objective next to the proxy (off while `prompts` is None)."""

    every: PositiveInt[int] = 10
    """Evaluate every N iterations (and before the first, and after the last)."""
    hacking_window: PositiveInt[int] = 3
    """Evaluations over which 'proxy up, held-out reward down' is checked."""


def reward_hacking(proxy: list[float], heldout: list[float], heldout_stderr: list[float], window: int) -> bool:
    """Over the last `window` evaluations, did the proxy rise while the held-out reward fell by more
    than twice the newest evaluation's standard error?"""
    if window < 2 or len(proxy) < window:
        return False
    p, h = proxy[-window:], heldout[-window:]
    return p[-1] > p[0] and h[0] - h[-1] > 2 * heldout_stderr[-1]


def agreement(proxy: list[float], judge: list[float]) -> float:
    """Share of answer pairs the judge tells apart that the proxy orders the same way (ties count
    half): for a 0/1 judge, the proxy's AUC. 0.5 is a proxy that knows nothing the judge knows."""
    p, j = torch.tensor(proxy, dtype=torch.float64), torch.tensor(judge, dtype=torch.float64)
    dj, dp = j[:, None] - j[None, :], p[:, None] - p[None, :]  # (N, N) differences
    pairs = dj > 0
    if not pairs.any():
        return float("nan")
    return ((dp[pairs] > 0).double() + 0.5 * (dp[pairs] == 0).double()).mean().item()


class HeldOutEval:
    """Scores the policy on held-out prompts; `__call__` returns the `eval/...` metrics (same on every rank).
    It samples through the run's engine with the run's sampling options (`eval.temperature` replacing the
    temperature); the caller's `logprobs(result, temperature)` gives the policy's and the reference's
    logprobs ((B, A) each) of a GenerationResult's responses, for the KL."""

    def __init__(self, cfg: EvalConfig, training_reward, sampling: Sampling, max_prompt_length: int, tokenizer,
                 accelerator, out_dir: Path, env=None):
        from rlhf.ppo.config import PromptDataConfig  # the prompt source's fields, as data.train's

        for name in ("every", "max_prompts", "samples_per_prompt", "hacking_window"):
            if getattr(cfg, name) < 1:
                raise UserError(f"eval.{name} expects a positive integer, got {getattr(cfg, name)}")
        if cfg.temperature is not None and cfg.temperature <= 0:
            raise UserError("eval.temperature must be > 0 (greedy answers are scored with eval.greedy)")
        self.cfg, self.accelerator, self.out_dir, self.tokenizer = cfg, accelerator, out_dir, tokenizer
        self.sampling = replace(sampling, temperature=cfg.temperature or sampling.temperature)
        self.history: dict[str, list[float]] = {"proxy": [], "reward": [], "stderr": []}
        self.env = env  # an EnvConfig: episodes on held-out data rows
        if env is not None:
            from rlhf.envs.episodes import load_rows
            from rlhf.envs.interface import load_environment_class, make_environment

            rows = load_rows(cfg.prompts, max_samples=cfg.max_prompts)
            rank, world, k = accelerator.process_index, accelerator.num_processes, cfg.samples_per_prompt
            self.prompts = [r for r in rows[rank::world] for _ in range(k)]
            # each of this rank's episodes by its place in the whole list: its seed is the one a single
            # process gives it, whatever the number of processes
            self.episode_index = [i * k + j for i in range(rank, len(rows), world) for j in range(k)]
            self.n_prompts = len(rows)
            cls = load_environment_class(env.spec)
            self.envs = [make_environment(cls, env) for _ in self.prompts]
            return
        prompts = load_prompts(PromptDataConfig(train=cfg.prompts, format=cfg.format, max_samples=cfg.max_prompts))
        # this rank's share; every prompt sampled samples_per_prompt times in a row
        mine = prompts[accelerator.process_index::accelerator.num_processes]
        self.prompts = [p for p in mine for _ in range(cfg.samples_per_prompt)]
        self.encoded = encode_prompts(tokenizer, self.prompts, max_prompt_length)
        self.n_prompts = len(prompts)
        self.proxy = training_reward
        if cfg.reward.spec is None:
            warnings.warn("eval.reward.spec is not set: held-out answers are judged by the training reward only, "
                          "which cannot reveal reward hacking; set it to a second reward model, a classifier or "
                          "a function with the true objective")
            self.judge = training_reward
        else:
            from reward.interface import load_reward

            self.judge = load_reward(cfg.reward.spec, kind=cfg.reward.kind, label=cfg.reward.label,
                                     batch_size=cfg.reward.batch_size, device=accelerator.device)

    def due(self, step: int, last_step: int) -> bool:
        return step == 0 or step % self.cfg.every == 0 or step == last_step

    @torch.no_grad()
    def __call__(self, step: int, engine: Engine, logprobs: Callable, seed: int) -> dict[str, float]:
        from accelerate.utils import gather_object

        acc = self.accelerator
        metrics, rows = {}, []
        greedy = replace(self.sampling, temperature=0.0)
        modes = [("", self.sampling)] + ([("greedy/", greedy)] if self.cfg.greedy else [])
        for prefix, sampling in modes:
            play = self.episodes if self.env is not None else self.responses
            local, new_rows = play(engine, sampling, logprobs, seed, step, prefix)
            values = {k: gather_object(v) for k, v in local.items()}
            n = len(values["reward"])
            for k, v in values.items():
                metrics[f"eval/{prefix}{k}"] = sum(v) / n
            judged_apart = self.env is None and self.judge is not self.proxy
            auc = agreement(values["proxy"], values["reward"]) if judged_apart else float("nan")
            if auc == auc:  # NaN when the judge scored every answer alike: nothing to order
                metrics[f"eval/{prefix}proxy_agreement"] = auc
            r = torch.tensor(values["reward"], dtype=torch.float64)
            metrics[f"eval/{prefix}reward_stderr"] = (r.std() / n ** 0.5).item() if n > 1 else 0.0
            rows += new_rows
        rows = gather_object(rows)
        h = self.history
        h["proxy"].append(metrics["eval/proxy"])
        h["reward"].append(metrics["eval/reward"])
        h["stderr"].append(metrics["eval/reward_stderr"])
        hacking = reward_hacking(h["proxy"], h["reward"], h["stderr"], self.cfg.hacking_window)
        metrics["eval/hacking"] = float(hacking)
        if acc.is_main_process:
            with open(self.out_dir / "eval_samples.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            acc.print(f"eval at step {step}: held-out reward {metrics['eval/reward']:.4f} "
                      f"(greedy {metrics.get('eval/greedy/reward', float('nan')):.4f}), proxy "
                      f"{metrics['eval/proxy']:.4f}, KL {metrics['eval/kl']:.3f}")
            if hacking:
                warnings.warn(f"step {step}: possible reward hacking: over the last {self.cfg.hacking_window} "
                              f"evaluations the training reward rose {h['proxy'][-self.cfg.hacking_window]:.4f} -> "
                              f"{h['proxy'][-1]:.4f} while the held-out reward fell "
                              f"{h['reward'][-self.cfg.hacking_window]:.4f} -> {h['reward'][-1]:.4f}; "
                              "raise ppo.kl_coef, stop earlier, or improve the reward model")
        return metrics

    def responses(self, engine: Engine, sampling: Sampling, logprobs: Callable, seed: int, step: int, prefix: str):
        """One answer per held-out prompt, scored by the judge and the proxy: (per-answer values by metric
        name, rows for eval_samples.jsonl)."""
        gen = engine.generate(self.encoded, sampling, seed=seed * 7919 + step)  # the same draw on a resume
        rmask = gen.response_mask  # (B, A)
        texts = decode(self.tokenizer, gen)
        judge = self.judge.score(self.prompts, texts).float().tolist()
        proxy = self.proxy.score(self.prompts, texts).float().tolist() if self.judge is not self.proxy else judge
        local = {"reward": judge, "proxy": proxy, "length": rmask.sum(-1).tolist(),
                 "eos_rate": gen.stopped.float().tolist()}
        if not prefix:  # KL to the reference on the sampled answers (sum over tokens, k1)
            lp, ref_lp = logprobs(gen, sampling.temperature)
            local["kl"] = ((lp - ref_lp) * rmask).sum(-1).tolist()
        rows = [{"step": step, "mode": prefix.rstrip("/") or "sampled", "prompt": p, "response": t,
                 "reward": j, "proxy": x} for p, t, j, x in zip(self.prompts, texts, judge, proxy)]
        return local, rows

    def episodes(self, engine: Engine, sampling: Sampling, logprobs: Callable, seed: int, step: int, prefix: str):
        """One episode per held-out row (episode seeds fixed by the run's seed, turns drawn from a seed of
        the step): (per-episode values by metric name, transcript rows for eval_samples.jsonl)."""
        from rlhf.envs.episodes import (EngineSampler, episode_records, episode_values, first_messages, run_episodes,
                                        split_at_prompt, transcript_text)
        from rlhf.generation.engine import GenerationResult

        sampler = EngineSampler(engine, sampling, seed=(seed * 7919 + step) * 1000)  # the same draw on a resume
        ep = run_episodes(self.envs, self.prompts, self.tokenizer, sampler, self.env, seed,
                          seeds=self.episode_seeds(seed))
        values = episode_values(ep)
        local = {"reward": values["success"], "proxy": values["return"], **values}
        if not prefix:  # KL to the reference over the agent's tokens (sum, k1)
            lay = split_at_prompt(ep, self.tokenizer.pad_token_id)
            dev = self.accelerator.device
            gen = GenerationResult(lay.query_ids.to(dev), lay.query_mask.to(dev), lay.responses.to(dev),
                                   lay.response_mask.to(dev), ~ep.truncated.to(dev))
            lp, ref_lp = logprobs(gen, sampling.temperature)
            local["kl"] = ((lp - ref_lp) * lay.action_mask.to(dev)).sum(-1).tolist()
        rows = [{"step": step, "mode": prefix.rstrip("/") or "sampled", "row": row, "prompt": first_messages(t),
                 "response": transcript_text(t), "reward": rec["success"], "proxy": rec["return"],
                 "transcript": rec["transcript"]}
                for row, t, rec in zip(self.prompts, ep.transcripts, episode_records(ep))]
        return local, rows

    def episode_seeds(self, seed: int) -> list[int]:
        """The seeds of this rank's held-out episodes: those of their places in the whole list."""
        from rlhf.envs.episodes import episode_seeds

        seeds = episode_seeds(seed, self.n_prompts * self.cfg.samples_per_prompt)
        return [seeds[i] for i in self.episode_index]

    def restore(self, history: list[dict]) -> None:
        """Refill the hacking window from a resumed run's metrics."""
        for m in history:
            if "eval/reward" in m:
                self.history["proxy"].append(m["eval/proxy"])
                self.history["reward"].append(m["eval/reward"])
                self.history["stderr"].append(m["eval/reward_stderr"])
