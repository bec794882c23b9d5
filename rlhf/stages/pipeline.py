"""The whole alignment pipeline in one command (`rlhf pipeline`): SFT -> reward model -> PPO, or SFT -> DPO.

    rlhf pipeline --config configs/quickstart.yaml
    rlhf pipeline --config configs/quickstart.yaml --stages sft dpo

Each stage is the stage command's own `main`, run with its section of the config; the pipeline only
wires outputs to inputs: the SFT output is PPO's initial policy (and, with `reward_base: sft`, the
reward model's base, as in InstructGPT), the reward model scores PPO's responses. With `dpo` in
place of `reward` and `ppo`, the SFT output is the policy DPO starts from and its reference. It ends with a
report (report.md, report.json) and PNG plots of the training curves in output_dir.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rlhf import config
from rlhf.config import DPOConfig, RewardConfig, Seed, SFTConfig, domain
from rlhf.errors import UserError
from rlhf.ppo.config import PPOConfig

STAGES = ("sft", "reward", "ppo", "dpo")
Stages = domain(lambda v: all(s in STAGES for s in v), f"some of {', '.join(STAGES)}")


@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO, or SFT -> DPO (`rlhf pipeline`)."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    output_dir: str = "runs/pipeline"
    """Each stage writes to output_dir/<stage>; the report and plots go here."""
    stages: Stages[list[str]] = field(default_factory=lambda: ["sft", "reward", "ppo"])
    """Stages to run, in order (some of sft, reward, ppo; or sft, dpo); a stage left out that a later one
    needs uses its existing output in output_dir."""
    reward_base: Literal["sft", "config"] = "sft"
    """Start the reward model from the SFT output (`sft`), or from reward.model as configured."""
    seed: Seed[Optional[int]] = None
    """Seed of every stage (sets sft.seed, reward.seed, ppo.seed and dpo.seed); None keeps each stage's own."""


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """Point every stage's inputs at the previous stages' outputs."""
    if "dpo" in cfg.stages and "ppo" in cfg.stages:
        raise UserError("stages: dpo takes the place of reward and ppo (both train the SFT policy); run one of them")
    out = Path(cfg.output_dir)
    cfg.sft.output_dir = str(out / "sft")
    cfg.reward.output_dir = str(out / "reward")
    cfg.ppo.output_dir = str(out / "ppo")
    cfg.dpo.output_dir = str(out / "dpo")
    if cfg.reward_base == "sft":
        cfg.reward.model.name_or_path = cfg.sft.output_dir
    cfg.ppo.model.name_or_path = cfg.sft.output_dir
    cfg.ppo.reward.spec = cfg.reward.output_dir
    cfg.ppo.reward.kind = "preference"
    cfg.dpo.model.name_or_path = cfg.sft.output_dir  # the SFT policy: where DPO starts, and its reference
    for stage in (cfg.sft, cfg.reward, cfg.ppo, cfg.dpo):  # one W&B group per pipeline run
        stage.tracking.group = stage.tracking.group or out.resolve().name
        if cfg.seed is not None:
            stage.seed = cfg.seed
    return cfg


def _check_source(option: str, source: str | None) -> None:
    """A data source that is a local file (or `builtin:`) exists; a hub dataset is left to its stage."""
    from rlhf.data.sources import LOCAL_SUFFIXES, resolve_source

    if source is None:
        return
    try:
        path = resolve_source(source)
    except UserError as e:
        raise UserError(f"{option}: {e}") from None
    if (Path(path).suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~"))) \
            and not Path(path).expanduser().is_file():
        raise UserError(f"{option}: data file '{source}' does not exist")


def check_inputs(cfg: PipelineConfig) -> None:
    """What the later stages read that does not come from an earlier stage, checked before the first
    trains (a PPO prompt file that is missing must not cost an SFT and a reward model run): data files,
    PPO's prompts (loaded: they are few), reward functions (imported), and ppo.stop_token (in the
    vocabulary of the tokenizer the SFT stage passes on)."""
    from policies import models
    from reward.interface import is_function_spec, load_function
    from rlhf.generation.prompts import load_prompts
    from rlhf.generation.sampling import check_stop_token
    from rlhf.ppo.config import PromptDataConfig, batch_sizes

    sizes = batch_sizes(cfg.ppo.ppo, int(os.environ.get("WORLD_SIZE", "1")))
    sources = []
    if "sft" in cfg.stages:
        sources += [("sft.data.train", cfg.sft.data.train), ("sft.data.validation", cfg.sft.data.validation)]
    if "reward" in cfg.stages:
        sources += [("reward.data.train", cfg.reward.data.train),
                    ("reward.data.validation", cfg.reward.data.validation)]
    if "ppo" in cfg.stages:
        sources += [("ppo.data.train", cfg.ppo.data.train), ("ppo.eval.prompts", cfg.ppo.eval.prompts)]
    if "dpo" in cfg.stages:
        sources += [("dpo.data.train", cfg.dpo.data.train), ("dpo.data.validation", cfg.dpo.data.validation),
                    ("dpo.eval.prompts", cfg.dpo.eval.prompts)]
    for option, source in sources:
        _check_source(option, source)
    for stage in ("ppo", "dpo"):  # the held-out evaluations: their prompts load, their judge exists
        e = getattr(cfg, stage).eval
        if stage not in cfg.stages or e.prompts is None:
            continue
        if stage == "ppo" and cfg.ppo.env.spec:  # held-out episode rows; the environment judges
            from rlhf.envs.episodes import load_rows

            load_rows(e.prompts, max_samples=e.max_prompts)
            continue
        load_prompts(PromptDataConfig(train=e.prompts, format=e.format))
        judge = e.reward.spec
        if judge is not None and (e.reward.kind == "function" or is_function_spec(judge)):
            load_function(judge)  # its file or module imports, the function exists and takes (prompts, responses)
        elif judge is not None and models.looks_local(judge) and not Path(judge).expanduser().exists():
            raise UserError(f"{stage}.eval.reward.spec: {judge} does not exist{models.creating_command(judge)}")
    if "ppo" not in cfg.stages:
        return
    if cfg.ppo.env.spec:
        from rlhf.envs.episodes import load_rows
        from rlhf.envs.interface import load_environment_class

        load_environment_class(cfg.ppo.env.spec)
        d = cfg.ppo.data
        prompts = load_rows(d.train, d.split, d.column_map, d.max_samples)
    else:
        prompts = load_prompts(cfg.ppo.data)
    if len(prompts) < sizes.global_prompts:
        raise UserError(f"ppo.data.train: {len(prompts)} prompts, fewer than one rollout batch needs "
                        f"({sizes.global_prompts})")
    stop = cfg.ppo.ppo.stop_token
    if stop not in (None, "eos"):
        source = cfg.sft.model if "sft" in cfg.stages else None
        if source is not None and source.name_or_path == models.TINY:
            from policies import tiny

            vocab = tiny.load_tokenizer().get_vocab()
        else:  # the base SFT starts from, or the SFT output already there; SFT keeps its vocabulary
            name = source.name_or_path if source is not None else cfg.sft.output_dir
            vocab = models.load_tokenizer(name, source or cfg.ppo.model).get_vocab()
        check_stop_token(stop, vocab)


def main(cfg: PipelineConfig) -> dict:
    from rlhf.ppo import trainer as ppo
    from rlhf.runtime.outputs import check_output_dir
    from rlhf.stages import dpo, reward_stage, sft
    from rlhf.validate import validate

    validate(cfg)  # every field's domain, named from the top (sft.train.eval_steps), also for configs built in Python
    cfg = wire(cfg)
    out = Path(cfg.output_dir)
    # Every stage's settings are checked before the first one trains (not PPO's after SFT and the RM ran).
    check_output_dir(out)
    checks = {"sft": sft.check, "reward": reward_stage.check, "ppo": ppo.check, "dpo": dpo.check}
    for stage, check in checks.items():
        if stage != "dpo" or "dpo" in cfg.stages:
            try:
                check(getattr(cfg, stage))
            except UserError as e:  # the stage's rule names its fields from the stage's own config
                raise UserError(f"{stage}: {e}") from None
    # what the stages that run read (PPO in an environment is rewarded by it: no reward model)
    needed = {"sft"} | ({"reward"} if "ppo" in cfg.stages and not cfg.ppo.env.spec else set())
    for stage in sorted(needed, key=STAGES.index):
        if stage not in cfg.stages and not (out / stage / "config.json").exists() \
                and not (out / stage / "adapter_config.json").exists():
            raise UserError(f"stages leaves out '{stage}', but {out / stage} holds no trained model to reuse")
    check_inputs(cfg)
    timings, results = {}, {}
    runners = {"sft": lambda: sft.main(cfg.sft), "reward": lambda: reward_stage.main(cfg.reward),
               "ppo": lambda: ppo.main(cfg.ppo), "dpo": lambda: dpo.main(cfg.dpo)}
    for stage in STAGES:
        if stage in cfg.stages:
            print(f"\n=== pipeline: {stage} -> {out / stage}\n")
            t0 = time.perf_counter()
            results[stage] = runners[stage]()
            timings[stage] = time.perf_counter() - t0
    config.save(cfg, out / "rlhf_config.yaml")
    judge = (f"success in {cfg.ppo.env.spec}" if cfg.ppo.env.spec else cfg.ppo.eval.reward.spec) \
        if cfg.ppo.eval.prompts else None
    report = write_report(out, timings, judge)
    print("\n" + (out / "report.md").read_text())
    verdict = report.get("heldout", {}).get("hacking")
    if verdict:
        print(verdict)
    elif "heldout" not in report and "ppo" in report:
        print("note: no held-out evaluation was configured (ppo.eval); the reward-model score alone is not evidence "
              "that the policy improved")
    elif "heldout" not in report and "dpo" in report:
        print("note: no held-out evaluation was configured (dpo.eval); the validation reward accuracy alone is not "
              "evidence that the policy improved")
    return report


def _trainer_log(stage_dir: Path) -> list[dict]:
    """The transformers Trainer's log history, from the newest checkpoint of a stage."""
    states = sorted(stage_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"] if states else []


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [m[key] for m in rows if key in m]
    return sum(vals) / len(vals) if vals else None


def hacking_verdict(before: dict, after: dict) -> str | None:
    """Words for the report and the console when the proxy rose while the true metric fell."""
    if after["eval/proxy"] > before["eval/proxy"] and after["eval/reward"] < before["eval/reward"] - \
            2 * max(after.get("eval/reward_stderr", 0.0), 1e-12):
        return (f"WARNING: the reward model's score rose ({before['eval/proxy']:.3f} -> {after['eval/proxy']:.3f}) "
                f"while the held-out reward fell ({before['eval/reward']:.3f} -> {after['eval/reward']:.3f}): "
                "PPO exploited the reward model (reward hacking); this is not an improvement.")
    return None


def write_report(out: Path, timings: dict[str, float], eval_reward: str | None = None) -> dict:
    """report.json, report.md and plots/*.png from what the stages wrote."""
    report: dict = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "outputs": {}}
    sft_metrics = out / "sft" / "metrics.json"
    if sft_metrics.exists():
        m = json.loads(sft_metrics.read_text())
        report["sft"] = {k: m.get(k) for k in ("eval_loss_before", "eval_loss_after", "global_step")}
        report["outputs"]["sft"] = str(out / "sft")
    rm_metrics = out / "reward" / "metrics.json"
    if rm_metrics.exists():
        m = json.loads(rm_metrics.read_text())
        report["reward"] = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
        report["outputs"]["reward"] = str(out / "reward")
    dpo_metrics = out / "dpo" / "metrics.json"
    if dpo_metrics.exists():
        m = json.loads(dpo_metrics.read_text())
        report["dpo"] = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
        report["outputs"]["dpo_policy"] = str(out / "dpo")
        if "heldout" in m:  # the DPO stage's held-out evaluation: `rlhf eval policy` of its output against its start
            h = m["heldout"]
            report["heldout"] = {"stage": "DPO", "eval_reward": h["eval_reward"], "before": h["before"],
                                 "after": h["after"], "hacking": None, "hacking_flagged_during_run": False,
                                 "policy": h["policy"], "reference": h["reference"], "win_rate": h["win_rate"]}
            report["samples"] = [{"mode": h["samples_mode"], "prompt": x["prompt"], "before": x["reference"],
                                  "before_reward": x["reward_reference"], "after": x["policy"],
                                  "after_reward": x["reward_policy"]} for x in h["samples"]]
    history = _read_jsonl(out / "ppo" / "metrics.jsonl")
    train = [m for m in history if "objective/scores" in m]
    evals = [m for m in history if "eval/reward" in m]
    if train:
        report["ppo"] = {
            "steps": len(train),
            "score_first5": _mean(train[:5], "objective/scores"), "score_last5": _mean(train[-5:], "objective/scores"),
            "kl_last5": _mean(train[-5:], "objective/kl"),
            "eos_rate_last5": _mean(train[-5:], "response/eos_rate"),
            "seconds_per_step": _mean(train, "time/step"),
        }
        report["outputs"]["ppo_policy"] = str(out / "ppo" / "policy")
    if len(evals) >= 2:
        before, after = evals[0], evals[-1]
        keys = [k for k in before if k.startswith("eval/") and k in after]
        report["heldout"] = {"stage": "PPO", "eval_reward": eval_reward, "before_step": before["step"],
                             "after_step": after["step"],
                             "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
                             "hacking": hacking_verdict(before, after),
                             "hacking_flagged_during_run": any(m.get("eval/hacking") for m in evals)}
        report["samples"] = _before_after_samples(out / "ppo" / "eval_samples.jsonl", before["step"], after["step"])
    report["plots"] = plot(out, history)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report, out))
    return report


def _before_after_samples(path: Path, first: int, last: int, n: int = 8) -> list[dict]:
    """The same held-out prompts answered by the starting policy and the trained one (greedy if scored)."""
    rows = _read_jsonl(path)
    mode = "greedy" if any(r["mode"] == "greedy" for r in rows) else "sampled"
    pick = lambda step: [r for r in rows if r["step"] == step and r["mode"] == mode]  # noqa: E731
    return [{"mode": mode, "prompt": a["prompt"][-1]["content"], "before": a["response"], "before_reward": a["reward"],
             "before_proxy": a["proxy"], "after": b["response"], "after_reward": b["reward"], "after_proxy": b["proxy"]}
            for a, b in list(zip(pick(first), pick(last)))[:n]]


def _verdict(before: dict, after: dict, stage: str) -> str:
    """Did the true metric rise, on sampled answers and (when scored) on greedy ones?"""
    modes = [(name, key) for name, key in (("sampled", "eval/reward"), ("greedy", "eval/greedy/reward"))
             if key in before and key in after]
    rose = [name for name, key in modes if after[key] > before[key]]
    if len(rose) == len(modes):
        return f"The true metric rose{' with the proxy' if 'eval/proxy' in after else ''}."
    if not rose:
        return f"The true metric did not rise: {stage} did not improve what it was meant to."
    change = ", ".join(f"{name} answers {before[key]:.3f} -> {after[key]:.3f}" for name, key in modes)
    return f"The true metric rose on {rose[0]} answers only ({change})."


def _markdown(r: dict, out: Path) -> str:
    lines = ["# Pipeline report", ""]
    h = r.get("heldout")
    if h:
        b, a, stage = h["before"], h["after"], h["stage"]
        judge = f"`{h['eval_reward']}`" if h["eval_reward"] else "the training reward (no eval.reward set)"
        lines += [f"## Before and after {stage}, on held-out prompts", ""]
        if stage == "PPO":
            lines += [f"True metric: {judge}. Proxy: the reward model PPO optimised. Both score the same answers "
                      f"to the same held-out prompts, before PPO (step {h['before_step']}, the SFT policy) and after "
                      f"(step {h['after_step']}).", ""]
        else:
            lines += [f"True metric: {judge}, scoring the answers of the policy DPO started from (`{h['reference']}`) "
                      f"and of the trained one (`{h['policy']}`) to the same held-out prompts (`rlhf eval policy`); "
                      f"the trained policy's win rate over its start: {h['win_rate']:.3f} (sampled answers).", ""]
        lines += [f"| | before {stage} | after {stage} | change |", "|---|---|---|---|"]
        rows = [("**true metric**, sampled answers", "eval/reward"), ("**true metric**, greedy answers", "eval/greedy/reward"),
                ("proxy (reward model), sampled", "eval/proxy"), ("proxy (reward model), greedy", "eval/greedy/proxy"),
                ("proxy orders answer pairs as the true metric does (AUC)", "eval/proxy_agreement"),
                ("KL to the SFT policy (nats per answer)", "eval/kl"), ("answer length (tokens)", "eval/length"),
                ("EOS rate", "eval/eos_rate")]
        lines += [f"| {name} | {b[k]:.3f} | {a[k]:.3f} | {a[k] - b[k]:+.3f} |" for name, k in rows if k in b and k in a]
        lines.append("")
        lines.append(f"**{h['hacking']}**" if h["hacking"] else _verdict(b, a, stage))
        if h["hacking_flagged_during_run"]:
            lines.append("\nDuring the run, the proxy rose while the held-out reward fell over an evaluation window "
                         "(eval/hacking in metrics.jsonl).")
        lines.append("")
    if "sft" in r:
        s = r["sft"]
        lines.append(f"- **SFT**: validation loss {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f} "
                     f"in {s['global_step']} steps")
    if "reward" in r:
        before, after = r["reward"].get("eval_accuracy_before"), r["reward"].get("eval_accuracy")
        lines.append(f"- **Reward model**: held-out pairwise accuracy {before:.3f} -> {after:.3f}"
                     if before is not None and after is not None else "- **Reward model**: trained")
    if "dpo" in r:
        d = r["dpo"]
        lines.append(f"- **DPO** ({d['global_step']} steps): validation reward accuracy "
                     f"{d['eval_rewards/accuracies_before']:.3f} -> {d['eval_rewards/accuracies']:.3f}, reward margin "
                     f"{d['eval_rewards/margins']:.3f}, loss {d['eval_loss_before']:.3f} -> {d['eval_loss']:.3f} "
                     "(the implicit reward beta * log pi/ref of the SFT policy's own replies is 0 before training)"
                     if "eval_loss_before" in d else f"- **DPO** ({d['global_step']} steps): trained")
    if "ppo" in r:
        p = r["ppo"]
        lines.append(f"- **PPO** ({p['steps']} steps, {p['seconds_per_step']:.2f} s/step): training reward-model score "
                     f"{p['score_first5']:.3f} -> {p['score_last5']:.3f} (mean of the first / last 5 steps), "
                     f"KL {p['kl_last5']:.3f}, EOS rate {p['eos_rate_last5']:.2f} (last 5 steps)")
        if not h:
            lines.append("  - No held-out evaluation was configured (`ppo.eval.prompts`, `ppo.eval.reward`): the "
                         "reward-model score alone does not show that the policy improved.")
    if r.get("samples"):
        def clean(t: str) -> str:  # a long cell keeps its start and its end (an episode's answer), cut marked
            t = t.replace("\n", " ")
            return (t if len(t) <= 90 else t[:40] + " … " + t[-45:]).replace("|", "\\|")

        proxy = "before_proxy" in r["samples"][0]
        stage = h["stage"] if h else "training"
        lines += ["", f"## The same prompts before and after {stage} ({r['samples'][0]['mode']} answers)", "",
                  "| prompt | before | true | proxy | after | true | proxy |" if proxy else
                  "| prompt | before | true | after | true |",
                  "|---|---|---|---|---|---|---|" if proxy else "|---|---|---|---|---|"]
        for x in r["samples"]:
            cells = [clean(x["prompt"])]
            for side in ("before", "after"):
                cells += [clean(x[side]), f"{x[f'{side}_reward']:.2f}"] + ([f"{x[f'{side}_proxy']:.2f}"] if proxy else [])
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r["timings_s"].items()]
    lines += ["", "Outputs:"] + [f"- {k}: `{v}`" for k, v in r["outputs"].items()]
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).relative_to(out)})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def smooth(values: list[float], alpha: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** i))
    return out


def plot(out: Path, history: list[dict]) -> list[str]:
    """Training curves as PNGs (matplotlib, no display needed): raw values faint, a smoothed line over
    them, training and validation on one panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(plots_dir / name, dpi=100)
        plt.close(fig)
        written.append(str(plots_dir / name))

    def curve(ax, pts, label, color, smoothed=True):
        if not pts:
            return
        x, y = zip(*pts)
        if smoothed and len(pts) > 3:
            ax.plot(x, y, color=color, alpha=0.25, linewidth=1)
            ax.plot(x, smooth(list(y)), color=color, label=f"{label} (smoothed)")
        else:
            ax.plot(x, y, color=color, marker="o", label=label)

    def points(rows, key):
        return [(m["step"], m[key]) for m in rows if key in m and m[key] is not None]

    accuracy_key = {"reward": "eval_accuracy", "dpo": "eval_rewards/accuracies"}
    for stage, title in (("sft", "SFT"), ("reward", "Reward model"), ("dpo", "DPO")):
        log = _trainer_log(out / stage)
        if not log:
            continue
        panels = 2 if stage in accuracy_key else 1
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
        ax = axes[0][0]
        curve(ax, points(log, "loss"), "train loss", "tab:blue")
        curve(ax, points(log, "eval_loss"), "validation loss", "tab:orange", smoothed=False)
        ax.set(title=f"{title}: loss", xlabel="optimizer step",
               ylabel="loss (nats per token)" if stage == "sft" else "pairwise loss (nats per pair)")
        ax.legend()
        if stage in accuracy_key:
            ax = axes[0][1]
            curve(ax, points(log, accuracy_key[stage]), "validation accuracy", "tab:orange", smoothed=False)
            ax.set(title=f"{title}: {'reward ' if stage == 'dpo' else ''}pairwise accuracy", xlabel="optimizer step",
                   ylabel="accuracy (share of pairs)", ylim=(0, 1.02))
            ax.legend()
        save(fig, f"{stage}.png")

    train = [m for m in history if "objective/scores" in m]
    evals = [m for m in history if "eval/reward" in m]
    if train:
        def train_and_heldout(ax, train_key, eval_key, title, ylabel):
            curve(ax, points(train, train_key), "training batches", "tab:blue")
            curve(ax, points(evals, eval_key), "held-out prompts", "tab:orange", smoothed=False)
            ax.set(title=title, xlabel="PPO iteration", ylabel=ylabel)
            ax.legend()

        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        train_and_heldout(axes[0][0], "objective/scores", "eval/proxy", "Proxy: reward-model score",
                          "reward-model score (raw)")
        ax = axes[0][1]
        if evals:
            curve(ax, points(evals, "eval/reward"), "held-out, sampled", "tab:green", smoothed=False)
            curve(ax, points(evals, "eval/greedy/reward"), "held-out, greedy", "tab:olive", smoothed=False)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no held-out evaluation\n(set ppo.eval.prompts and ppo.eval.reward)",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set(title="True metric: held-out reward", xlabel="PPO iteration", ylabel="held-out reward (mean)")
        train_and_heldout(axes[1][0], "objective/kl", "eval/kl", "KL(policy || SFT policy)", "KL (nats per answer)")
        ax = axes[1][1]
        curve(ax, points(train, "response/length"), "length, training", "tab:blue")
        curve(ax, points(evals, "eval/length"), "length, held-out", "tab:orange", smoothed=False)
        ax.set(title="Answer length", xlabel="PPO iteration", ylabel="tokens per answer")
        ax2 = ax.twinx()
        curve(ax2, points(train, "response/eos_rate"), "EOS rate, training", "tab:gray")
        ax2.set(ylabel="EOS rate (share of answers)", ylim=(0, 1.05))
        ax.legend(loc="upper left")
        ax2.legend(loc="lower right")
        save(fig, "ppo.png")
    return written
