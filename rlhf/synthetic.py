"""A synthetic instruction corpus with exact answers, small enough for a tiny model on a CPU.

Each task is a short instruction whose correct reply is computed, so a tiny model can learn it in
a few hundred steps and later stages can judge replies exactly. It generates the bundled quickstart
data (`python -m rlhf.synthetic` rewrites `rlhf/assets/data/`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("cat dog sun moon tree bird fish star rain snow leaf rock boat kite lamp rose frog wolf "
         "bear hill road door ship milk corn gold iron ring bell drum").split()
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."


def _task(rng: random.Random) -> tuple[str, str]:
    """One (instruction, answer) pair from a random task family."""
    kind = rng.randrange(6)
    w = rng.choice(WORDS)
    if kind == 0:
        return f"Reverse the word {w}.", w[::-1]
    if kind == 1:
        return f"Write {w} in capital letters.", w.upper()
    if kind == 2:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 3:
        n = rng.randrange(2, 5)
        return f"Repeat {w} {n} times.", " ".join([w] * n)
    if kind == 4:
        letters = rng.sample("abcdefghij", 4)
        return f"Sort the letters {' '.join(letters)}.", " ".join(sorted(letters))
    n = rng.randrange(50)
    return f"What number comes after {n}?", str(n + 1)


def conversation(rng: random.Random) -> list[dict]:
    """A conversation of one or two user/assistant exchanges, sometimes with a system prompt."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
    for _ in range(1 if rng.random() < 0.8 else 2):
        question, answer = _task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` conversational SFT rows (`messages` format)."""
    rng = random.Random(seed)
    return [{"messages": conversation(rng)} for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    out = Path(__file__).parent / "assets" / "data"
    write_jsonl(sft_rows(800, seed=0), out / "quickstart_sft.jsonl")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
