"""SFT data: format detection, normalisation to what SFTTrainer reads, and errors naming file/line."""

import json

import pytest
from conftest import real_file

from rlhf.config import DataConfig
from rlhf.data.sft_data import load_sft_data, load_sft_split
from rlhf.errors import UserError


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_format_is_detected_and_normalised(tmp_path):
    cases = {
        "messages": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "prompt_completion": ({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "4"}),
        "alpaca": ({"instruction": "Add.", "input": "2 2", "output": "4"},
                   {"prompt": [{"role": "user", "content": "Add.\n\n2 2"}],
                    "completion": [{"role": "assistant", "content": "4"}]}),
        "text": ({"text": "once upon a time"}, {"text": "once upon a time"}),
    }
    for fmt, (row, expected) in cases.items():
        ds, got = load_sft_split(jsonl(tmp_path, [row] * 3), DataConfig())
        assert got == fmt
        assert ds[0] == expected


def test_alpaca_without_input_has_no_blank_lines(tmp_path):
    ds, _ = load_sft_split(jsonl(tmp_path, [{"instruction": "Say hi.", "input": "", "output": "hi"}]), DataConfig())
    assert ds[0]["prompt"][0]["content"] == "Say hi."


def test_column_map_renames(tmp_path):
    path = jsonl(tmp_path, [{"question": "q?", "answer": "a."}])
    ds, fmt = load_sft_split(path, DataConfig(column_map={"question": "prompt", "answer": "completion"}))
    assert fmt == "prompt_completion" and ds[0] == {"prompt": "q?", "completion": "a."}


def test_csv_and_parquet(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"prompt": ["a", "b"], "completion": ["c", "d"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        ds, fmt = load_sft_split(str(tmp_path / name), DataConfig())
        assert fmt == "prompt_completion" and ds["completion"] == ["c", "d"]


def test_validation_split_holds_out_rows(tmp_path):
    path = jsonl(tmp_path, [{"text": f"row {i}"} for i in range(20)])
    train, val, _ = load_sft_data(DataConfig(train=path, validation_split=0.25), seed=0)
    assert len(train) == 15 and len(val) == 5
    assert not set(train["text"]) & set(val["text"])
    _, none, _ = load_sft_data(DataConfig(train=path, validation_split=0.0), seed=0)
    assert none is None


def test_builtin_quickstart_data():
    train, val, fmt = load_sft_data(DataConfig(), seed=0)
    assert fmt == "messages" and len(train) + len(val) == 4000


@pytest.mark.parametrize("content, expect", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"d.jsonl:2: malformed JSON line"),
    ('{"text": "ok"}\n[1, 2]\n', r"d.jsonl:2: expected a JSON object"),
    ('', r"is empty"),
    ('{"question": "x", "reply": "y"}\n', r"cannot tell the data format from its columns \['question', 'reply'\]"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"row 1: conversation has no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', r"row 1: message 0 expects \{role: one of"),
])
def test_bad_data_errors(tmp_path, content, expect):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=expect):
        load_sft_split(str(path), DataConfig())


def test_missing_column_for_given_format(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "x"}])
    with pytest.raises(UserError, match=r"missing column\(s\) \['completion'\] required by data.format=prompt_completion"):
        load_sft_split(path, DataConfig(format="prompt_completion"))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="data file 'nope.jsonl' does not exist"):
        load_sft_split("nope.jsonl", DataConfig())
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type '.txt'"):
        load_sft_split(str(tmp_path / "d.txt"), DataConfig())


def test_real_alpaca_sample():
    ds, fmt = load_sft_split(str(real_file("alpaca_data_first1000.jsonl")), DataConfig())
    assert fmt == "alpaca" and len(ds) == 1000
    with_input = [r for r in ds if "\n\n" in r["prompt"][0]["content"]]
    assert len(with_input) >= 400  # the README says 441 rows have a non-empty input


def test_real_oasst_trees_linearised():
    ds, fmt = load_sft_split(str(real_file("oasst_en_100_message_trees.jsonl")), DataConfig())
    assert fmt == "oasst" and len(ds) >= 90
    for conv in ds["messages"]:
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate
