"""Read rows from a data source: a local jsonl/json/csv/parquet file, a shipped `builtin:NAME` file,
or a `datasets` hub name (optionally `name:config` and `@split`).

Every reader returns a `datasets.Dataset`. Local JSON Lines are parsed here, line by line, so a
malformed line is reported with its file and line number (datasets' own reader reports neither).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path

from rlhf.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "assets" / "data"
LOCAL_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def builtin_path(name: str) -> Path:
    """Path of a data file shipped with the package (`builtin:quickstart_sft` -> assets/data/quickstart_sft.jsonl)."""
    matches = sorted(BUILTIN_DIR.glob(f"{name}.*"))
    if not matches:
        known = sorted(p.stem for p in BUILTIN_DIR.iterdir() if p.suffix in LOCAL_SUFFIXES)
        raise UserError(f"unknown built-in data 'builtin:{name}'; shipped ones: {', '.join(known)}")
    return matches[0]


def resolve_source(source: str) -> str:
    """Turn `builtin:NAME` into a file path; leave anything else alone."""
    if source.startswith("builtin:"):
        return str(builtin_path(source.removeprefix("builtin:")))
    return source


def _not_utf8(path, line: int, offset: int, byte: bytes) -> UserError:
    return UserError(f"{path}:{line}: not valid UTF-8 (byte {offset}: {byte!r}); save the file as UTF-8")


def read_text(path: str | os.PathLike) -> str:
    """A text file's contents; bytes that are not UTF-8 are a UserError naming the file, line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data[:e.start].count(b"\n") + 1, e.start, data[e.start:e.start + 1]) from None


def check_utf8(path: str | os.PathLike, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 (naming line and byte) without holding it in memory: for the files
    handed to another reader (csv), whose own decoding error names neither."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed, lines = 0, 0  # bytes and newlines of the chunks decoded so far
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # e.object is pending + block
                raise _not_utf8(path, lines + e.object[:e.start].count(b"\n") + 1, fed - len(pending) + e.start,
                                e.object[e.start:e.start + 1]) from None
            if not block:
                return
            fed, lines = fed + len(block), lines + block.count(b"\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Parse a JSON Lines file; a bad line is a UserError naming `file:line`."""
    rows = []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):  # not splitlines: U+2028 is JSON text
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: str) -> list[dict]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file may also hold JSON Lines; try that before giving up.
        try:
            return read_jsonl(path)
        except UserError:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); expected a list of objects "
                            "or one object per line") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects")
    return data


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception: datasets wraps the reader's own message ("Expected 2
    fields in line 3, saw 3") in "An error occurred while generating the dataset"."""
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_rows(source: str, split: str = "train"):
    """Load `source` as a `datasets.Dataset`.

    `source` is a local file (.jsonl/.json/.csv/.parquet), `builtin:NAME`, or a hub dataset
    `owner/name` (add `:config` for a configuration; `split` picks the split).
    """
    import datasets

    source = resolve_source(source)
    suffix = Path(source).suffix.lower()
    if os.path.exists(source):
        if os.path.isdir(source):
            raise UserError(f"data source '{source}' is a directory; expected a .jsonl/.json/.csv/.parquet file")
        kind = LOCAL_SUFFIXES.get(suffix)
        if kind is None:
            raise UserError(f"data source '{source}': unknown file type '{suffix}'; expected one of "
                            f"{', '.join(LOCAL_SUFFIXES)}")
        if kind in ("jsonl", "json"):
            rows = read_jsonl(source) if kind == "jsonl" else _read_json(source)
            if not rows:
                raise UserError(f"data source '{source}' is empty: no rows")
            try:
                return datasets.Dataset.from_list(rows)
            except (TypeError, ValueError, OverflowError, ArithmeticError) as e:  # arrow: no common type, a huge int
                raise UserError(f"{source}: rows do not share one schema ({str(e).splitlines()[0]})") from None
        if kind == "csv":
            check_utf8(source)
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file reads in a blink; its bars only clutter stderr
        logger = logging.getLogger("datasets")
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # its "Failed to read file" line would repeat our one-line error
        try:
            ds = datasets.load_dataset(kind, data_files=source, split="train")
        except Exception as e:  # pyarrow/pandas parse errors carry no common type
            raise UserError(f"{source}: could not be read as {kind} ({_root_cause(e)})") from None
        finally:
            logger.setLevel(level)
            if bars:
                datasets.enable_progress_bars()
        if len(ds) == 0:
            raise UserError(f"data source '{source}' is empty: no rows")
        return ds
    if suffix in LOCAL_SUFFIXES or source.startswith((".", "/")):
        raise UserError(f"data file '{source}' does not exist")
    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all mean the same to the user
        raise UserError(f"data source '{source}' is not a local file and could not be loaded from the "
                        f"Hugging Face hub (split '{split}'): {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise UserError(f"data source '{source}' (split '{split}') is empty: no rows")
    return ds


def rename_columns(ds, column_map: dict[str, str], source: str, option: str = "data.column_map"):
    """`ds` with its columns renamed as `column_map` = {column in the file: new name} says (the SFT and
    PPO-prompt direction; preference formats read {field: column} and invert it). A column the file lacks
    is a UserError naming the file, the column and the columns it has, and saying which way the map reads
    when the reverse map would have matched; a new name that is already a column replaces that column."""
    cols = ds.column_names
    missing = [c for c in column_map if c not in cols]
    if missing:
        hint = ""
        if all(v in cols for v in column_map.values()):
            flipped = ", ".join(f"{v}: {k}" for k, v in column_map.items())
            hint = f"; {option} maps a column of the file to the name to read it as: {{{flipped}}}"
        raise UserError(f"{source}: {option} names column(s) {', '.join(map(repr, missing))} that the file "
                        f"does not have; its columns: {', '.join(cols)}{hint}")
    targets = list(column_map.values())
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise UserError(f"{option}: several columns are renamed to {', '.join(map(repr, twice))}; each name once")
    renames = {old: new for old, new in column_map.items() if old != new}
    replaced = [new for new in renames.values() if new in cols and new not in renames]
    if replaced:  # the map says where the field comes from: the column of that name steps aside
        ds = ds.remove_columns(replaced)
    return ds.rename_columns(renames) if renames else ds


def hold_out(ds, fraction: float, seed: int, rows: str = "rows"):
    """Split `fraction` of `ds` off for validation (seeded): (train, validation), or (ds, None) when
    fraction <= 0. Shared by the SFT and reward stages."""
    if fraction <= 0:
        return ds, None
    if not 0 < fraction < 1:
        raise UserError(f"data.validation_split expects a fraction in [0, 1), got {fraction}")
    n_val = max(1, round(len(ds) * fraction))
    if n_val >= len(ds):
        raise UserError(f"data.validation_split={fraction} leaves no training {rows} out of {len(ds)}")
    split = ds.train_test_split(test_size=n_val, seed=seed)
    return split["train"], split["test"]
