"""The README's main job: `rlhf pipeline --config configs/quickstart.yaml`, as a subprocess."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_quickstart_pipeline_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "pipeline", "--config", "configs/quickstart.yaml",
                        "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["sft"]["eval_loss_after"] < 0.5 * report["sft"]["eval_loss_before"]
    assert report["reward"]["eval_accuracy"] > 0.7  # the reward model learnt correct > wrong
    ppo = report["ppo"]
    assert ppo["steps"] == 60
    assert ppo["score_last5"] > ppo["score_first5"] + 0.3  # PPO raised the reward model's score
    assert ppo["kl_last5"] < 10
    for name in ("sft.png", "reward.png", "ppo.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    assert (out / "ppo" / "policy" / "adapter_config.json").exists()
    adapter = json.loads((out / "ppo" / "policy" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "sft")  # the PPO adapter sits on the SFT model
    assert "# Pipeline report" in p.stdout and "reward-model score" in p.stdout
