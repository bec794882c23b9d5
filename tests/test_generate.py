"""`rlhf generate`: rows per prompt, greedy equals a direct `model.generate`, rewards, bad options."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from rewards import response_chars
from test_ppo import sft_policy  # noqa: F401  (session fixture)

from rlhf import cli
from rlhf.generation.prompts import load_prompts
from rlhf.ppo.config import PromptDataConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N = 6  # prompts


@pytest.fixture(scope="module")
def lora_adapter(sft_policy, tmp_path_factory):  # noqa: F811
    """A peft LoRA adapter directory on the SFT model, random B so that it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(sft_policy),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(sft_policy).save_pretrained(out)
    return str(out)


def greedy(model_dir: str, prompts, max_new_tokens: int) -> list[tuple[str, int]]:
    """(text, tokens) of a plain one-prompt-at-a-time greedy `generate`, the reference for `rlhf generate`."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    is_adapter = (Path(model_dir) / "adapter_config.json").exists()
    model = (AutoPeftModelForCausalLM if is_adapter else AutoModelForCausalLM).from_pretrained(model_dir)
    out = []
    for p in prompts:
        enc = tok.apply_chat_template(p, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # (1, P + A)
        ids = gen[0, enc["input_ids"].shape[1]:]  # (A,), ends at EOS or at the limit
        out.append((tok.decode(ids, skip_special_tokens=True), len(ids)))
    return out


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("which", ["full", "adapter"])
def test_greedy_rows_match_direct_generate(which, tmp_path, sft_policy, lora_adapter, capsys):  # noqa: F811
    model = sft_policy if which == "full" else lora_adapter
    out = tmp_path / "g.jsonl"
    code = cli.main(["generate", "--model", model, "--prompts.max_samples", str(N), "--samples_per_prompt", "2",
                     "--temperature", "0", "--max_new_tokens", "12", "--batch_size", "5",  # batches straddle prompts
                     "--reward.spec", str(REPO / "tests" / "rewards.py") + ":response_chars", "--output", str(out)])
    assert code == 0
    rows = read(out)
    prompts = load_prompts(PromptDataConfig(max_samples=N))
    assert len(rows) == N * 2
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]  # each prompt's samples consecutive
    assert [r["sample"] for r in rows] == [0, 1] * N
    assert all(a["response"] == b["response"] for a, b in zip(rows[::2], rows[1::2]))  # greedy: same answer twice
    direct = greedy(model, prompts, 12)
    assert [(r["response"], r["length"]) for r in rows[::2]] == direct
    assert [r["eos"] for r in rows] == [n < 12 for _, n in direct for _ in range(2)]
    assert [r["reward"] for r in rows] == response_chars([r["prompt"] for r in rows], [r["response"] for r in rows])
    if which == "full":
        assert len({r["reward"] for r in rows}) > 1  # the reward tells the answers apart
    else:
        assert direct != greedy(sft_policy, prompts, 12)  # the adapter was applied: it changes the answers
    assert f"{2 * N} responses ({N} prompts x 2)" in capsys.readouterr().out
    assert not (tmp_path / "g.jsonl.tmp").exists()


def test_sampling_is_seeded_and_varies(tmp_path, sft_policy):  # noqa: F811
    args = ["generate", "--model", sft_policy, "--prompts.max_samples", str(N), "--samples_per_prompt", "3",
            "--temperature", "1.0", "--max_new_tokens", "8"]
    assert cli.main(args + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert cli.main(args + ["--output", str(tmp_path / "b.jsonl")]) == 0
    assert cli.main(args + ["--seed", "1", "--output", str(tmp_path / "c.jsonl")]) == 0
    a, b, c = (read(tmp_path / f"{x}.jsonl") for x in "abc")
    assert len(a) == 3 * N and [r["sample"] for r in a] == [0, 1, 2] * N
    assert "reward" not in a[0]  # no --reward.spec: no reward field
    assert a == b  # same seed, same rows
    assert [r["response"] for r in a] != [r["response"] for r in c]
    assert any(len({r["response"] for r in a[i:i + 3]}) > 1 for i in range(0, 3 * N, 3))  # samples differ


@pytest.mark.parametrize("option, value", [("--samples_per_prompt", "0"), ("--temperature", "-0.5"),
                                           ("--model", "MISSING"), ("--prompts.train", "BAD")])
def test_bad_option_exits_2_and_writes_nothing(option, value, tmp_path, sft_policy, capsys):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    value = {"MISSING": str(tmp_path / "no_model"), "BAD": str(bad)}.get(value, value)
    out = tmp_path / "out" / "g.jsonl"
    args = {"--model": sft_policy, "--output": str(out), option: value}
    code = cli.main(["generate"] + [x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and option.lstrip("-") in err, err
    assert not out.parent.exists()


def test_stop_token_option(tmp_path, sft_policy):  # noqa: F811
    """Regression: `rlhf generate` stopped at EOS whatever the stop token; with none, every answer runs to
    max_new_tokens, and the greedy answer that stopped at EOS is where it starts."""
    args = ["generate", "--model", sft_policy, "--prompts.max_samples", str(N), "--temperature", "0",
            "--max_new_tokens", "12"]
    assert cli.main(args + ["--output", str(tmp_path / "eos.jsonl")]) == 0
    assert cli.main(args + ["--stop_token", "None", "--output", str(tmp_path / "none.jsonl")]) == 0
    eos, none = read(tmp_path / "eos.jsonl"), read(tmp_path / "none.jsonl")
    assert any(r["length"] < 12 for r in eos)  # some answers stop at EOS by default
    assert all(r["length"] == 12 for r in none)
    assert all(b["response"].startswith(a["response"]) for a, b in zip(eos, none))
    assert any(len(b["response"]) > len(a["response"]) for a, b in zip(eos, none))


def test_rewards_that_are_null_are_left_out_of_the_mean(tmp_path, sft_policy, capsys):  # noqa: F811
    """Regression: the summary summed the `null` rewards `rlhf generate` had written itself."""
    fn = tmp_path / "half.py"
    fn.write_text("def half(prompts, responses):\n    return [float('nan') if i % 2 else 1.0 "
                  "for i in range(len(responses))]\n")
    out = tmp_path / "g.jsonl"
    with pytest.warns(UserWarning, match="gave 2 non-finite score"):
        code = cli.main(["generate", "--model", sft_policy, "--prompts.max_samples", "4", "--max_new_tokens", "4",
                         "--reward.spec", f"{fn}:half", "--output", str(out)])
    assert code == 0
    assert [r["reward"] for r in read(out)] == [1.0, None, 1.0, None]
    assert "mean reward 1.0000 over the 2 scored" in capsys.readouterr().out
