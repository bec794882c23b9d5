"""Token in, token out: the ids of an episode grow by concatenation, never by re-templating.

    turns = ChatTurns(tokenizer)
    ids = turns.prompt_ids(first_messages)         # the template with the assistant header
    ids += sampled_ids                              # the agent's tokens, as sampled, ending in EOS
    ids += turns.reply_ids(reply_messages)          # the environment's turn, encoded once
    ids += next_sampled_ids ...

`reply_ids` renders only the new turn(s): the template's text after an assistant turn's EOS (the
`\\n` of `<|end|>\\n`), the reply messages and the header of the next assistant turn. It is the text
that the template adds to a conversation ending in an assistant turn when the reply is appended with
`add_generation_prompt=True` (rendered once here on a placeholder conversation), encoded on its own.

When the pieces equal the template of the whole conversation (tested for the shipped tiny template):
the sampled ids are the canonical tokenisation of the assistant text followed by EOS, and the template
is append-only. They differ, by design, where a re-tokenisation would change the trained tokens:
- the sampler produced a tokenisation the tokenizer would not (`do` + `g` where encoding gives `dog`):
  we keep the sampled ids, which are the ones the logprobs belong to;
- the template is not append-only (it rewrites earlier turns once later ones exist, e.g. drops the
  reasoning of earlier assistant turns, or dates the system prompt): refused at construction where the
  placeholder conversation shows it, else the ids follow the conversation as it was when sampled;
- text merges across a piece boundary that is not a special token: the EOS that ends each agent turn
  is one (split out before BPE), so the reply's encoding starts fresh; the generation header's last
  text (`<|assistant|>\\n`) and the first sampled token are separated by the pre-tokenizer for this
  template, but a template ending its header in plain text could merge there on re-tokenisation.
"""

from __future__ import annotations

from rlhf.envs.interface import Message
from rlhf.errors import UserError

_PLACEHOLDER = "\x00agent turn\x00"  # a content no template or reply contains


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or (transformers 5) a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


class ChatTurns:
    """Encodes an episode's turns with `tokenizer`'s chat template, each piece once."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id == tokenizer.pad_token_id:
            raise UserError("the tokenizer needs an EOS token distinct from PAD to end agent turns")
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PLACEHOLDER}]
        rendered = self._render(base, add_generation_prompt=False)
        tail = rendered[rendered.index(_PLACEHOLDER) + len(_PLACEHOLDER):]
        if not tail.startswith(tokenizer.eos_token):
            raise UserError(f"the chat template does not end an assistant turn with EOS {tokenizer.eos_token!r} "
                            f"(it renders {tail[:40]!r} after the content): agent turns cannot end where it stops")
        self._base, self._base_text = base, rendered
        self._after_eos = tail[len(tokenizer.eos_token):]  # the template's text after an assistant's EOS

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The first messages with the header of the agent's first turn."""
        return _ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def reply_text(self, reply: list[Message]) -> str:
        """The text that follows an agent turn's EOS: the template's end of that turn, the reply messages
        and the next assistant header."""
        rendered = self._render(self._base + reply, add_generation_prompt=True)
        if not rendered.startswith(self._base_text):
            raise UserError("the chat template is not append-only: adding a turn changes how the earlier turns "
                            "render, so episodes cannot grow by concatenation")
        return self._after_eos + rendered[len(self._base_text):]

    def reply_ids(self, reply: list[Message]) -> list[int]:
        """`reply_text` encoded once (no BOS: it continues a sequence)."""
        return self.tokenizer.encode(self.reply_text(reply), add_special_tokens=False)
