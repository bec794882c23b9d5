"""The whole alignment pipeline in one command (`rlhf pipeline`): SFT -> reward model -> PPO.

    rlhf pipeline --config configs/quickstart.yaml

Each stage is the stage command's own `main`, run with its section of the config; the pipeline only
wires outputs to inputs: the SFT output is PPO's initial policy (and, with `reward_base: sft`, the
reward model's base, as in InstructGPT), the reward model scores PPO's responses. It ends with a
report (report.md, report.json) and PNG plots of the training curves in output_dir.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf import config
from rlhf.config import RewardConfig, SFTConfig
from rlhf.errors import UserError
from rlhf.ppo import PPOConfig

STAGES = ("sft", "reward", "ppo")


@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO (`rlhf pipeline`)."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    output_dir: str = "runs/pipeline"
    """Each stage writes to output_dir/<stage>; the report and plots go here."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in order; a stage left out uses its existing output in output_dir."""
    reward_base: Literal["sft", "config"] = "sft"
    """Start the reward model from the SFT output (`sft`), or from reward.model as configured."""


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """Point every stage's inputs at the previous stages' outputs."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise UserError(f"stages: unknown stage(s) {unknown}; expected some of {', '.join(STAGES)}")
    out = Path(cfg.output_dir)
    cfg.sft.output_dir = str(out / "sft")
    cfg.reward.output_dir = str(out / "reward")
    cfg.ppo.output_dir = str(out / "ppo")
    if cfg.reward_base == "sft":
        cfg.reward.model.name_or_path = cfg.sft.output_dir
    cfg.ppo.model.name_or_path = cfg.sft.output_dir
    cfg.ppo.reward.spec = cfg.reward.output_dir
    cfg.ppo.reward.kind = "preference"
    for stage in (cfg.sft, cfg.reward, cfg.ppo):  # one W&B group per pipeline run
        stage.tracking.group = stage.tracking.group or out.resolve().name
    return cfg


def main(cfg: PipelineConfig) -> dict:
    from rlhf import ppo, reward_stage, sft

    cfg = wire(cfg)
    out = Path(cfg.output_dir)
    for stage in ("sft", "reward"):
        if stage not in cfg.stages and not (out / stage / "config.json").exists() \
                and not (out / stage / "adapter_config.json").exists():
            raise UserError(f"stages leaves out '{stage}', but {out / stage} holds no trained model to reuse")
    timings, results = {}, {}
    runners = {"sft": lambda: sft.main(cfg.sft), "reward": lambda: reward_stage.main(cfg.reward),
               "ppo": lambda: ppo.main(cfg.ppo)}
    for stage in STAGES:
        if stage in cfg.stages:
            print(f"\n=== pipeline: {stage} -> {out / stage}\n")
            t0 = time.perf_counter()
            results[stage] = runners[stage]()
            timings[stage] = time.perf_counter() - t0
    config.save(cfg, out / "rlhf_config.yaml")
    report = write_report(out, timings)
    print("\n" + (out / "report.md").read_text())
    return report


def _window_mean(history: list[dict], key: str, first: bool, n: int = 5) -> float:
    rows = history[:n] if first else history[-n:]
    return sum(m[key] for m in rows) / len(rows)


def _trainer_log(stage_dir: Path) -> list[dict]:
    """The transformers Trainer's log history, from the newest checkpoint of a stage."""
    states = sorted(stage_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"] if states else []


def write_report(out: Path, timings: dict[str, float]) -> dict:
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
    ppo_file = out / "ppo" / "metrics.jsonl"
    history = [json.loads(line) for line in ppo_file.read_text().splitlines()] if ppo_file.exists() else []
    if history:
        report["ppo"] = {
            "steps": len(history),
            "score_first5": _window_mean(history, "objective/scores", True),
            "score_last5": _window_mean(history, "objective/scores", False),
            "kl_first5": _window_mean(history, "objective/kl", True),
            "kl_last5": _window_mean(history, "objective/kl", False),
            "eos_rate_last5": _window_mean(history, "response/eos_rate", False),
            "seconds_per_step": sum(m["time/step"] for m in history) / len(history),
        }
        report["outputs"]["ppo_policy"] = str(out / "ppo" / "policy")
        report["outputs"]["ppo_checkpoints"] = sorted(str(p) for p in (out / "ppo").glob("checkpoint-*"))
    report["plots"] = plot(out, history)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lines = ["# Pipeline report", ""]
    if "sft" in r:
        s = r["sft"]
        lines.append(f"- **SFT**: validation loss {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f} "
                     f"in {s['global_step']} steps")
    if "reward" in r:
        before, after = r["reward"].get("eval_accuracy_before"), r["reward"].get("eval_accuracy")
        lines.append(f"- **Reward model**: validation pairwise accuracy {before:.3f} -> {after:.3f}"
                     if before is not None and after is not None else "- **Reward model**: trained")
    if "ppo" in r:
        p = r["ppo"]
        lines.append(f"- **PPO** ({p['steps']} steps, {p['seconds_per_step']:.2f} s/step): reward-model score "
                     f"{p['score_first5']:.3f} -> {p['score_last5']:.3f} (mean of the first / last 5 steps), "
                     f"KL to the SFT policy {p['kl_first5']:.3f} -> {p['kl_last5']:.3f}, "
                     f"EOS rate {p['eos_rate_last5']:.2f}")
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r["timings_s"].items()]
    lines += ["", "Outputs:"] + [f"- {k}: `{v}`" for k, v in r["outputs"].items()]
    lines += ["", "Plots:"] + [f"- `{p}`" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def plot(out: Path, history: list[dict]) -> list[str]:
    """Training curves as PNGs (matplotlib, no display needed)."""
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

    for stage, keys in (("sft", ("loss", "eval_loss")), ("reward", ("loss", "eval_loss", "eval_accuracy"))):
        log = _trainer_log(out / stage)
        if not log:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
        for ax, key in zip(axes, keys):
            pts = [(e["step"], e[key]) for e in log if key in e]
            if pts:
                ax.plot(*zip(*pts), marker="." if key.startswith("eval") else None)
            ax.set_title(f"{stage}: {key}")
            ax.set_xlabel("step")
        save(fig, f"{stage}.png")

    if history:
        keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "response/length",
                "val/explained_variance", "policy/clipfrac")
        fig, axes = plt.subplots(2, 3, figsize=(12, 6))
        steps = [m["step"] for m in history]
        for ax, key in zip(axes.flat, keys):
            ax.plot(steps, [m[key] for m in history])
            ax.set_title(f"ppo: {key}")
            ax.set_xlabel("step")
        save(fig, "ppo.png")
    return written
