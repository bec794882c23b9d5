"""Regression tests for the malformed inputs a reviewer tried as a new user: each is one line, exit 2 (or
our UserError in-process), and leaves no file behind."""

import subprocess
import sys

import pytest

from conftest import REPO
from rlhf import cli, config, ppo
from rlhf.config import EvalRewardConfig, RewardConfig, SFTConfig
from rlhf.errors import UserError
from rlhf.validate import validate

SFT_YAML = str(REPO / "configs" / "sft_tiny.yaml")


@pytest.mark.parametrize("args, message", [
    (["--train.eval_steps", "0"], "train.eval_steps must be a positive integer, got 0"),
    (["--train.lr_scheduler_type", "linearr"], "train.lr_scheduler_type: unknown scheduler 'linearr'"),
    (["--train.learning_rate", "nan"], "train.learning_rate must be a finite number"),
    (["--train.learning_rate", "-1e-4"], "train.learning_rate must be a number >= 0"),
    (["--train.num_train_epochs", "-1"], "train.num_train_epochs must be a number > 0"),
    (["--train.per_device_eval_batch_size", "0"], "train.per_device_eval_batch_size must be a positive integer"),
    (["--data.max_samples", "-5"], "data.max_samples must be a positive integer"),
    (["--peft.lora_dropout", "1.5"], "peft.lora_dropout must be a fraction in [0, 1)"),
])
def test_sft_field_domains(args, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config.parse(SFTConfig, ["--config", SFT_YAML, "--output_dir", str(tmp_path / "o"), *args], "t")
    assert not (tmp_path / "o").exists()


def test_other_stages_field_domains():
    with pytest.raises(UserError, match="train.max_length must be a positive integer, got 0"):
        validate(RewardConfig(train=RewardConfig().train.__class__(max_length=0)))
    with pytest.raises(UserError, match="max_length must be a positive integer, got 0"):
        config.parse(EvalRewardConfig, ["--model", "m", "--data", "d", "--max_length", "0"], "t")
    with pytest.raises(UserError, match="ppo.forward_batch_size must be a positive integer, got 0"):
        config.parse(ppo.PPOConfig, ["--ppo.forward_batch_size", "0"], "t")
    with pytest.raises(UserError, match="ppo.top_p must be a number in"):
        config.parse(ppo.PPOConfig, ["--ppo.top_p", "0"], "t")


def test_invalid_utf8_in_yaml_and_data(tmp_path):
    from rlhf.sources import load_rows

    (tmp_path / "c.yaml").write_bytes(b"train:\n  learning_rate: 1e-4\n  # caf\xe9\n")
    with pytest.raises(UserError, match=r"c.yaml:3: not valid UTF-8"):
        config.parse(SFTConfig, ["--config", str(tmp_path / "c.yaml")], "t")
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid UTF-8"):
        load_rows(str(tmp_path / "d.jsonl"))


def test_duplicate_yaml_section(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  learning_rate: 1e-4\nmodel:\n  name_or_path: tiny\ntrain:\n  max_steps: 2\n")
    with pytest.raises(UserError, match=r"c.yaml:5: .*key 'train' appears twice in one section \(first on line 1\)"):
        config.parse(SFTConfig, ["--config", str(tmp_path / "c.yaml")], "t")


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(REPO.parent)})


def test_output_paths_that_cannot_be_outputs(tmp_path):
    (tmp_path / "a_file").write_text("x")
    p = run_cli("sft", "--config", SFT_YAML, "--output_dir", str(tmp_path / "a_file"))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"rlhf sft: error: output_dir '{tmp_path / 'a_file'}' is an existing file; expected a directory (new or existing)"]
    from rlhf.outputs import check_output_file

    with pytest.raises(UserError, match="--output .* is a directory"):
        check_output_file(tmp_path, "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no stray temporary file


def test_pipeline_checks_ppo_before_sft_trains(tmp_path):
    p = run_cli("pipeline", "--config", str(REPO / "configs" / "quickstart.yaml"), "--output_dir",
                str(tmp_path / "q"), "--ppo.ppo.num_mini_batches", "7")
    assert p.returncode == 2 and "num_mini_batches" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_help_pipes_and_lists_every_command():
    p = subprocess.run(f"{sys.executable} -m rlhf ppo --help | head -1", shell=True, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
    assert "eval policy" in cli.USAGE
    widths = {line.index("rlhf ", 4) for line in cli.USAGE.splitlines() if line.startswith("  ") and "--help" in line}
    assert len(widths) == 1  # the help column is aligned


def test_reward_function_that_raises_and_unknown_stop_token_leave_nothing(tmp_path):
    (tmp_path / "myr.py").write_text("def bad(prompts, responses):\n    raise ValueError('boom')\n")
    common = ["ppo", "--model.name_or_path", "tiny", "--ppo.steps", "1", "--ppo.per_device_rollout_batch_size", "4",
              "--ppo.max_new_tokens", "4"]
    p = run_cli(*common, "--reward.spec", f"{tmp_path / 'myr.py'}:bad", "--output_dir", str(tmp_path / "a"))
    assert p.returncode == 2 and "Traceback" not in p.stderr  # (above it: the run's own progress bar)
    assert p.stderr.strip().splitlines()[-1] == f"rlhf ppo: error: reward function '{tmp_path / 'myr.py'}:bad' raised ValueError: boom"
    assert not (tmp_path / "a").exists()
    p = run_cli(*common, "--reward.spec", "reward.examples:exact_answer", "--ppo.stop_token", "<nope>",
                "--output_dir", str(tmp_path / "b"))
    assert p.returncode == 2 and "ppo.stop_token '<nope>' is not a token" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_missing_local_model_fails_at_once(tmp_path):
    from policies.config import ModelConfig
    from policies.models import ModelLoadError, load_tokenizer

    with pytest.raises(ModelLoadError, match=r"'runs/sft_nope' does not exist.*rlhf sft --config"):
        load_tokenizer("runs/sft_nope", ModelConfig())
