"""`rlhf eval reward`: how well a reward model orders preference pairs it was not trained on.

    rlhf eval reward --model runs/reward_tiny --data builtin:quickstart_prefs [--format F] [--output r.json]

Reports pairwise accuracy, accuracy by margin bucket (by the data's own margin when the source has
one, and by the model's |r_chosen - r_rejected|), calibration (expected calibration error of
sigmoid(r_chosen - r_rejected), with its reliability table) and the score distribution of chosen,
rejected and all replies (normalised too, when the model stores its statistics). Printed as a
table and written as JSON.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from reward import load_reward
from reward import metrics as reward_metrics
from reward.interface import require_finite
from rlhf.config import EvalRewardConfig, PreferenceDataConfig
from rlhf.errors import UserError
from rlhf.stages.reward_stage import load_preference_split


def check(cfg: EvalRewardConfig) -> None:
    from rlhf.validate import validate

    if not cfg.model:
        raise UserError("--model is required: a reward model directory (from `rlhf reward`) or hub id")
    if not cfg.data:
        raise UserError("--data is required: preference pairs (a file, builtin:NAME or a hub dataset)")
    validate(cfg)  # every field's domain (also for configs built in Python)
    if cfg.output is not None:
        from rlhf.runtime.outputs import check_output_file

        check_output_file(cfg.output, "--output")


def evaluate(cfg: EvalRewardConfig) -> dict:
    """Score every pair of cfg.data with cfg.model; the report as a JSON-ready dict."""
    check(cfg)
    data = PreferenceDataConfig(train=cfg.data, format=cfg.format, column_map=cfg.column_map, options=cfg.options,
                                split=cfg.split, max_length_chars=cfg.max_length_chars)
    pairs, skips = load_preference_split(cfg.data, data, cfg.max_samples)
    reward = load_reward(cfg.model, device=cfg.device, batch_size=cfg.batch_size, kind="preference",
                         max_length=cfg.max_length, allow_pickle_weights=cfg.allow_pickle_weights)
    chosen = require_finite(reward.score(pairs["prompt"], pairs["chosen"]), cfg.model)
    rejected = require_finite(reward.score(pairs["prompt"], pairs["rejected"]), cfg.model)
    margins = torch.tensor([math.nan if m is None else m for m in pairs["margin"]], dtype=torch.float64)
    report = {"model": cfg.model, "data": cfg.data, "format": skips.format, "rows_read": skips.rows_in,
              "skipped": dict(skips.skipped)}
    report.update(reward_metrics.pairwise_metrics(chosen, rejected, margins, cfg.buckets, cfg.calibration_bins))
    if reward.normalization is not None:
        mean, std = reward.normalization
        report["normalization"] = {"mean": mean, "std": std}
        report["scores"]["all_normalized"] = reward_metrics.score_stats((torch.cat([chosen, rejected]) - mean) / std)
    return report


def table(report: dict) -> str:
    """The report as plain text."""
    f = "{:8.3f}".format
    lines = [f"reward model: {report['model']}",
             f"data: {report['data']} (format {report['format']}; "
             f"{report['rows_read']} rows -> {report['pairs']} pairs)",
             "",
             f"accuracy        {report['accuracy']:.3f}   (pairs with r_chosen > r_rejected; ties count half)",
             f"mean margin     {report['mean_margin']:.3f}   (mean of r_chosen - r_rejected)",
             f"loss            {report['loss']:.3f}   (Bradley-Terry: mean -log sigmoid(r_chosen - r_rejected))",
             f"ECE             {report['ece']:.3f}   (calibration of sigmoid(r_chosen - r_rejected))"]
    buckets = [("accuracy by data margin", "accuracy_by_data_margin"),
               ("accuracy by reward margin |r_chosen - r_rejected|", "accuracy_by_reward_margin")]
    for title, key in buckets:
        if key not in report:
            continue
        lines += ["", f"{title}:", f"  {'margin range':>24s} {'pairs':>6s} {'accuracy':>9s}"]
        for row in report[key]:
            lo, hi = row["range"]
            rng = f"{lo:.3g}" if lo == hi else f"[{lo:.3g}, {hi:.3g}]"
            lines.append(f"  {rng:>24s} {row['n']:6d} {row['accuracy']:9.3f}")
    lines += ["", "calibration (confidence = max(p, 1 - p), p = sigmoid(r_chosen - r_rejected)):",
              f"  {'confidence bin':>24s} {'pairs':>6s} {'confidence':>11s} {'accuracy':>9s}"]
    for row in report["calibration"]:
        lo, hi = row["bin"]
        lines.append(f"  {f'[{lo:.2f}, {hi:.2f})':>24s} {row['n']:6d} {row['confidence']:11.3f} {row['accuracy']:9.3f}")
    keys = ("mean", "std", "min", "p5", "p25", "p50", "p75", "p95", "max")
    lines += ["", "score distribution:", f"  {'':16s} {'n':>6s} " + " ".join(f"{k:>8s}" for k in keys)]
    for name, stats in report["scores"].items():
        lines.append(f"  {name:16s} {stats['n']:6d} " + " ".join(f(stats[k]) for k in keys))
    return "\n".join(lines)


def default_output(cfg: EvalRewardConfig) -> Path | None:
    model = Path(cfg.model)
    if not model.is_dir():
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.data.removeprefix("builtin:")).stem) or "data"
    return model / f"eval_reward_{name}.json"


def main(cfg: EvalRewardConfig) -> dict:
    report = evaluate(cfg)
    print(table(report))
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)
        print(f"\nJSON report: {out}")
    return report
