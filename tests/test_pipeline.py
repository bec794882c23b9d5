"""The README's main job: `rlhf pipeline --config configs/quickstart.yaml`, as a subprocess; its report
puts the true objective (exact answers on held-out prompts) next to the reward model's score."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_quickstart_pipeline_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "pipeline", "--config", "configs/quickstart.yaml",
                        "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["sft"]["eval_loss_after"] < 0.2 * report["sft"]["eval_loss_before"]
    assert report["reward"]["eval_accuracy"] >= 0.9  # the reward model learnt correct > wrong
    ppo = report["ppo"]
    assert ppo["steps"] == 60 and ppo["kl_last5"] < 10
    held = report["heldout"]
    assert held["eval_reward"] == "reward.examples:exact_answer"
    assert held["before_step"] == 0 and held["after_step"] == 60
    # the SFT policy (PPO's step 0) answers at least 40% of the held-out prompts exactly (greedy)
    assert held["before"]["eval/greedy/reward"] >= 0.4
    assert held["before"]["eval/kl"] == 0 and held["after"]["eval/kl"] > 0
    steps = [json.loads(line)["step"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()
             if "eval/reward" in json.loads(line)]
    assert steps == [0, 10, 20, 30, 40, 50, 60]
    md = (out / "report.md").read_text()
    assert "**true metric**, greedy answers" in md and "proxy (reward model)" in md
    # RLHF raised the true objective on held-out prompts, not only the reward model's score
    b, a = held["before"], held["after"]
    assert a["eval/greedy/reward"] >= b["eval/greedy/reward"] + 0.15, (b, a)
    assert a["eval/reward"] > b["eval/reward"] and a["eval/proxy"] > b["eval/proxy"]
    assert 0 < a["eval/kl"] < 5 and not held["hacking"]
    assert b["eval/proxy_agreement"] > 0.7  # the reward model ranks the SFT policy's own answers
    assert "The true metric rose with the proxy." in md
    assert len(report["samples"]) == 8 and all(s["prompt"] for s in report["samples"])
    for name in ("sft.png", "reward.png", "ppo.png"):
        assert (out / "plots" / name).stat().st_size > 5000
        assert f"](plots/{name})" in md  # embedded as an image
    adapter = json.loads((out / "ppo" / "policy" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "sft")  # the PPO adapter sits on the SFT model
    assert "# Pipeline report" in p.stdout


def test_report_verdict_says_which_answers_rose():
    """Sampled and greedy answers can disagree (the quickstart's DPO: greedy up, sampled down): the report says so."""
    from rlhf.stages.pipeline import _verdict

    before = {"eval/reward": 0.773, "eval/greedy/reward": 0.688}
    after = {"eval/reward": 0.727, "eval/greedy/reward": 0.930}
    assert _verdict(before, after, "DPO") == ("The true metric rose on greedy answers only (sampled answers 0.773 -> "
                                              "0.727, greedy answers 0.688 -> 0.930).")
    assert _verdict(before, {**after, "eval/reward": 0.8}, "DPO") == "The true metric rose."
    assert _verdict(before, {**after, "eval/reward": 0.8, "eval/proxy": 1.0}, "PPO") == \
        "The true metric rose with the proxy."
    assert _verdict(after, {"eval/reward": 0.7, "eval/greedy/reward": 0.6}, "PPO") == \
        "The true metric did not rise: PPO did not improve what it was meant to."


def test_report_sample_table_keeps_an_episodes_answer(tmp_path):
    """A long transcript is cut in the middle, marked, so the cell still shows the answer that was scored."""
    from rlhf.stages.pipeline import _markdown

    after = "assistant: calc 39 * 44 | tool: 1 7 1 6 | assistant: calc 39 * 44 | tool: 1 7 1 6 | assistant: 1 7 1 6"
    r = {"timings_s": {}, "outputs": {}, "plots": [], "samples": [{"mode": "greedy", "prompt": "What is 39 * 44?", "before": "assistant: 1 8 1 3",
                      "before_reward": False, "after": after, "after_reward": True}]}
    md = _markdown(r, tmp_path)
    row = next(line for line in md.splitlines() if line.startswith("| What is 39 * 44?"))
    assert " … " in row and "tool: 1 7 1 6 \\| assistant: 1 7 1 6 | 1.00 |" in row  # cut marked, the answer kept
