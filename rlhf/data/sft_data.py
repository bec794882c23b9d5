"""SFT data: detect the row format, check every row, and normalise to what trl.SFTTrainer reads.

| format              | columns                         | becomes                                        |
|---------------------|---------------------------------|------------------------------------------------|
| `messages`          | messages: [{role, content}, ..] | messages (loss on assistant turns)             |
| `prompt_completion` | prompt, completion (str or msgs)| prompt, completion (loss on the completion)    |
| `alpaca`            | instruction, input?, output     | conversational prompt, completion              |
| `text`              | text                            | text (loss on every token)                     |
| `oasst`             | message_tree_id, prompt (tree)  | messages, one per root-to-leaf thread          |
"""

from __future__ import annotations

from rlhf.config import DataConfig
from rlhf.data.sources import hold_out, load_rows, rename_columns
from rlhf.errors import UserError

FORMATS = {  # format -> required columns, checked in this order by detection
    "messages": ("messages",),
    "oasst": ("message_tree_id", "prompt"),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


def detect_format(columns: list[str], source: str) -> str:
    matches = [f for f, need in FORMATS.items() if all(c in columns for c in need)]
    if not matches:
        expected = "; ".join(f"{f}: {'+'.join(need)}" for f, need in FORMATS.items())
        raise UserError(f"{source}: cannot tell the data format from its columns {columns}; expected one of "
                        f"({expected}). Set data.format, or data.column_map to rename columns")
    return matches[0]


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' expects a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} expects {{role: one of {', '.join(ROLES)}, content: text}}, "
                            f"got {str(m)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _as_turns(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _check_messages(value, f"{where} '{field}'")
    raise UserError(f"{where}: '{field}' expects text or a list of messages, got {type(value).__name__}")


def normalise_row(row: dict, fmt: str, where: str) -> list[dict]:
    """One source row -> zero or more rows in the shape SFTTrainer reads."""
    if fmt == "messages":
        messages = _check_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: conversation has no assistant turn to learn from")
        return [{"messages": messages}]
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"prompt": prompt, "completion": completion}]
        return [{"prompt": _as_turns(prompt, "user", where, "prompt"),
                 "completion": _as_turns(completion, "assistant", where, "completion")}]
    if fmt == "alpaca":
        instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            raise UserError(f"{where}: 'instruction', 'input' and 'output' expect text")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"prompt": [{"role": "user", "content": prompt}],
                 "completion": [{"role": "assistant", "content": output}]}]
    if fmt == "text":
        if not isinstance(row["text"], str):
            raise UserError(f"{where}: 'text' expects text, got {type(row['text']).__name__}")
        return [{"text": row["text"]}]
    if fmt == "oasst":
        from rlhf.data.preference_data import oasst_threads

        return [{"messages": t} for t in oasst_threads(row) if any(m["role"] == "assistant" for m in t)]
    raise UserError(f"unknown data.format '{fmt}'; expected one of auto, {', '.join(FORMATS)}")


def load_sft_split(source: str, cfg: DataConfig, max_samples: int | None = None):
    """Read `source`, rename columns, detect/check the format, normalise. Returns (Dataset, format)."""
    import datasets

    ds = load_rows(source, split=cfg.split)
    ds = rename_columns(ds, cfg.column_map, source)
    fmt = detect_format(ds.column_names, source) if cfg.format == "auto" else cfg.format
    need = [c for c in FORMATS[fmt] if c not in ds.column_names]
    if need:
        raise UserError(f"{source}: missing column(s) {need} required by data.format={fmt}; "
                        f"columns found: {ds.column_names}")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    rows = []
    for i, row in enumerate(ds):
        rows += normalise_row(row, fmt, f"{source} row {i + 1}")
    if not rows:
        raise UserError(f"{source}: no usable rows after reading {len(ds)} (data.format={fmt})")
    return datasets.Dataset.from_list(rows), fmt


def load_sft_data(cfg: DataConfig, seed: int):
    """(train, validation or None, format) for the SFT stage."""
    train, fmt = load_sft_split(cfg.train, cfg, cfg.max_samples)
    if cfg.validation is not None:
        validation, vfmt = load_sft_split(cfg.validation, cfg)
        if (fmt == "text") != (vfmt == "text"):
            raise UserError(f"data.validation is in format '{vfmt}' but data.train is '{fmt}'")
        return train, validation, fmt
    train, validation = hold_out(train, cfg.validation_split, seed)
    return train, validation, fmt
