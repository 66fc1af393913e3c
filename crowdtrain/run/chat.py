"""Conversations -> token ids and a loss mask, with the model's own chat template.

A conversation (`messages`: a list of {role, content}) is rendered with the model's chat
template by transformers' `apply_chat_template` (so templates see `bos_token`, `eos_token`,
`raise_exception` as they do in transformers), and only the assistant's turns carry loss. The
rendering is split into turns by rendering the conversation incrementally: before each
assistant turn i, messages[:i] with the generation prompt; after it, messages[:i+1]. Each
rendering must extend the one before (a template that rewrites earlier turns cannot be split,
and says so). The assistant's piece is the text between the two: its content and whatever the
template writes after it (its end-of-turn token, e.g. `<|im_end|>\\n` or `</s>`).

The whole rendering is tokenized at once, as at inference (pieces tokenized one by one would
differ from it, e.g. where a tokenizer prepends a space marker to each text), and each token
takes the piece its first character lies in: mask 1 for the assistant's, 0 for the rest
(system and user turns, the generation prompt).
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from crowdtrain.errors import CrowdtrainError

ASSISTANT = "assistant"


class ChatEncoder:
    """A chat template bound to a tokenizer and its bos/eos token strings."""

    def __init__(self, tokenizer: Tokenizer, template: str, bos_token: str | None,
                 eos_token: str | None):
        from transformers import PreTrainedTokenizerFast

        kw = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v}
        self.tokenizer = tokenizer
        self.template = template
        self.hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kw)

    def render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        """The template's text for `messages` (with the assistant's generation prompt)."""
        try:
            text = self.hf.apply_chat_template(messages, chat_template=self.template,
                                               tokenize=False,
                                               add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError, or the template's raise_exception
            raise CrowdtrainError(f"{where}: the chat template fails on this conversation "
                                  f"({type(e).__name__}: {e})") from None
        if not isinstance(text, str):
            raise CrowdtrainError(f"{where}: the chat template did not render to text")
        return text

    def pieces(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
        """The conversation's rendering as (text, is_assistant) pieces, in order."""
        out: list[tuple[str, bool]] = []
        done = ""

        def extend(text: str, assistant: bool, upto: int) -> None:
            nonlocal done
            if not text.startswith(done):
                raise CrowdtrainError(
                    f"{where}: the chat template cannot be split into turns (its rendering of "
                    f"the first {upto} messages does not start with its rendering of fewer); "
                    "give such data as plain text instead")
            if len(text) > len(done):
                out.append((text[len(done):], assistant))
            done = text

        for i, m in enumerate(messages):
            if m["role"] == ASSISTANT:
                extend(self.render(messages[:i], True, where), False, i)
                extend(self.render(messages[: i + 1], False, where), True, i + 1)
        if messages[-1]["role"] != ASSISTANT:
            extend(self.render(messages, False, where), False, len(messages))
        return out

    def encode(self, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, mask) of a conversation: mask 1 where the token is the assistant's."""
        pieces = self.pieces(messages, where)
        text = "".join(t for t, _ in pieces)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        starts = np.cumsum([0] + [len(t) for t, _ in pieces[:-1]])
        assistant = np.array([a for _, a in pieces], dtype=np.uint8)
        first = np.array([s for s, _ in enc.offsets], dtype=np.int64)
        mask = assistant[np.searchsorted(starts, first, side="right") - 1] if len(first) else \
            np.zeros(0, np.uint8)
        return np.asarray(enc.ids, dtype=np.int64), mask.astype(np.uint8)
