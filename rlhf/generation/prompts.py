"""Prompts: loading them from any source, chat-templating them into token ids, left padding.

Every sampler (PPO's rollouts, the held-out evaluation, `rlhf eval policy`, `rlhf generate`, the
benchmarks) reads prompts through `load_prompts` and encodes them with `encode_prompts`, so a prompt
means the same token ids wherever it is sampled."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from rlhf.errors import UserError

if TYPE_CHECKING:  # the config class sits beside PPO's other configs
    from rlhf.ppo.config import PromptDataConfig


def load_prompts(cfg: PromptDataConfig) -> list[list[dict]]:
    """Prompts as message lists ending with a user turn, each distinct prompt once."""
    from rlhf.data import preference_data
    from rlhf.data.sources import load_rows, rename_columns

    fmt = cfg.format
    # data.column_map is {column: name}; the preference formats read {field: column}
    pair_map = {field: column for column, field in cfg.column_map.items()} or None
    if fmt not in ("auto", "messages", "prompt"):  # a preference format: take its pairs' prompts
        pairs, _ = preference_data.load_pairs(cfg.train, format=fmt, column_map=pair_map, split=cfg.split)
        prompts = [p["prompt"] for p in pairs]
    else:
        ds = rename_columns(load_rows(cfg.train, split=cfg.split), cfg.column_map, cfg.train)
        cols = ds.column_names
        if fmt == "auto":
            fmt = "messages" if "messages" in cols else "prompt" if "prompt" in cols and not (
                {"chosen", "rejected"} <= set(cols) or "response_0" in cols) else "pairs"
        if fmt == "pairs":
            pairs, _ = preference_data.load_pairs(cfg.train, column_map=pair_map, split=cfg.split)
            prompts = [p["prompt"] for p in pairs]
        elif fmt not in cols:
            raise UserError(f"{cfg.train}: no '{fmt}' column for data.format={cfg.format}; columns: {cols}")
        else:
            prompts = [as_prompt(row[fmt], f"{cfg.train} row {i + 1}") for i, row in enumerate(ds)]
    seen, unique = set(), []
    for p in prompts:  # preference data repeats prompts; roll out each once per epoch
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if len(unique) < len(prompts):
        print(f"{cfg.train}: {len(prompts) - len(unique)} duplicate prompt(s) collapsed, {len(unique)} distinct "
              "(use ppo.samples_per_prompt to sample a prompt several times)")
    if cfg.max_samples is not None:
        unique = unique[:cfg.max_samples]
    if not unique:
        raise UserError(f"{cfg.train}: no prompts")
    return unique


def as_prompt(value, where: str) -> list[dict]:
    """A prompt column's value (text, or a conversation) as messages that end with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        turns = [{"role": m["role"], "content": m["content"]} for m in value]
        while turns and turns[-1]["role"] == "assistant":  # a conversation: prompt = up to the last user turn
            turns.pop()
        if turns:
            return turns
    raise UserError(f"{where}: expected a prompt as text or a list of {{role, content}} messages with a user turn")


def encode_prompts(tokenizer, prompts: list[list[dict]], max_len: int) -> list[list[int]]:
    """Chat-template each prompt (with the assistant header) and keep its last `max_len` tokens."""
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids)[-max_len:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P)), padded on the left so every prompt ends where generation starts."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count only real tokens, as `generate` uses with left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
