"""Read the records of an offline W&B run file (`run-*.wandb`) back, for tests.

The file is a LevelDB-style log (32 KiB blocks, 7-byte record headers: crc32 4, length 2, type 1)
after a 7-byte file header, each record a serialised `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer: padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        chunks.append(payload)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            chunks = []
            yield rec


def history(path: str | Path) -> list[dict]:
    """Every logged history row as {key: value}."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def run_info(path: str | Path):
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    return None
