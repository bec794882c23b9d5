"""Rebuild the files the package ships: the bundled quickstart data and the tiny tokenizer.

    python -m rlhf.data.assets_build

The tokenizer is trained on the bundled data plus a few lines of general English, so the tiny
model has short token sequences on the quickstart tasks and still encodes any text byte by byte.
"""

from __future__ import annotations

import json

from policies import tiny
from rlhf.data import synthetic
from rlhf.data.sources import BUILTIN_DIR

GENERAL_TEXT = """The quick brown fox jumps over the lazy dog. Human: Assistant: What is the capital of France?
Paris is the capital of France. Please explain how this works, step by step, in a few sentences.
I am sorry, but I cannot help with that. Thank you! Here is a summary of the main points.
Give three tips for staying healthy: eat well, sleep enough, exercise regularly."""


def main() -> None:
    synthetic.main()
    texts = [GENERAL_TEXT] * 4
    for path in [BUILTIN_DIR / "quickstart_sft.jsonl"]:  # the tokenizer shipped was trained on this file only
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [m["content"] for m in row.get("messages", [])] or [json.dumps(row)]
    tok = tiny.train_tokenizer(texts)
    tok.save_pretrained(tiny.TOKENIZER_DIR)
    print(f"wrote {tiny.TOKENIZER_DIR} ({len(tok)} tokens)")


if __name__ == "__main__":
    main()
