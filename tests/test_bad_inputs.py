"""The last mishandled inputs (issue 19), as a user meets them: one line on stderr, exit 2, nothing written.

Column maps, malformed JSON in a user's folder, a reward that is NaN for every response, a reward error
after a progress bar, argparse commands, an empty config file, a full disk during a checkpoint, and the
token count of a resumed SFT run.
"""

import errno
import hashlib
import json
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, sft_config

from rlhf import cli, config
from rlhf.errors import UserError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": "1"}
# A PPO run on the built-in tiny model that takes seconds: 8 responses of 4 tokens per step.
TINY_PPO = ["--model.name_or_path", "tiny", "--ppo.per_device_rollout_batch_size", "8", "--ppo.max_new_tokens", "4",
            "--ppo.num_mini_batches", "1", "--ppo.reward_normalization", "none", "--sample_every", "0"]


def run(*args, module: str = "rlhf") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=600)


def refused(p: subprocess.CompletedProcess, *expected: str) -> str:
    """The one stderr line of a refused command, checked: exit 2, no traceback, no usage block."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "usage:" not in p.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def one_error_line(capsys, command: str, *expected: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlhf {command}: error:"), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. column maps name the file, the missing column and the columns present

def test_ppo_column_map_to_a_missing_column_in_a_subprocess(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is {i} plus 1?"} for i in range(40)])
    out = tmp_path / "out"
    p = run("ppo", *TINY_PPO, "--data.train", data, "--data.column_map", "prompt", "question",
            "--reward.spec", "reward.examples:brevity", "--output_dir", str(out))
    line = refused(p, data, "data.column_map names column(s) 'prompt'", "its columns: question")
    assert "{question: prompt}" in line  # the map read the other way round is what the file has
    assert not out.exists()


def test_ppo_column_map_renames_prompts_and_pairs(tmp_path):
    from rlhf.generation.prompts import load_prompts
    from rlhf.ppo.config import PromptDataConfig

    data = write_jsonl(tmp_path / "p.jsonl", [{"q": f"question {i}?", "good": "yes", "bad": "no"} for i in range(4)])
    expected = [[{"role": "user", "content": f"question {i}?"}] for i in range(4)]
    assert load_prompts(PromptDataConfig(train=data, column_map={"q": "prompt"})) == expected
    # a pairs file: the same {column: name} map, also when the preference format is given
    pair_map = {"q": "prompt", "good": "chosen", "bad": "rejected"}
    assert load_prompts(PromptDataConfig(train=data, column_map=pair_map)) == expected
    assert load_prompts(PromptDataConfig(train=data, column_map=pair_map, format="pairs")) == expected


def test_sft_column_map_onto_an_existing_column_replaces_it(tmp_path):
    from rlhf.config import DataConfig
    from rlhf.data.sft_data import load_sft_split

    data = write_jsonl(tmp_path / "s.jsonl", [{"question": f"q{i}", "prompt": "old", "completion": "c"} for i in range(3)])
    ds, fmt = load_sft_split(data, DataConfig(column_map={"question": "prompt"}))
    assert fmt == "prompt_completion" and ds[0]["prompt"] == "q0"
    with pytest.raises(UserError, match="several columns are renamed to 'prompt'"):
        load_sft_split(data, DataConfig(column_map={"question": "prompt", "completion": "prompt"}))


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "classifier"])
def test_every_stage_names_the_missing_column(tmp_path, capsys, stage):
    rows = [{"question": f"q{i}", "good": "a", "bad": "b", "label": i % 2} for i in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = {"sft": ["--data.column_map", "nope", "prompt"],
            "reward": ["--data.column_map", "prompt", "nope"],
            "dpo": ["--data.column_map", "prompt", "nope"],
            "classifier": ["--data.text_column", "nope"]}[stage]
    out = tmp_path / "out"
    code = cli.main([stage, "--model.name_or_path", "tiny", "--data.train", data, "--output_dir", str(out), *args])
    assert code == 2
    one_error_line(capsys, stage, data, "nope", "question")  # the file, the missing column, one present
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 2. malformed JSON in a user's folder: one line naming the file, line and column

BROKEN_JSON = '{"a": 1,\n  "b": }\n'  # line 2, column 8


def folder_with(tmp_path: Path, name: str, broken: str, **good: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file, content in good.items():
        (folder / f"{file}.json").write_text(json.dumps(content))
    (folder / broken).write_text(BROKEN_JSON)
    return folder


def test_merge_with_malformed_adapter_config_in_a_subprocess(tmp_path):
    adapter = folder_with(tmp_path, "adapter", "adapter_config.json")
    p = run("merge", str(adapter), str(tmp_path / "merged"))
    refused(p, f"{adapter / 'adapter_config.json'}: malformed JSON at line 2, column 8 (Expecting value)")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", ["model config", "tokenizer config", "adapter config", "reward info",
                                  "reward config", "reward as ppo reward", "checkpoint state", "generate adapter"])
def test_malformed_json_in_a_user_folder(tmp_path, capsys, case):
    out = tmp_path / "out"
    command, folder_args = {
        "model config": ("sft", lambda d: ["--model.name_or_path", str(d)]),
        "tokenizer config": ("sft", lambda d: ["--model.name_or_path", str(d)]),
        "adapter config": ("ppo", lambda d: ["--model.name_or_path", str(d), "--reward.spec", "reward.examples:brevity"]),
        "reward info": ("eval", lambda d: ["reward", "--model", str(d), "--data", "builtin:quickstart_prefs"]),
        "reward config": ("eval", lambda d: ["reward", "--model", str(d), "--data", "builtin:quickstart_prefs"]),
        "reward as ppo reward": ("ppo", lambda d: ["--model.name_or_path", "tiny", "--reward.spec", str(d)]),
        "checkpoint state": ("sft", lambda d: ["--resume", str(d)]),
        "generate adapter": ("generate", lambda d: ["--model", str(d), "--prompts.train", "builtin:quickstart_eval_prompts"]),
    }[case]
    broken, good = {
        "model config": ("config.json", {}),
        "tokenizer config": ("tokenizer_config.json", {"config": {"model_type": "llama"}}),
        "adapter config": ("adapter_config.json", {}),
        "reward info": ("reward_info.json", {"config": {"num_labels": 1}}),
        "reward config": ("config.json", {}),
        "reward as ppo reward": ("reward_info.json", {}),
        "checkpoint state": ("trainer_state.json", {}),
        "generate adapter": ("adapter_config.json", {}),
    }[case]
    folder = folder_with(tmp_path, "folder", broken, **good)
    output = ["--output", str(out)] if command in ("eval", "generate") else ["--output_dir", str(out)]
    code = cli.main([command, *folder_args(folder), *output])
    assert code == 2
    one_error_line(capsys, command, f"{folder / broken}: malformed JSON at line 2, column 8")
    assert not out.exists()


def test_read_json_names_what_is_wrong(tmp_path):
    from policies.models import ModelLoadError, read_json, stamp_matches

    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ModelLoadError, match="list.json: expected a JSON object, got a list"):
        read_json(tmp_path / "list.json")
    with pytest.raises(ModelLoadError, match="latin1.json: not a JSON text file"):
        read_json(tmp_path / "latin1.json")
    assert not stamp_matches(tmp_path / "latin1.json", {"a": 1})  # a cache with a bad stamp is remade
    assert not stamp_matches(tmp_path / "missing.json", {"a": 1})


# ---------------------------------------------------------------------------------------------
# 3-4. rewards: all NaN is an error naming the function; errors come without a progress bar

REWARDS = '''
import os

def all_nan(prompts, responses):
    return [float("nan")] * len(responses)

def raises(prompts, responses):
    raise KeyError("no score for this")

def wrong_length(prompts, responses):
    return [0.0]
'''


@pytest.mark.parametrize("function, expected", [
    ("all_nan", "gave NaN or inf for all 8 responses of a batch"),
    ("raises", "raised KeyError: 'no score for this'"),
    ("wrong_length", "returned 1 values for 8 responses"),
])
def test_reward_function_errors_are_the_only_line(tmp_path, function, expected):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    spec = f"{tmp_path / 'my_rewards.py'}:{function}"
    out = tmp_path / "out"
    p = run("ppo", *TINY_PPO, "--ppo.steps", "2", "--reward.spec", spec, "--output_dir", str(out))
    refused(p, f"reward function '{spec}'", expected)  # no bar line before it (stderr is not a terminal)
    assert not out.exists()


def test_all_non_finite_is_refused_a_few_are_not():
    from reward.errors import RewardError
    from reward.interface import FunctionReward, refuse_all_non_finite

    fn = FunctionReward(lambda p, r: [0.0] * len(r), "my.py:score")
    for bad in (torch.full((4,), float("nan")), torch.tensor([float("inf"), float("-inf"), float("nan")])):
        with pytest.raises(RewardError, match="reward function 'my.py:score' gave NaN or inf for all"):
            refuse_all_non_finite(bad, fn, "my.py:score")
    with pytest.raises(RewardError, match="^reward 'runs/rm' gave NaN"):  # a model: not called a function
        refuse_all_non_finite(torch.full((2,), float("nan")), object(), "runs/rm")
    refuse_all_non_finite(torch.tensor([float("nan"), 1.0, float("inf")]), fn, "my.py:score")  # a few: no error
    refuse_all_non_finite(torch.empty(0), fn, "my.py:score")


def test_progress_off_a_terminal_is_a_few_plain_lines(tmp_path):
    import io

    from rlhf.runtime.progress import Progress

    buf = io.StringIO()
    bar = Progress(range(25), desc="ppo", file=buf, mininterval=0)
    for i in bar:
        bar.set_postfix(score=f"{i:.1f}")
        time.sleep(0.002)  # a step longer than the bar's 1 ms delay
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert 5 <= len(lines) <= 11  # every tenth of the steps, not every step
    assert lines[-1].startswith("ppo: 100% 25/25") and "score=24.0" in lines[-1]

    buf = io.StringIO()  # an error in the first step: nothing was printed
    for _ in Progress(range(5), desc="ppo", file=buf, mininterval=0):
        break
    assert buf.getvalue() == ""


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: '\\r' returns to the line's start, later text overwrites."""
    lines, line, col = [], [], 0
    for ch in raw.replace("\r\n", "\n"):  # the terminal's own newline translation
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    lines.append("".join(line).rstrip())
    return [x for x in lines if x]


def test_progress_on_a_terminal_is_cleared_before_an_error():
    from rlhf.runtime.progress import Progress, clear_bars

    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        for stop_at in (0, 3):  # an error in the first step, and one after the bar was drawn
            bar = Progress(range(10), desc="ppo", file=terminal, mininterval=0)
            with pytest.raises(KeyError):
                for i in bar:
                    if i == stop_at:
                        raise KeyError("the reward failed")
                    time.sleep(0.002)
            clear_bars()  # what the CLI does before printing the error line
            terminal.write("rlhf ppo: error: ...\n")
            terminal.flush()
            time.sleep(0.1)
            raw = os.read(master, 1 << 16).decode()
            assert ("%|" in raw) == (stop_at > 0)  # the bar was drawn only once a step had finished ...
            assert screen(raw) == ["rlhf ppo: error: ..."]  # ... and nothing of it is left on the screen
    finally:
        terminal.close()
        os.close(master)


# ---------------------------------------------------------------------------------------------
# 5. argparse commands refuse in one line

@pytest.mark.parametrize("args, expected", [
    (["data", "check", "x.jsonl", "--format", "bogus"], "rlhf data: error: argument --format: invalid choice: 'bogus'"),
    (["merge", "a", "b", "--dtype", "bogus"], "rlhf merge: error: argument --dtype: invalid choice: 'bogus'"),
    (["data", "check"], "rlhf data: error: the following arguments are required: source"),
    (["merge", "a"], "rlhf merge: error: the following arguments are required: out_dir"),
])
def test_argparse_commands_refuse_in_one_line(args, expected):
    refused(run(*args), expected)


def test_vllm_env_refuses_in_one_line():
    refused(run("--bogus", module="rlhf.generation.vllm_env"),
            "python -m rlhf.generation.vllm_env: error: unrecognized arguments: --bogus")


# ---------------------------------------------------------------------------------------------
# 6. an empty config file (or one that is not a mapping) is refused

@pytest.mark.parametrize("text, expected", [
    ("", "the config file is empty"), ("# just a comment\n", "the config file is empty"),
    ("---\n", "the config file is empty"), ("[]\n", "got a list"), ("0\n", "got a int"),
    ("- model\n", "got a list"), ("false\n", "got a bool"),
])
def test_empty_or_non_mapping_config(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"{path}: .*{expected}"):
        config.parse(config.SFTConfig, ["--config", str(path)], "rlhf sft")


def test_empty_config_in_a_subprocess(tmp_path):
    (tmp_path / "empty.yaml").write_bytes(b"")
    out = tmp_path / "out"
    refused(run("sft", "--config", str(tmp_path / "empty.yaml"), "--output_dir", str(out)),
            f"{tmp_path / 'empty.yaml'}: the config file is empty")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 7. a full disk during a PPO checkpoint

def tree_digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def deterministic(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/", "tokens_per_second"))}
            for m in history]


def test_full_disk_during_a_ppo_checkpoint(tmp_path, monkeypatch, capsys):
    import accelerate.checkpointing

    from rlhf.ppo import trainer as ppo

    def args(out: Path, *extra: str) -> list[str]:
        return [*TINY_PPO, "--reward.spec", "reward.examples:brevity", "--ppo.steps", "3", "--save_steps", "1",
                "--save_total_limit", "5", "--output_dir", str(out), *extra]

    straight = ppo.main(config.parse(ppo.PPOConfig, args(tmp_path / "straight"), "rlhf ppo"))

    out = tmp_path / "full"
    write, seen = accelerate.checkpointing.save, {}

    def disk_full_at_checkpoint_2(obj, f, *a, **k):
        if ".checkpoint-2.tmp" in str(f):
            seen["checkpoint-1"] = tree_digest(out / "checkpoint-1")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return write(obj, f, *a, **k)

    monkeypatch.setattr(accelerate.checkpointing, "save", disk_full_at_checkpoint_2)
    assert cli.main(["ppo", *args(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"rlhf ppo: error: writing {out / 'checkpoint-2'} failed: the disk is full (OSError: "
                              f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{out / '.checkpoint-2.tmp'}/")
    assert err[-1].endswith(f"'); the last complete checkpoint, {out / 'checkpoint-1'}, is intact: free some space "
                            "and continue with `--resume latest`")
    assert tree_digest(out / "checkpoint-1") == seen["checkpoint-1"]  # untouched by the failed write
    assert not (out / ".checkpoint-2.tmp").exists()  # the half-written one is gone (it only held space)

    monkeypatch.setattr(accelerate.checkpointing, "save", write)  # space freed
    resumed = ppo.main(config.parse(ppo.PPOConfig, args(out, "--resume", "latest"), "rlhf ppo"))
    assert deterministic(resumed) == deterministic(straight)


def test_full_disk_before_any_checkpoint_removes_the_new_output(tmp_path, monkeypatch, capsys):
    import accelerate.checkpointing

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(accelerate.checkpointing, "save", disk_full)
    out = tmp_path / "out"
    assert cli.main(["ppo", *TINY_PPO, "--reward.spec", "reward.examples:brevity", "--ppo.steps", "1",
                     "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("no checkpoint was complete yet: free some space and run again")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 8. a resumed SFT run logs what a straight one logs (TRL's token count included)

def log_rows(checkpoint: Path) -> list[dict]:
    rows = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in row.items() if "runtime" not in k and "per_second" not in k} for row in rows]


def test_resumed_sft_log_equals_a_straight_run(tmp_path):
    from rlhf.stages import sft

    sft.main(sft_config(tmp_path / "a", "--train.save_steps", "3"))
    # Same run killed after its step-3 checkpoint: step 6 and the final outputs never written.
    sft.main(sft_config(tmp_path / "b", "--train.save_steps", "3"))
    out_b = tmp_path / "b" / "out"
    for lost in ("checkpoint-6", "adapter_model.safetensors", "metrics.json"):
        path = out_b / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    sft.main(sft_config(tmp_path / "b", "--train.save_steps", "3", "--resume", "latest"))

    straight, resumed = log_rows(tmp_path / "a" / "out" / "checkpoint-6"), log_rows(out_b / "checkpoint-6")
    assert len(straight) == 9  # 6 training rows, evaluations at steps 0, 3 and 6
    assert [r for r in straight if "num_tokens" in r][-1]["num_tokens"] > 0
    assert resumed == straight


def test_token_count_from_an_older_checkpoint_falls_back_to_its_log():
    from types import SimpleNamespace

    from transformers import TrainerState

    from rlhf.stages.hf_trainer import TOKENS_KEY, TokenCount

    trainer = SimpleNamespace(_total_train_tokens=0)
    count = TokenCount(trainer)
    state = TrainerState(global_step=3, log_history=[{"num_tokens": 90.0, "step": 2}, {"eval_loss": 1.0, "step": 3}])
    count.on_train_begin(None, state, None)  # written before the count was kept: its last logged count
    assert trainer._total_train_tokens == 90
    state.stateful_callbacks[TOKENS_KEY] = 120  # the count the checkpoint holds wins
    count.on_train_begin(None, state, None)
    assert trainer._total_train_tokens == 120
    trainer._total_train_tokens = 150
    count.on_step_end(None, state, None)
    assert state.stateful_callbacks[TOKENS_KEY] == 150
    fresh = SimpleNamespace(_total_train_tokens=0)
    TokenCount(fresh).on_train_begin(None, TrainerState(), None)  # a new run starts at 0
    assert fresh._total_train_tokens == 0
