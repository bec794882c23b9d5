"""The `rlhf` command as a user runs it: the quickstart end to end, merge, and bad input -> exit 2."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, sft_config

from rlhf import cli
from rlhf.stages import sft

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd or REPO, timeout=600)


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
def test_quickstart_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "quick"
    p = run("sft", "--config", "configs/sft_tiny.yaml", "--output_dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "peft.method=full: trainable parameters" in p.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]  # it learned the synthetic tasks
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write cat in capital letters."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.eos_token_id in gen[0, ids["input_ids"].shape[1]:].tolist()  # it learned to stop
    assert (out / "rlhf_config.yaml").exists()


def test_top_level_help_lists_commands():
    p = run("--help")
    assert p.returncode == 0
    for command in ("sft", "merge", "estimate-memory"):
        assert command in p.stdout


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bad_inputs(tmp_path):
    good = [{"prompt": "a", "completion": "b"}] * 8
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: b}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return {
        "malformed line": (["--data.train", str(broken)], "broken.jsonl:2: malformed JSON line"),
        "missing column": (["--data.train", write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a"}] * 4),
                            "--data.format", "prompt_completion"], "missing column(s) ['completion']"),
        "empty dataset": (["--data.train", str(empty)], "is empty"),
        "missing model": (["--model.name_or_path", str(tmp_path / "no_such_model"),
                           "--data.train", write_jsonl(tmp_path / "g.jsonl", good)], "does not exist"),
        "impossible combination": (["--peft.method", "prefix_tuning", "--train.packing", "true"],
                                   "train.packing cannot be combined with peft.method=prefix_tuning"),
        "save not multiple of eval": (["--train.save_steps", "7"], "train.save_steps (7) must be a multiple"),
    }


@pytest.mark.parametrize("case", ["malformed line", "missing column", "empty dataset", "missing model",
                                  "impossible combination", "save not multiple of eval"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    args, expect = bad_inputs(tmp_path)[case]
    code = cli.main(["sft", "--config", str(REPO / "configs" / "sft_tiny.yaml"),
                     "--output_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("rlhf sft: error:") and expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "rlhf_config.yaml").exists()  # nothing written for a refused run


def test_bad_input_in_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lerning_rate: 1\n")
    p = run("sft", "--config", str(tmp_path / "bad.yaml"))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "bad.yaml:2: unknown config key 'train.lerning_rate'; did you mean 'learning_rate'?" in p.stderr

    p = run("sft", "--peft.method", "lorra")  # unknown choice on the command line
    assert p.returncode == 2 and "Traceback" not in p.stderr and "lorra" in p.stderr


def test_merge_gives_adapter_logits(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    sft.main(sft_config(tmp_path, "--peft.method", "lora", "--train.learning_rate", "1e-2"))
    adapter, merged = tmp_path / "out", tmp_path / "merged"
    assert cli.main(["merge", str(adapter), str(merged)]) == 0
    x = torch.tensor([[3, 50, 51, 52, 53, 54]])
    with torch.no_grad():
        want = AutoPeftModelForCausalLM.from_pretrained(adapter)(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(adapter / "base_model")(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (base - want).abs().max() > 1e-3  # the adapter did change the model
    assert not (merged / "adapter_config.json").exists()


def test_merge_refuses_bad_input(tmp_path, capsys):
    assert cli.main(["merge", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    sft.main(sft_config(tmp_path, "--peft.method", "prompt_tuning", "--train.max_steps", "1"))
    assert cli.main(["merge", str(tmp_path / "out"), str(tmp_path / "o")]) == 2
    assert "PROMPT_TUNING adapter cannot be merged" in capsys.readouterr().err
