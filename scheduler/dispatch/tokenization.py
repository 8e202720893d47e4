"""Prompt tokenization that matches the engine token for token.

The router hashes prompt blocks to predict cache hits, so its token ids must be exactly the
engine's. vLLM (0.32) does, per endpoint:

* ``/v1/completions``: a string prompt is encoded with ``add_special_tokens`` (default True, so
  BOS is added by the tokenizer's post-processor); a list of token ids is used as is.
* ``/v1/chat/completions``: the chat template is rendered to text with
  ``add_generation_prompt`` (default True) and ``continue_final_message`` (default False), plus
  ``tools``/``documents``/``chat_template_kwargs``, then encoded with ``add_special_tokens``
  defaulting to **False** (the template writes BOS itself). Message content given as a list of
  text parts is joined with newlines, which is vLLM's "string" content format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Above this many characters a prompt is tokenized off the event loop (see HFPromptTokenizer).
LONG_PROMPT_CHARS = 32_768


class PromptTokenizer(Protocol):
    """What the scheduler needs from a tokenizer (tests use a tiny fake)."""

    @property
    def vocab_size(self) -> int: ...

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def render_chat(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> str: ...


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """The chat-template inputs a request may set (vLLM's defaults)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    tools: list[Any] | None = None
    documents: list[Any] | None = None
    chat_template: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten list-of-parts content into a string, as vLLM does for string-content templates."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            texts = [
                part.get("text", "") if isinstance(part, dict) else str(part)
                for part in content
                if not isinstance(part, dict) or part.get("type", "text") == "text"
            ]
            msg = {**msg, "content": "\n".join(texts)}
        elif content is None:
            msg = {**msg, "content": ""}
        out.append(msg)
    return out


def encode_chat(tokenizer: PromptTokenizer, messages: Sequence[dict[str, Any]],
                options: ChatOptions) -> list[int]:  # fmt: skip
    text = tokenizer.render_chat(messages, options)
    return tokenizer.encode_text(text, options.add_special_tokens)


class HFPromptTokenizer:
    """The model's own tokenizer (transformers ``AutoTokenizer`` from the model directory).

    Encoding goes straight to the Rust ``tokenizers.Tokenizer`` when there is one: it returns
    the same ids as ``tokenizer(text)`` (same post-processor) without building a BatchEncoding,
    which is most of the cost for short prompts. ``Tokenizer.encode`` holds the GIL throughout
    (about 1.5 us per token here), while ``encode_batch`` releases it: long prompts use the
    latter, so tokenizing them in a worker thread really leaves the event loop free.
    """

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer  # heavy; only the live service needs it

        self._hf = AutoTokenizer.from_pretrained(str(model_dir))
        self._fast = getattr(self._hf, "_tokenizer", None)
        if self._fast is not None and not hasattr(self._fast, "encode"):
            self._fast = None
        self._vocab_size = len(self._hf)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._fast is not None:
            if len(text) > LONG_PROMPT_CHARS:
                return self._fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> str:
        kwargs: dict[str, Any] = dict(options.template_kwargs)
        if options.documents is not None:
            kwargs["documents"] = options.documents
        rendered = self._hf.apply_chat_template(
            normalize_messages(messages),
            tools=options.tools,
            chat_template=options.chat_template,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            tokenize=False,
            **kwargs,
        )
        if not isinstance(rendered, str):
            raise TypeError(f"chat template rendered {type(rendered).__name__}, not text")
        return rendered
