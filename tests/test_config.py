"""Config: YAML + overrides -> typed dataclasses; every mistake is a one-line error naming where."""

import textwrap

import pytest
import yaml

from rlhf import config
from rlhf.config import SFTConfig
from rlhf.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, """
        peft:
          method: ia3
        train:
          learning_rate: 1e-4     # YAML 1.1 reads this as a string; it must still become a float
          packing: true
        tracking:
          tags: [a, b]
    """)
    cfg = config.parse(SFTConfig, ["--config", path, "--peft.method", "lora", "--train.packing", "false",
                                   "--output_dir", "runs/x", "--peft.target_modules", "q_proj", "v_proj"], "t")
    assert cfg.peft.method == "lora"  # command line wins over the file
    assert cfg.train.learning_rate == pytest.approx(1e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.packing is False
    assert cfg.tracking.tags == ["a", "b"]
    assert cfg.output_dir == "runs/x"
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == SFTConfig().train.max_steps  # untouched fields keep defaults


def test_unknown_key_names_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, """
        model:
          name_or_path: tiny
        train:
          lerning_rate: 0.1
    """)
    with pytest.raises(UserError) as e:
        config.parse(SFTConfig, ["--config", path], "t")
    msg = str(e.value)
    assert f"{path}:5" in msg and "'train.lerning_rate'" in msg
    assert "did you mean 'learning_rate'" in msg and "max_steps" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, "optimiser:\n  lr: 1\n")
    with pytest.raises(UserError, match=r":1: unknown config key 'optimiser'.*Valid keys: model, peft"):
        config.parse(SFTConfig, ["--config", path], "t")


@pytest.mark.parametrize("text, expect", [
    ("train:\n  max_steps: ten\n", r":2: 'train.max_steps' expects an integer, got 'ten'"),
    ("peft:\n  method: lorra\n", r"'peft.method' expects one of 'full', 'lora', 'qlora'"),
    ("train:\n  packing: 3\n", r"'train.packing' expects true or false"),
    ("train: 5\n", r"'train' is a section"),
    ("train:\n  lr: [1\n", r"invalid YAML"),
])
def test_bad_values(tmp_path, text, expect):
    with pytest.raises(UserError, match=expect):
        config.parse(SFTConfig, ["--config", write(tmp_path, text)], "t")


def test_missing_config_file():
    with pytest.raises(UserError, match="--config 'nope.yaml' does not exist"):
        config.parse(SFTConfig, ["--config", "nope.yaml"], "t")


def test_unknown_override_is_one_line_with_a_suggestion():
    with pytest.raises(UserError) as e:
        config.parse(SFTConfig, ["--train.lerning_rate", "1"], "t")
    message = str(e.value)
    assert "\n" not in message and "---" not in message
    assert "Unrecognized options: --train.lerning_rate" in message
    assert "Perhaps you meant: --train.learning_rate" in message  # tyro's suggestion, kept


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        config.parse(SFTConfig, ["--help"], "rlhf sft")
    out = " ".join(capsys.readouterr().out.split())
    for flag in ["--peft.method", "--peft.use_dora", "--train.early_stopping_patience", "--data.column_map",
                 "--tracking.report_to", "--model.tiny.hidden_size", "--resume"]:
        assert flag in out
    assert "rank-stabilised scaling" in out  # field docstrings become the help text


def test_save_round_trips(tmp_path):
    cfg = config.parse(SFTConfig, ["--peft.method", "qlora", "--tracking.tags", "x"], "t")
    config.save(cfg, tmp_path / "resolved.yaml")
    again = config.parse(SFTConfig, ["--config", str(tmp_path / "resolved.yaml")], "t")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["peft"]["method"] == "qlora"


def test_every_shipped_config_parses():
    from conftest import REPO

    from rlhf import ppo
    from rlhf.stages.pipeline import PipelineConfig

    classes = {"sft_": SFTConfig, "ppo_": ppo.PPOConfig, "quickstart": PipelineConfig,
               "reward_": config.RewardConfig}
    seen = 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cls = next((c for prefix, c in classes.items() if path.name.startswith(prefix)), None)
        if cls is None:
            continue
        cfg = config.parse(cls, ["--config", str(path)], "t")
        assert cfg.output_dir
        seen += 1
    assert seen >= 6
