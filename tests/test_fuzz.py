"""Fuzzing the inputs a user hands us: generated YAML configs (wrong types, out-of-range numbers, NaN,
unknown and duplicate keys, random bytes) and generated data rows for every preference format and the SFT
formats. Only two outcomes are allowed: the input is accepted, or it is refused with our one-line
UserError. Any other exception (a traceback for the user) fails the test, with hypothesis's smallest
example. Everything runs in-process on the parsing and checking functions, so nothing is trained."""

import json
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.models import ModelLoadError
from reward.errors import RewardError
from rlhf import config, ppo
from rlhf.config import DataConfig
from rlhf.data import preference_data
from rlhf.data.sft_data import load_sft_data
from rlhf.errors import UserError
from rlhf.ppo import config as ppo_cfg
from rlhf.stages import reward_stage, sft

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ALLOWED = (UserError, ModelLoadError, RewardError)

# values a user can type into YAML: every scalar kind, the edges of the numeric domains, and nesting
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.sampled_from(
    [0.0, -1.0, 1e-12, 1e300, float("nan"), float("inf"), -float("inf"), 0.5, 2.0]), st.floats(),
    st.text(max_size=12), st.sampled_from(["auto", "lora", "full", "eos", "linear", "foo", "1e-4", "-1", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)

STAGES = {"sft": (config.SFTConfig, sft.check), "reward": (config.RewardConfig, reward_stage.check),
          "ppo": (ppo.PPOConfig, ppo_cfg.check)}


def field_names(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from field_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *sections, key = path.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {}) if isinstance(node.get(s, {}), dict) else {}
        node[key] = value
    return out


def accepted_or_refused(fn, *args):
    try:
        return fn(*args)
    except ALLOWED as e:
        assert "\n" not in str(e), f"a multi-line error: {e}"
        return None


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_generated_configs_are_accepted_or_refused_in_one_line(stage, tmp_path_factory):
    cls, check = STAGES[stage]
    names = sorted(field_names(cls))
    seen = {"accepted": 0, "refused": 0}

    @SETTINGS
    @given(st.dictionaries(st.sampled_from(names) | st.text(min_size=1, max_size=10), values, max_size=4))
    def run(flat):
        path = tmp_path_factory.mktemp("cfg") / "c.yaml"
        out = path.parent / "out"
        try:
            path.write_text(yaml.safe_dump({**nest(flat), "output_dir": str(out)}, allow_unicode=True))
        except (ValueError, yaml.YAMLError):
            return
        cfg = accepted_or_refused(config.parse, cls, ["--config", str(path)], "t")
        if cfg is not None:
            cfg = accepted_or_refused(check, cfg)
        seen["accepted" if cfg is not None else "refused"] += 1
        assert not out.exists()  # parsing and checking write nothing

    run()
    assert seen["refused"] > 0  # the generator does reach bad values


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_as_a_config(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "c.yaml"
    path.write_bytes(data)
    accepted_or_refused(config.parse, config.SFTConfig, ["--config", str(path)], "t")


@SETTINGS
@given(st.sampled_from(["train", "model", "peft"]), st.integers(1, 3))
def test_a_key_given_twice_is_refused(tmp_path_factory, section, gap):
    path = tmp_path_factory.mktemp("dup") / "c.yaml"
    path.write_text(f"{section}:\n  seed_like: 1\n" + "other: 1\n" * 0 + "\n" * gap + f"{section}:\n  x: 2\n")
    with pytest.raises(UserError, match=rf"c.yaml:{3 + gap}: .*key '{section}' appears twice"):
        config.parse(config.SFTConfig, ["--config", str(path)], "t")


# data rows: the keys the formats read, with values of every kind
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", 3]),
                                 "content": st.one_of(st.text(max_size=20), st.none(), st.integers())})
row_value = st.one_of(scalars, st.lists(message, max_size=3), st.lists(scalars, max_size=3),
                      st.dictionaries(st.text(max_size=6), scalars, max_size=2))
DATA_KEYS = ["prompt", "chosen", "rejected", "messages", "response_0", "response_1", "safer_response_id",
             "better_response_id", "history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B",
             "completion", "text", "instruction", "input", "output", "margin", "question", "score_chosen",
             "score_rejected", "helpfulness", "response"]
rows = st.lists(st.dictionaries(st.sampled_from(DATA_KEYS), row_value, min_size=1, max_size=5), min_size=1,
                max_size=4)


def write_rows(tmp_path_factory, data) -> str:
    path = tmp_path_factory.mktemp("rows") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


@SETTINGS
@given(rows, st.sampled_from([None, *sorted(preference_data.FORMATS)]))
def test_generated_preference_rows(tmp_path_factory, data, fmt):
    accepted_or_refused(preference_data.load_pairs, write_rows(tmp_path_factory, data), fmt)


@SETTINGS
@given(rows, st.sampled_from(["auto", "messages", "prompt_completion", "text", "alpaca"]))
def test_generated_sft_rows(tmp_path_factory, data, fmt):
    path = write_rows(tmp_path_factory, data)
    formats = DataConfig.__dataclass_fields__["format"].type
    if fmt not in str(formats):
        fmt = "auto"
    accepted_or_refused(load_sft_data, DataConfig(train=path, format=fmt, validation_split=0.0), 0)


@SETTINGS
@given(st.binary(min_size=1, max_size=120))
def test_random_bytes_as_data(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bin") / "d.jsonl"
    path.write_bytes(data)
    accepted_or_refused(preference_data.load_pairs, str(path))


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (["sft", "--train.eval_steps", "0"], ["ppo", "--ppo.kl_estimator", "k9"],
                 ["reward", "--train.learning_rate", "nan"], ["ppo", "--ppo.forward_batch_size", "0"]):
        out = tmp_path / args[0]
        p = subprocess.run([sys.executable, "-m", "rlhf", *args, "--output_dir", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, (args, p.stderr)
        assert not out.exists()
