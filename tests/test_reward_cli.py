"""`rlhf data check`, `rlhf reward`, `rlhf classifier` and `rlhf eval reward` from the command line."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, real_file

from rlhf import cli
from rlhf.data.preference_data import load_pairs

FIXTURES = REPO / "tests" / "fixtures" / "preference"


def run(*args, **env):
    return subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


@pytest.mark.parametrize("name, fmt", [
    ("hh_rlhf_harmless_base_test_first1000.jsonl", "hh_rlhf"),
    ("hh_rlhf_helpful_base_test_first1000.jsonl", "hh_rlhf"),
    ("ultrafeedback_binarized_test_prefs_first500_chosen_rejected.jsonl", "ultrafeedback_binarized"),
    ("oasst_en_100_message_trees.jsonl", "oasst"),
])
def test_data_check_on_real_samples(capsys, name, fmt):
    path = str(real_file(name))
    assert cli.main(["data", "check", path]) == 0
    out = capsys.readouterr().out
    pairs, report = load_pairs(path)
    assert f"format: {fmt} (detected from columns)" in out
    assert f"pairs: {len(pairs)}\n" in out and f"rows read: {report.rows_in}\n" in out
    assert out.count("  chosen:   ") == 3


def test_data_check_options_and_column_map(capsys, tmp_path):
    shp = str(FIXTURES / "shp_sample.jsonl")
    assert cli.main(["data", "check", shp, "--format", "shp", "--option", "min_score_ratio=null"]) == 0
    all_pairs = capsys.readouterr().out
    assert cli.main(["data", "check", shp, "--option", "min_score_ratio=2", "--examples", "1"]) == 0
    filtered = capsys.readouterr().out
    assert "score_ratio_below_min" in filtered and "score_ratio_below_min" not in all_pairs
    assert filtered.count("  chosen:   ") == 1
    csv = tmp_path / "p.csv"
    csv.write_text("q,good,bad\nWhat is 1 plus 1?,two,three\n")
    assert cli.main(["data", "check", str(csv), "--column_map", "prompt=q", "chosen=good", "rejected=bad"]) == 0
    assert "pairs: 1\n" in capsys.readouterr().out
    assert cli.main(["data", "check", shp, "--option", "pairing"]) == 2
    assert "--option expects NAME=VALUE, got 'pairing'" in capsys.readouterr().err


def test_reward_then_eval_reward_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "rm"
    assert cli.main(["reward", "--config", "configs/reward_tiny.yaml", "--model.name_or_path", "tiny",
                     "--output_dir", str(out),
                     "--train.max_steps", "6", "--train.eval_steps", "3", "--train.max_length", "64"]) == 0
    assert "reward done: validation accuracy" in capsys.readouterr().out
    report_file = tmp_path / "eval.json"
    r = run("eval", "reward", "--model", str(out), "--data", "builtin:quickstart_prefs", "--max_samples", "40",
            "--output", str(report_file), "--buckets", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads(report_file.read_text())
    assert report["pairs"] == 40 and 0 <= report["accuracy"] <= 1 and 0 <= report["ece"] <= 0.5
    assert len(report["accuracy_by_reward_margin"]) == 2 and sum(b["n"] for b in report["calibration"]) == 40
    assert report["scores"]["all"]["n"] == 80 and "all_normalized" in report["scores"]
    for line in ("accuracy ", "ECE ", "accuracy by reward margin", "calibration", "score distribution"):
        assert line in r.stdout
    assert f"accuracy        {report['accuracy']:.3f}" in r.stdout


def test_user_errors_exit_2_with_one_line(tmp_path):
    r = run("reward", "--config", "configs/reward_tiny.yaml", "--model.name_or_path", "tiny",
            "--data.train", "missing.jsonl",
            "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "rlhf reward: error: data file 'missing.jsonl' does not exist"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["eval", "reward", "--model", "/nonexistent/rm", "--data", "builtin:quickstart_prefs"],
     "rlhf eval: error: reward '/nonexistent/rm' does not exist"),
    (["eval", "reward", "--data", "builtin:quickstart_prefs"], "rlhf eval: error: --model is required"),
    (["eval", "bogus"], "rlhf eval: error: expected what to evaluate: `rlhf eval reward"),
    (["classifier", "--config", "configs/classifier_tiny.yaml", "--data.text_column", "body"],
     "column(s) body not found"),
    (["reward", "--config", "configs/reward_tiny.yaml", "--model.name_or_path", "tiny", "--peft.method", "ia3"],
     "rlhf reward: error: peft.method=ia3 is not supported by `rlhf reward`"),
    (["data", "check", "builtin:nothing"], "rlhf data: error: unknown built-in data 'builtin:nothing'"),
])
def test_cli_errors(capsys, argv, message):
    if argv[0] == "classifier":
        real_file("jigsaw_toxic_comment_train_balanced_subsample2000.csv")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
