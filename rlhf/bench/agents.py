"""`rlhf bench agents`: PPO (GAE critic) against GRPO, RLOO, REINFORCE++ and best-of-n in a multi-turn
environment, from one SFT policy, at the same sample budget, over several seeds.

    rlhf bench agents                                   # calculator, 3 seeds, the agent quickstart's settings
    rlhf bench agents --task guess_number --seeds 0 1 --ppo_steps 40

The task is a pipeline YAML with `sft` and `ppo` sections and an `env` (`calculator`: configs/agent_quickstart.yaml,
`guess_number`: configs/agent_guess.yaml, or a file of your own): the environment, its data and every SFT and
training setting are read from it, so the benchmark runs what `rlhf pipeline` runs. For each seed:

1. SFT on the environment's demonstrations (the `sft` section, seeded), once: a later run with the same
   settings reuses it (output_dir/seed_N/sft, its settings in sft_settings.json).
2. Each trained method starts from that SFT policy with the `ppo` section, only the advantage estimator
   changed (`align.estimator`): `ppo` (GAE critic over the agent's tokens), `grpo` and `rloo` (group_size
   episodes per data row, rollout / group_size rows), `reinforce_pp` (one episode per row). Every one samples
   the same episodes per iteration for the same iterations, counted from what its rollouts held
   (`rollout/samples`, `rollout/sampled_tokens`). The held-out evaluation (`ppo.eval`) runs before the first
   iteration and after the last: success rate sampled and greedy, KL to the SFT policy over the agent's
   tokens, turns, tool calls and tokens per episode.
3. `best_of_n`: n episodes per held-out row from the SFT policy (its held-out sampling options), and the one
   with the highest environment return kept (the first on ties). It reads the true reward at test time, so it
   is an upper-bound style baseline, not a policy; its KL is at most log n - (n - 1) / n (the analytic
   best-of-n bound; ties make it smaller) and its sample cost is n x held-out rows episodes, by default the
   trained methods' training budget.

result.json and result.md are rewritten as each method finishes; the table is printed at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from rlhf.bench import align_math as bm
from rlhf.bench.align import GROUP, LABELS, ONLINE, PeakMemory, Seeds, estimator
from rlhf.bench.speed import write_results
from rlhf.config import PositiveInt, domain
from rlhf.errors import UserError

TASKS = {"calculator": "agent_quickstart.yaml", "guess_number": "agent_guess.yaml"}  # in configs/
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINED = tuple(ONLINE)  # ppo, grpo, rloo, reinforce_pp
METHODS = (*TRAINED, "best_of_n")
Task = domain(lambda v: v in TASKS or v.endswith((".yaml", ".yml")),
              f"one of {', '.join(TASKS)} or a pipeline YAML file (.yaml)")
Methods = domain(lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(m in METHODS for m in v),
                 f"some of {', '.join(METHODS)}, each once")


@dataclass
class BenchAgentsConfig:
    """Agent benchmark in a multi-turn environment (`rlhf bench agents`): PPO, GRPO, RLOO, REINFORCE++ and
    best-of-n from one SFT policy at the same sample budget."""

    task: Task[str] = "calculator"
    """`calculator` (configs/agent_quickstart.yaml), `guess_number` (configs/agent_guess.yaml), or a pipeline
    YAML of your own with `sft` and `ppo` sections and `ppo.env`: the environment, its data, the held-out rows
    (`ppo.eval`) and every SFT and training setting are read from it."""
    output_dir: str = "runs/bench_agents"
    """Each seed's SFT policy and runs go to output_dir/seed_N; result.json and result.md to output_dir."""
    seeds: Seeds[list[int]] = field(default_factory=lambda: [0, 1, 2])
    """One SFT policy and one run of every method per seed; the table gives each seed and the means."""
    methods: Methods[list[str]] = field(default_factory=lambda: list(METHODS))
    """What is compared from the same SFT policy: `ppo` (GAE critic), `grpo`, `rloo`, `reinforce_pp`
    (`ppo.advantage_estimator`), and `best_of_n` (the best of n SFT episodes by the environment's return)."""
    ppo_steps: PositiveInt[Optional[int]] = None
    """Iterations of every trained method (None: the task's `ppo.ppo.steps`)."""
    group_size: PositiveInt[int] = 4
    """Episodes per data row for grpo and rloo (their baseline's group): each iteration samples
    rollout / group_size rows x group_size episodes, as many as ppo and reinforce_pp (one per row)."""
    best_of_n: PositiveInt[Optional[int]] = None
    """Episodes sampled per held-out row by best-of-n (None: the trained methods' training budget,
    steps x rollout episodes, divided over the held-out rows, rounded down)."""


def load_task(task: str):
    """The pipeline config a task names (a shipped one by name, or a file)."""
    from rlhf import config
    from rlhf.stages.pipeline import PipelineConfig

    path = str(CONFIGS / TASKS[task]) if task in TASKS else task
    if not Path(path).is_file():
        raise UserError(f"task: '{task}' is not a file (expected {', '.join(TASKS)} or a pipeline YAML)")
    p = config.parse(PipelineConfig, ["--config", path], "rlhf bench agents")
    if not p.ppo.env.spec:
        raise UserError(f"task {path}: ppo.env.spec is empty; the agent benchmark needs an environment")
    if p.ppo.eval.prompts is None:
        raise UserError(f"task {path}: ppo.eval.prompts is not set; the benchmark needs held-out rows")
    return p


@dataclass(frozen=True)
class Plan:
    """What every seed runs, built and checked before the first SFT step."""

    task: object  # the PipelineConfig read from the task
    steps: int
    rollout: int  # episodes sampled per iteration by every trained method
    heldout_rows: int
    n: int  # best-of-n's episodes per held-out row

    @property
    def budget(self) -> int:
        """Episodes each trained method samples in training."""
        return self.steps * self.rollout


def plan(cfg: BenchAgentsConfig) -> Plan:
    """The task read, every method's PPO config checked (batch divisions, limits), the data and environment
    loaded once: a bad setting is one line before anything trains."""
    from rlhf.envs.episodes import load_rows
    from rlhf.ppo.config import batch_sizes
    from rlhf.ppo.config import check as check_ppo
    from rlhf.stages import pipeline, sft
    from rlhf.validate import validate

    validate(cfg)
    task = load_task(cfg.task)
    steps = cfg.ppo_steps or task.ppo.ppo.steps
    for method in (m for m in cfg.methods if m in TRAINED):
        p = method_config(task.ppo, method, cfg.group_size, steps, "unused", Path(cfg.output_dir) / "check", 0)
        try:
            check_ppo(p)
            batch_sizes(p.ppo, 1)
        except UserError as e:
            raise UserError(f"{method} (group_size {cfg.group_size}): {e}" if method in GROUP else f"{method}: {e}") \
                from None
    try:
        sft.check(task.sft)
    except UserError as e:
        raise UserError(f"sft: {e}") from None
    pipeline.check_inputs(replace(task, stages=["sft", "ppo"]))
    rows = len(load_rows(task.ppo.eval.prompts, max_samples=task.ppo.eval.max_prompts))
    rollout = task.ppo.ppo.per_device_rollout_batch_size
    n = cfg.best_of_n or steps * rollout // rows
    if n < 1:
        raise UserError(f"best_of_n: the training budget ({steps} x {rollout} episodes) is smaller than the "
                        f"{rows} held-out rows; set best_of_n")
    return Plan(task, steps, rollout, rows, n)


def method_config(ppo_cfg, method: str, group_size: int, steps: int, sft_dir: str, out: Path, seed: int):
    """The task's PPO config for `method`: only the estimator (and its samples per row), the start, the seed
    and where it writes change; evaluated before and after only, no checkpoints, no sample tables."""
    p = replace(ppo_cfg.ppo, steps=steps, **estimator(method, group_size))
    return replace(ppo_cfg, ppo=p, model=replace(ppo_cfg.model, name_or_path=sft_dir),
                   eval=replace(ppo_cfg.eval, every=steps, greedy=True), output_dir=str(out), seed=seed,
                   save_steps=steps, sample_every=0, resume=None)


# ---------------------------------------------------------------------------------------------
# one seed


def cached_sft(sft_cfg, out: Path, seed: int) -> tuple[str, bool]:
    """The SFT policy of `seed` in out/sft: trained with the task's `sft` section, or reused when a finished
    run with the same settings is there. Returns (its directory, whether it was reused)."""
    from rlhf import config
    from rlhf.stages import sft

    cfg = replace(sft_cfg, output_dir=str(out / "sft"), seed=seed, resume=None)
    settings = json.loads(json.dumps({k: v for k, v in config.to_dict(cfg).items() if k != "output_dir"}))
    key = out / "sft_settings.json"  # written once SFT has finished: a killed run is not reused
    if key.is_file() and json.loads(key.read_text()) == settings:
        print(f"bench agents: reusing the SFT policy in {cfg.output_dir} (same settings)")
        return cfg.output_dir, True
    key.unlink(missing_ok=True)
    sft.main(cfg)
    key.write_text(json.dumps(settings, indent=2))
    return cfg.output_dir, False


def held_out(m: dict) -> dict:
    """The held-out evaluation's numbers from a PPO metrics row."""
    return {"success": m["eval/success"], "greedy_success": m["eval/greedy/success"], "kl": m["eval/kl"],
            "return": m["eval/return"], "turns": m["eval/turns"], "tool_calls": m["eval/tool_calls"],
            "tokens": m["eval/tokens"]}


def run_trained(pl: Plan, method: str, group_size: int, sft_dir: str, out: Path, seed: int) -> dict:
    from rlhf import ppo

    history = ppo.main(method_config(pl.task.ppo, method, group_size, pl.steps, sft_dir, out, seed), save=False)
    evals = [m for m in history if "eval/success" in m]
    steps = [m for m in history if "rollout/samples" in m]
    return {"before": held_out(evals[0]), "after": held_out(evals[-1]), "iterations": len(steps),
            "episodes": sum(int(m["rollout/samples"]) for m in steps),
            "tokens": sum(int(m["rollout/sampled_tokens"]) for m in steps),
            "train_time_s": sum(m["time/step"] for m in steps)}


def run_best_of_n(pl: Plan, sft_dir: str, seed: int) -> dict:
    """n episodes per held-out row from the SFT policy with the held-out evaluation's sampling options; the
    highest return of each row's n is kept (the first on ties)."""
    from policies.models import load_tokenizer
    from rlhf.envs.episodes import EngineSampler, load_rows, run_episodes
    from rlhf.envs.interface import load_environment_class, make_environment
    from rlhf.evaluation.eval_policy import load_lm
    from rlhf.generation.hf_engine import HFEngine
    from rlhf.generation.sampling import stop_token_id
    from rlhf.ppo.rollout import sampling

    c, n = pl.task.ppo, pl.n
    tok = load_tokenizer(sft_dir, c.model)
    sample = sampling(c.ppo, stop_token_id(tok, c.ppo.stop_token, "ppo.stop_token"))
    sample = replace(sample, temperature=c.eval.temperature or sample.temperature)
    rows = load_rows(c.eval.prompts, max_samples=c.eval.max_prompts)
    repeated = [r for r in rows for _ in range(n)]  # each row's n episodes in a row
    cls = load_environment_class(c.env.spec)
    envs = [make_environment(cls, c.env) for _ in repeated]
    engine = HFEngine.for_model(load_lm(sft_dir).eval(), tok.pad_token_id, batch_size=256)
    ep = run_episodes(envs, repeated, tok, EngineSampler(engine, sample, seed=seed * 7919 + 1), c.env, seed)
    returns = ep.returns.reshape(len(rows), n)  # (R, n)
    pick = returns.argmax(dim=1, keepdim=True)  # (R, 1): argmax returns the first maximum
    chosen = lambda t: t.reshape(len(rows), n).float().gather(1, pick).mean().item()  # noqa: E731
    every = lambda t: t.float().mean().item()  # noqa: E731  (n = 1: the SFT policy's samples)
    return {"n": n, "before": {"success": every(ep.success), "return": every(ep.returns), "turns": every(ep.turns),
                               "tool_calls": every(ep.tool_calls), "tokens": every(ep.tokens)},
            "after": {"success": chosen(ep.success), "return": chosen(ep.returns), "turns": chosen(ep.turns),
                      "tool_calls": chosen(ep.tool_calls), "tokens": chosen(ep.tokens),
                      "kl_bound": bm.best_of_n_kl(n)},
            "episodes": len(repeated), "tokens": int(ep.action_mask.sum())}


# ---------------------------------------------------------------------------------------------
# report


def _arrow(before: float, after: float, digits: int = 3) -> str:
    return f"{before:.{digits}f} → {after:.{digits}f}"


def _mean(values: list[float], digits: int = 3) -> str:
    mean, se = bm.mean_and_se(values)
    return f"{mean:.{digits}f}" + ("" if se != se else f" ± {se:.{digits}f}")


def _label(method: str, n: int) -> str:
    return f"best-of-{n} (true reward)" if method == "best_of_n" else LABELS[method]


def _cells(method: str, r: dict) -> list[str]:
    """One run's cells: success sampled and greedy before -> after, KL, turns, tool calls, sample cost, time."""
    b, a = r["before"], r["after"]
    greedy = "—" if method == "best_of_n" else _arrow(b["greedy_success"], a["greedy_success"])
    kl = f"≤ {a['kl_bound']:.2f}" if method == "best_of_n" else f"{a['kl']:.2f}"
    return [_arrow(b["success"], a["success"]), greedy, kl, _arrow(b["turns"], a["turns"], 2),
            _arrow(b["tool_calls"], a["tool_calls"], 2), str(r["episodes"]), str(r["tokens"]), f"{r['time_s']:.0f}"]


def markdown(cfg: BenchAgentsConfig, report: dict) -> str:
    pl, seeds = report["plan"], report["seeds"]
    env = report["env"]
    head = ("| method | seed | success, sampled: before → after | greedy: before → after | KL to SFT | "
            "turns / episode | tool calls / episode | episodes sampled | agent tokens sampled | wall (s) |")
    lines = ["# Agent benchmark: held-out success of each method from one SFT policy", "",
             f"Task `{report['task']}`: environment `{env['spec']}`, held-out rows `{env['eval_prompts']}` "
             f"({pl['heldout_rows']}), seeds {[s['seed'] for s in seeds]}. Every trained method: {pl['steps']} "
             f"iterations of {pl['rollout']} episodes ({pl['budget']} in all) from the same SFT policy "
             f"(grpo, rloo: {pl['rollout'] // cfg.group_size} rows × {cfg.group_size}; ppo, reinforce_pp: "
             f"{pl['rollout']} rows × 1), every other setting the task's. Success before → after is measured on "
             "the held-out rows by the environment (sampled at the evaluation temperature, and greedy); KL is "
             "KL(policy ‖ SFT) in nats per episode over the agent's tokens, on the policy's own samples. "
             f"Best-of-{pl['n']}: {pl['n']} SFT episodes per held-out row, the one with the highest environment "
             "return kept; it uses the true reward at test time (an upper-bound style baseline, not a trained "
             "policy): its before is the mean over all its samples, its KL the analytic bound log n − (n−1)/n, "
             f"its sample cost {pl['n']} × {pl['heldout_rows']} episodes at test time.", "",
             "## Per seed", "", head, "|---|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for m in cfg.methods:
            if m in s["methods"]:
                lines.append(f"| {_label(m, pl['n'])} | {s['seed']} | " + " | ".join(_cells(m, s["methods"][m])) + " |")
    lines += ["", "## Mean over seeds (± standard error)", "",
              "| method | seeds | success sampled (after) | Δ sampled | greedy (after) | Δ greedy | KL to SFT | "
              "turns | tool calls | episodes sampled | agent tokens sampled | wall (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in cfg.methods:
        runs = [s["methods"][m] for s in seeds if m in s["methods"]]
        if not runs:
            continue
        get = lambda side, k: [r[side][k] for r in runs]  # noqa: E731
        delta = lambda k: [r["after"][k] - r["before"][k] for r in runs]  # noqa: E731
        bon = m == "best_of_n"
        lines.append(" | ".join([
            f"| {_label(m, pl['n'])}", str(len(runs)), _mean(get("after", "success")), _mean(delta("success")),
            "—" if bon else _mean(get("after", "greedy_success")), "—" if bon else _mean(delta("greedy_success")),
            f"≤ {runs[0]['after']['kl_bound']:.2f}" if bon else _mean(get("after", "kl"), 2),
            _mean(get("after", "turns"), 2), _mean(get("after", "tool_calls"), 2),
            _mean([r["episodes"] for r in runs], 0), _mean([r["tokens"] for r in runs], 0),
            _mean([r["time_s"] for r in runs], 0)]) + " |")
    loads = [s["load_average"] for s in seeds]
    lines += ["", f"SFT per seed: {', '.join(_sft_note(s) for s in seeds)}. Wall time is each method's whole "
              "run, its two held-out evaluations included (best-of-n: loading and sampling). 1-minute load "
              f"average of the machine at the start of each seed: {', '.join(f'{x:.1f}' for x in loads)} "
              f"({os.cpu_count()} cores)."]
    return "\n".join(lines) + "\n"


def _sft_note(s: dict) -> str:
    took = "reused" if s["sft_reused"] else f"{s['sft_time_s']:.0f} s"
    return f"seed {s['seed']} {took}"


def main(cfg: BenchAgentsConfig) -> dict:
    from rlhf import config

    pl = plan(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(cfg, out / "rlhf_config.yaml")
    report = {"task": cfg.task, "env": {"spec": pl.task.ppo.env.spec, "eval_prompts": pl.task.ppo.eval.prompts},
              "plan": {"steps": pl.steps, "rollout": pl.rollout, "budget": pl.budget,
                       "heldout_rows": pl.heldout_rows, "n": pl.n},
              "config": config.to_dict(cfg), "seeds": []}
    for seed in cfg.seeds:
        print(f"\n=== bench agents: seed {seed} ===")
        seed_out = out / f"seed_{seed}"
        seed_out.mkdir(parents=True, exist_ok=True)
        result = {"seed": seed, "load_average": os.getloadavg()[0], "methods": {}}
        report["seeds"].append(result)
        t = time.perf_counter()
        sft_dir, result["sft_reused"] = cached_sft(pl.task.sft, seed_out, seed)
        result["sft_time_s"] = time.perf_counter() - t
        for method in cfg.methods:
            print(f"\n--- bench agents: seed {seed}, {method} ---")
            t = time.perf_counter()
            with PeakMemory() as memory:
                record = run_best_of_n(pl, sft_dir, seed) if method == "best_of_n" else \
                    run_trained(pl, method, cfg.group_size, sft_dir, seed_out / method, seed)
            record.update(time_s=time.perf_counter() - t, peak_memory_gb=memory.peak_gb,
                          load_average_after=os.getloadavg()[0])
            result["methods"][method] = record
            write_results(out, report, markdown(cfg, report))  # as soon as each method is done
    md = markdown(cfg, report)
    print("\n" + md)
    print(f"written: {out / 'result.md'}, {out / 'result.json'}")
    return report
