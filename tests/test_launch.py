"""`--accelerate PRESET`: the shipped presets load, the relaunch command is right, and it runs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_ppo import sft_policy  # noqa: F401  (session fixture)

from rlhf.errors import UserError
from rlhf.runtime import launch


@pytest.mark.parametrize("preset", launch.PRESETS)
def test_every_preset_is_a_valid_accelerate_config(preset):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(launch.preset_path(preset)))
    expected = {"single": "NO", "ddp": "MULTI_GPU", "two_node": "MULTI_GPU"}.get(preset, "DEEPSPEED")
    assert str(cfg.distributed_type).split(".")[-1] == expected
    if expected == "DEEPSPEED":
        stage = int(preset[4])
        assert cfg.deepspeed_config["zero_stage"] == stage
        offload = cfg.deepspeed_config["offload_optimizer_device"]
        assert (offload == "cpu") == preset.endswith("_offload")
    if preset == "two_node":
        assert cfg.num_machines == 2 and cfg.main_process_ip == "127.0.0.1"


def test_relaunch_command():
    launch_opts, rest = launch.split(["--config", "c.yaml", "--accelerate", "zero3", "--num_processes", "8",
                                      "--ppo.steps", "3"])
    assert launch_opts == {"accelerate": "zero3", "num_processes": "8"}
    cmd, env = launch.command("ppo", launch_opts, rest)
    assert cmd == ["accelerate", "launch", "--config_file", str(REPO / "configs" / "accelerate" / "zero3.yaml"),
                   "--num_processes", "8", "-m", "rlhf", "ppo", "--config", "c.yaml", "--ppo.steps", "3"]
    assert env == {"RLHF_LAUNCHED": "1"}
    _, env = launch.command("sft", {"accelerate": "ddp"}, [])
    assert env["ACCELERATE_USE_CPU"] == "true"  # no GPU here: DDP over gloo


def test_launch_errors(tmp_path):
    with pytest.raises(UserError, match="neither a preset"):
        launch.command("sft", {"accelerate": "zero9"}, [])
    with pytest.raises(UserError, match="only make sense with --accelerate"):
        launch.split(["--num_processes", "2"])
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: 'NO'\nnum_processes: 1\n")
    cmd, _ = launch.command("sft", {"accelerate": str(own)}, [])
    assert cmd[3] == str(own)


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
def test_ppo_through_the_flag_runs_two_processes(tmp_path, sft_policy):  # noqa: F811
    out = tmp_path / "ppo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "ppo", "--model.name_or_path", sft_policy,
                        "--reward.spec", "tests/rewards.py:digit_fraction", "--output_dir", str(out),
                        "--ppo.steps", "2", "--ppo.per_device_rollout_batch_size", "8", "--ppo.max_new_tokens", "8",
                        "--sample_every", "0", "--accelerate", "ddp", "--num_processes", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "accelerate launch --config_file" in p.stderr
    assert "2 process(es), rollout 16/step" in p.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
