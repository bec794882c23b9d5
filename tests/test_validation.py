"""Regression tests for the malformed inputs a reviewer tried as a new user: each is one line, exit 2 (or
our UserError in-process), and leaves no file behind."""

import re
import subprocess
import sys

from typing import Union

import pytest
from conftest import REPO

from rlhf import cli, config, ppo
from rlhf.config import EvalRewardConfig, RewardConfig, SFTConfig
from rlhf.errors import UserError
from rlhf.evaluation.heldout import EvalConfig
from rlhf.ppo import checkpoint
from rlhf.ppo import config as ppo_cfg
from rlhf.validate import validate

SFT_YAML = str(REPO / "configs" / "sft_tiny.yaml")


@pytest.mark.parametrize("args, message", [
    (["--train.eval_steps", "0"], "train.eval_steps must be a positive integer, got 0"),
    (["--train.lr_scheduler_type", "linearr"], "train.lr_scheduler_type must be a transformers scheduler name "
                                               "(linear, cosine, constant, constant_with_warmup, polynomial, ...), "
                                               "got 'linearr'"),
    (["--train.learning_rate", "nan"], "train.learning_rate must be a finite number"),
    (["--train.learning_rate", "-1e-4"], "train.learning_rate must be a number >= 0"),
    (["--train.num_train_epochs", "-1"], "train.num_train_epochs must be a number > 0"),
    (["--train.per_device_eval_batch_size", "0"], "train.per_device_eval_batch_size must be a positive integer"),
    (["--data.max_samples", "-5"], "data.max_samples must be a positive integer"),
    (["--peft.lora_dropout", "1.5"], "peft.lora_dropout must be a fraction in [0, 1)"),
    (["--train.warmup_steps", "2.5"], "train.warmup_steps must be a fraction in [0, 1) or a whole number of steps"),
    (["--train.warmup_steps", "-2"], "train.warmup_steps must be a fraction in [0, 1) or a whole number of steps"),
    (["--seed", str(2 ** 40)], "seed must be an integer in [0, 2**32)"),
    (["--model.tiny.hidden_size", "63"], "model.tiny.hidden_size (63) must be divisible by model.tiny.num_attention_heads (4)"),
    (["--model.tiny.num_key_value_heads", "3"], "model.tiny.num_attention_heads (4) must be divisible by model.tiny.num_key_value_heads (3)"),
    (["--model.tiny.max_position_embeddings", "8"], "train.max_length (128) exceeds model.tiny.max_position_embeddings (8)"),
    (["--model.attn_implementation", "bogus"], "model.attn_implementation must be an attention implementation "
                                               "transformers knows (eager, sdpa, flash_attention_2, ...) or a hub "
                                               "kernel owner/name, got 'bogus'"),
    (["--train.max_grad_norm", "inf"], "train.max_grad_norm must be a finite number"),
    (["--train.logging_steps", "0"], "train.logging_steps must be a positive integer, got 0"),
])
def test_sft_field_domains(args, message, tmp_path):
    """Each field's domain is checked as the command line is read; the rules between fields (the tiny model's
    positions and train.max_length) by the stage's check, before anything is written."""
    from rlhf.stages import sft

    with pytest.raises(UserError, match=re.escape(message)):
        sft.check(config.parse(SFTConfig, ["--config", SFT_YAML, "--output_dir", str(tmp_path / "o"), *args], "t"))
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
    from rlhf.data.sources import load_rows

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
    from rlhf.runtime.outputs import check_output_file

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


def test_reward_function_that_raises_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "myr.py").write_text("def bad(prompts, responses):\n    raise ValueError('boom')\n")
    common = ["ppo", "--model.name_or_path", "tiny", "--ppo.steps", "1", "--ppo.per_device_rollout_batch_size", "4",
              "--ppo.max_new_tokens", "4"]
    p = run_cli(*common, "--reward.spec", f"{tmp_path / 'myr.py'}:bad", "--output_dir", str(tmp_path / "a"))
    assert p.returncode == 2 and "Traceback" not in p.stderr  # (above it: the run's own progress bar)
    assert p.stderr.strip().splitlines()[-1] == f"rlhf ppo: error: reward function '{tmp_path / 'myr.py'}:bad' raised ValueError: boom"
    assert not (tmp_path / "a").exists()


def test_missing_local_model_fails_at_once(tmp_path):
    from policies.config import ModelConfig
    from policies.models import ModelLoadError, load_tokenizer

    with pytest.raises(ModelLoadError, match=r"^runs/sft_nope does not exist; create it with: "
                                             r"rlhf sft --config configs/sft_tiny.yaml$"):
        load_tokenizer("runs/sft_nope", ModelConfig())


# ---------------------------------------------------------------------------------------------
# every field of every command has a domain on the field (or its type is its domain, or it is free text);
# Literal fields refused for configs built in Python

# Fields without a Domain on them, by type, and why that is enough. A number is never exempt.
EXEMPT = {
    bool: "true or false: the type is the whole domain",
    str: "free text: a path, hub id, data source, module:function, column, module, token, template or W&B name; "
         "checked where it is opened, loaded or looked up (a missing file is a one-line error there)",
    list[str]: "free text, as str",
    dict[str, str]: "free text, as str (a column map)",
    dict[str, float]: "a mapping of numbers: every float in a mapping is checked finite",
    dict[str, Union[bool, int, float, str]]: "an environment's keyword arguments (env.options): bound to the "
                                             "class's signature when it loads, a mismatch is a one-line error",
}


def command_configs():
    from rlhf.bench import align, speed
    from rlhf.evaluation import eval_policy, generate
    from rlhf.stages import pipeline

    # the pipeline holds SFTConfig, RewardConfig, PPOConfig (with EvalConfig, VLLMConfig) and DPOConfig
    return [pipeline.PipelineConfig, config.ClassifierConfig, EvalRewardConfig, eval_policy.EvalPolicyConfig,
            generate.GenerateConfig, align.BenchAlignConfig, speed.BenchSpeedConfig]


def test_every_field_of_every_command_has_a_domain_or_a_stated_exemption():
    import typing

    from rlhf.validate import domain_of, fields, literal_names

    missing, seen = [], 0
    for cls in command_configs():
        for path, tp in fields(cls):
            seen += 1
            if domain_of(tp) is not None or literal_names(tp) is not None:
                continue
            members = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union \
                else [tp]  # Optional[X]: X, None meaning the documented default
            if len(members) != 1 or members[0] not in EXEMPT:
                missing.append(f"{cls.__name__}.{path}: {tp}")
    assert missing == [] and seen > 300


def test_domains_show_in_help(capsys):
    with pytest.raises(SystemExit):
        config.parse(ppo.PPOConfig, ["--help"], "rlhf ppo")
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "(default: 0.7; a number > 0)" in out  # ppo.temperature
    assert "(default: None; a positive integer)" in out  # ppo.forward_batch_size, an Optional field


def test_one_domain_per_field_where_the_old_table_had_one_per_name():
    """The same name may mean different things: PPO samples to train (temperature > 0), `rlhf generate`
    may answer greedily (0); bench speed's warmup_steps counts untimed iterations (an integer >= 0)."""
    from rlhf.bench import speed
    from rlhf.evaluation import generate

    validate(generate.GenerateConfig(temperature=0.0))
    with pytest.raises(UserError, match=r"^ppo.temperature must be a number > 0, got 0.0$"):
        validate(ppo.PPOConfig(ppo=ppo.PPOHyperparameters(temperature=0.0)))
    with pytest.raises(UserError, match=r"^eval.temperature must be a number > 0, got 0.0$"):
        validate(ppo.PPOConfig(eval=EvalConfig(temperature=0.0)))
    validate(speed.BenchSpeedConfig(warmup_steps=0))
    with pytest.raises(UserError, match=r"^warmup_steps must be an integer >= 0, got -1$"):
        validate(speed.BenchSpeedConfig(warmup_steps=-1))
    validate(RewardConfig(reward=config.RewardOptions(normalize_samples=1)))  # 1 pair: 2 scores, a std


def test_generate_and_eval_policy_validate_configs_built_in_python(tmp_path):
    from rlhf.evaluation import eval_policy, generate

    with pytest.raises(UserError, match=r"^top_p must be a number in \(0, 1\], got 0.0$"):
        generate.generate(generate.GenerateConfig(model=str(tmp_path), top_p=0.0))
    with pytest.raises(UserError, match=r"^samples_per_prompt must be a positive integer, got 0$"):
        eval_policy.evaluate(eval_policy.EvalPolicyConfig(samples_per_prompt=0))


@pytest.mark.parametrize("build, message", [
    (lambda: ppo.PPOConfig(data=ppo.PromptDataConfig(format="bogus")), "data.format: unknown value 'bogus'"),
    (lambda: ppo.PPOConfig(eval=EvalConfig(format="jsonl")), "eval.format: unknown value 'jsonl'"),
    (lambda: ppo.PPOConfig(ppo=ppo.PPOHyperparameters(missing_eos_penalty=float("nan"))),
     "ppo.missing_eos_penalty must be a finite number, got nan"),
    (lambda: RewardConfig(data=config.PreferenceDataConfig(options=config.PairFormatOptions(min_score_ratio=-1.0))),
     "data.options.min_score_ratio must be a number > 0, got -1.0"),
    (lambda: RewardConfig(data=config.PreferenceDataConfig(options=config.PairFormatOptions(weights={"a": float("nan")}))),
     "data.options.weights.a must be a finite number, got nan"),
    (lambda: SFTConfig(peft=SFTConfig().peft.__class__(method="lorra")), "peft.method: unknown value 'lorra'"),
])
def test_python_built_configs_are_validated(build, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate(build())


def test_ppo_checks_eval_temperature_and_tiny_lengths():
    with pytest.raises(UserError, match=r"eval.temperature must be a number > 0, got 0.0"):
        config.parse(ppo.PPOConfig, ["--eval.temperature", "0"], "t")
    with pytest.raises(UserError, match=r"ppo.max_prompt_length \+ ppo.max_new_tokens \(1056\) exceeds "
                                        r"model.tiny.max_position_embeddings \(1024\)"):
        ppo_cfg.check(config.parse(ppo.PPOConfig, ["--model.name_or_path", "tiny", "--ppo.max_prompt_length", "1024"], "t"))


# ---------------------------------------------------------------------------------------------
# reward functions: wrong length, non-numbers, raising -> RewardError naming the function; NaN passes to PPO


REWARDS_PY = """import math
def strings(prompts, responses): return ["good"] * len(responses)
def short(prompts, responses): return [1.0]
def nothing(prompts, responses): return None
def raises(prompts, responses): raise ValueError("no judge\\nsecond line")
def nan(prompts, responses): return [math.nan] + [1.0] * (len(responses) - 1)
"""


@pytest.mark.parametrize("fn, message", [
    ("strings", r"reward function '.*rw.py:strings' returned a list holding str \('good'\); expected a list of "
                r"floats or a tensor, one per response \(2 here\)"),
    ("short", r"reward function '.*rw.py:short' returned 1 values for 2 responses; expected one per response"),
    ("nothing", r"reward function '.*rw.py:nothing' returned NoneType; expected a list of floats"),
    ("raises", r"^reward function '.*rw.py:raises' raised ValueError: no judge$"),
])
def test_reward_function_mistakes_name_the_function(fn, message, tmp_path):
    from reward.errors import RewardError
    from reward.interface import load_reward

    (tmp_path / "rw.py").write_text(REWARDS_PY)
    with pytest.raises(RewardError, match=message):
        load_reward(f"{tmp_path / 'rw.py'}:{fn}").score(["a", "b"], ["x", "y"])


def test_nan_from_a_function_reaches_ppo_as_a_warning_and_evaluations_refuse_it(tmp_path):
    import math

    from reward.errors import RewardError
    from reward.interface import load_reward, require_finite

    (tmp_path / "rw.py").write_text(REWARDS_PY)
    spec = f"{tmp_path / 'rw.py'}:nan"
    scores = load_reward(spec).score(["a", "b"], ["x", "y"])
    assert math.isnan(scores[0]) and scores[1] == 1.0  # a number: passed on as it is
    with pytest.raises(RewardError, match=r"gave 1 non-finite score\(s\) \(NaN or inf\) of 2"):
        require_finite(scores, spec)
    cfg = config.parse(ppo.PPOConfig, ["--model.name_or_path", "tiny", "--ppo.steps", "1", "--ppo.max_new_tokens", "4",
                                       "--ppo.per_device_rollout_batch_size", "4", "--reward.spec", spec,
                                       "--output_dir", str(tmp_path / "o")], "t")
    with pytest.warns(UserWarning, match=r"step 0: 1 reward\(s\) are NaN/inf; they count as 0"):
        h = ppo.main(cfg)
    assert h[0]["objective/nan_scores"] == 0.25 and math.isfinite(h[0]["loss/policy"])


def test_reward_function_failing_mid_run_leaves_nothing_half_written(tmp_path):
    (tmp_path / "late.py").write_text("CALLS = [0]\ndef fn(prompts, responses):\n    CALLS[0] += 1\n"
                                      "    if CALLS[0] > 2:\n        raise RuntimeError('judge went away')\n"
                                      "    return [1.0] * len(responses)\n")
    from reward.errors import RewardError

    out = tmp_path / "o"
    cfg = config.parse(ppo.PPOConfig, ["--model.name_or_path", "tiny", "--ppo.steps", "4", "--save_steps", "1",
                                       "--ppo.max_new_tokens", "4", "--ppo.per_device_rollout_batch_size", "4",
                                       "--reward.spec", f"{tmp_path / 'late.py'}:fn", "--output_dir", str(out)], "t")
    with pytest.raises(RewardError, match=r"late.py:fn' raised RuntimeError: judge went away"):
        ppo.main(cfg)
    left = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in left if n.endswith(".tmp") or n == "policy"]  # no half-written checkpoint or export
    assert all((out / n / checkpoint.STATE_FILE).exists() for n in left if n.startswith("checkpoint-"))  # only complete ones


def test_unknown_stop_token_refused_before_writing(tmp_path):
    cfg = config.parse(ppo.PPOConfig, ["--model.name_or_path", "tiny", "--reward.spec", "reward.examples:exact_answer",
                                       "--ppo.stop_token", "<nope>", "--output_dir", str(tmp_path / "o")], "t")
    with pytest.raises(UserError, match=r"^ppo.stop_token '<nope>' is not a token of the tokenizer's vocabulary"):
        ppo.main(cfg)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# missing local paths, the pipeline's inputs, data left with nothing to learn


def test_missing_local_paths_name_the_command_that_writes_them(tmp_path, monkeypatch):
    from policies.models import ModelLoadError, looks_local
    from reward.errors import RewardError
    from reward.interface import load_reward
    from rlhf.evaluation import generate

    assert looks_local("runs/sft_tiny") and looks_local("./m") and looks_local("a/b/c") and not looks_local("Qwen/Qwen2.5-0.5B")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local("models/llama")  # its first component is a local directory
    with pytest.raises(RewardError, match=r"reward 'runs/reward_tiny' does not exist .*; create it with: "
                                          r"rlhf reward --config configs/reward_tiny.yaml$"):
        load_reward("runs/reward_tiny")
    with pytest.raises(ModelLoadError, match=r"^runs/quickstart/ppo/policy does not exist; create it with: "
                                             r"rlhf pipeline --config configs/quickstart.yaml$"):
        generate.check(config.parse(generate.GenerateConfig, ["--model", "runs/quickstart/ppo/policy"], "t"))


@pytest.mark.parametrize("args, message", [
    (["--ppo.data.train", "nope.jsonl"], "ppo.data.train: data file 'nope.jsonl' does not exist"),
    (["--reward.data.train", "nope.jsonl"], "reward.data.train: data file 'nope.jsonl' does not exist"),
    (["--ppo.eval.prompts", "builtin:nope"], "ppo.eval.prompts: unknown built-in data 'builtin:nope'"),
    (["--ppo.eval.prompts", "builtin:quickstart_eval_prompts", "--ppo.eval.reward.spec", "nope.py:fn"],
     "reward function 'nope.py:fn': file 'nope.py' does not exist"),
    (["--ppo.ppo.stop_token", "<nope>"], "ppo.stop_token '<nope>' is not a token of the tokenizer's vocabulary"),
    (["--ppo.ppo.per_device_rollout_batch_size", "64", "--ppo.data.max_samples", "8"],
     r"ppo.data.train: 8 prompts, fewer than one rollout batch needs \(64\)"),
])
def test_pipeline_checks_later_stages_inputs_before_sft_trains(args, message, tmp_path):
    from reward.errors import RewardError
    from rlhf.stages import pipeline

    cfg = config.parse(pipeline.PipelineConfig, ["--config", str(REPO / "configs" / "quickstart.yaml"),
                                                 "--output_dir", str(tmp_path / "q"), *args], "t")
    with pytest.raises((UserError, RewardError), match=message):
        pipeline.main(cfg)
    assert not (tmp_path / "q").exists()


def test_sft_max_length_that_leaves_no_rows_is_refused(tmp_path):
    from conftest import sft_config

    from rlhf.stages import sft

    with pytest.raises(UserError, match=r"no training rows left after tokenizing: every row's completion lies beyond "
                                        r"train.max_length=1 tokens"):
        sft.main(sft_config(tmp_path, "--train.max_length", "1"))
    assert not (tmp_path / "out").exists()
