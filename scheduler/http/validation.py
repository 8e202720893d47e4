"""Request parsing and validation for the two generation endpoints.

Checks only what the scheduler must know to route (prompt, model, output budget, streaming) and
what would otherwise turn into an engine 500; every other field is forwarded to vLLM untouched,
which validates it and answers 400 itself. Each problem raises an ``ApiError`` (OpenAI format).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec

from scheduler.http import errors
from scheduler.http.errors import ApiError
from scheduler.dispatch.tokenization import ChatOptions

_decode = msgspec.json.decode
# vLLM's CompletionRequest.max_tokens default; chat has none (it fills the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/v1/completions" if self is Endpoint.COMPLETIONS else "/v1/chat/completions"


@dataclass(slots=True)
class GenerationRequest:
    """A validated request. Exactly one of ``prompt_text``, ``prompt_ids``, ``messages`` is set
    (until tokenization fills ``prompt_ids``)."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None  # output budget the engine will use; None: fill the context (chat)
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    add_special_tokens: bool = True
    messages: list[dict[str, Any]] | None = None
    chat_options: ChatOptions | None = None

    @property
    def prompt_param(self) -> str:
        return "messages" if self.endpoint is Endpoint.CHAT else "prompt"


def decode_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise errors.invalid_json("empty body")
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise errors.invalid_json(str(exc)) from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_type",
                       kind="invalid_request")  # fmt: skip
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise errors.invalid_field(key, f"'{key}' must be a boolean, got {type(value).__name__}")
    return value


def _opt_positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise errors.invalid_field(key, f"'{key}' must be a positive integer, got {value!r}")
    return value


def _token_ids(value: list[Any], param: str, vocab_size: int) -> list[int]:
    for tok in value:
        if not _is_int(tok) or tok < 0 or tok >= vocab_size:
            raise errors.invalid_field(
                param, f"'{param}' token id {tok!r} is not an integer in [0, {vocab_size})"
            )
    return value


def _common(body: dict[str, Any], served_model: str) -> tuple[str, bool]:
    model = body.get("model")
    if model is None:
        model = served_model  # vLLM accepts a missing model and serves its own
    elif not isinstance(model, str):
        raise errors.invalid_field("model", "'model' must be a string")
    elif model != served_model:
        raise errors.model_not_found(model, served_model)
    stream = _opt_bool(body, "stream", False)
    n = body.get("n")
    if n is not None and n != 1:
        # One prefill hands one KV cache to one decode; several samples would each need it.
        raise errors.invalid_field("n", "only n=1 is supported by the P/D scheduler")
    return model, stream


def parse_completion(body: dict[str, Any], served_model: str, vocab_size: int) -> GenerationRequest:
    model, stream = _common(body, served_model)
    if "prompt" not in body or body["prompt"] is None:
        raise errors.missing_field("prompt")
    prompt = body["prompt"]
    # A batch of one (["text"] or [[ids]]) is unwrapped; real batches cannot share one P/D pair.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    max_tokens = _opt_positive_int(body, "max_tokens")
    req = GenerationRequest(
        endpoint=Endpoint.COMPLETIONS,
        body=body,
        model=model,
        stream=stream,
        max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        add_special_tokens=_opt_bool(body, "add_special_tokens", True),
    )
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and not any(isinstance(p, (str, list)) for p in prompt):
        req.prompt_ids = _token_ids(prompt, "prompt", vocab_size)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise errors.invalid_field("prompt", "batched prompts are not supported; send one prompt")
    else:
        raise errors.invalid_field(
            "prompt", "'prompt' must be a non-empty string or a non-empty list of token ids"
        )
    return req


def _chat_options(body: dict[str, Any]) -> ChatOptions:
    gen_prompt = _opt_bool(body, "add_generation_prompt", True)
    cont = _opt_bool(body, "continue_final_message", False)
    if gen_prompt and cont and "add_generation_prompt" in body:
        raise errors.invalid_field(
            "continue_final_message",
            "cannot set both continue_final_message and add_generation_prompt",
        )
    if cont:
        gen_prompt = False  # vLLM: continuing the final message implies no generation prompt
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise errors.invalid_field("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    template = body.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise errors.invalid_field("chat_template", "'chat_template' must be a string")
    tools, documents = body.get("tools"), body.get("documents")
    for key, value in (("tools", tools), ("documents", documents)):
        if value is not None and not isinstance(value, list):
            raise errors.invalid_field(key, f"'{key}' must be a list")
    return ChatOptions(
        add_generation_prompt=gen_prompt,
        continue_final_message=cont,
        add_special_tokens=_opt_bool(body, "add_special_tokens", False),
        tools=tools,
        documents=documents,
        chat_template=template,
        template_kwargs=kwargs or {},
    )


def parse_chat(body: dict[str, Any], served_model: str) -> GenerationRequest:
    model, stream = _common(body, served_model)
    messages = body.get("messages")
    if messages is None:
        raise errors.missing_field("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.invalid_field("messages", "'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise errors.invalid_field(
                f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'"
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise errors.invalid_field(
                f"messages[{i}].content", f"messages[{i}].content must be a string or a list"
            )
    max_completion = _opt_positive_int(body, "max_completion_tokens")
    max_tokens = _opt_positive_int(body, "max_tokens")
    return GenerationRequest(
        endpoint=Endpoint.CHAT,
        body=body,
        model=model,
        stream=stream,
        max_tokens=max_completion if max_completion is not None else max_tokens,
        messages=messages,
        chat_options=_chat_options(body),
    )


def check_context(req: GenerationRequest, max_model_len: int) -> None:
    """Reject what vLLM would reject for length, before any engine time is spent."""
    n_prompt = len(req.prompt_ids or ())
    if n_prompt == 0:
        raise errors.invalid_field(req.prompt_param, "the prompt is empty after tokenization")
    # With no explicit budget the engine needs room for at least one output token.
    budget = req.max_tokens if req.max_tokens is not None else 1
    if n_prompt + budget > max_model_len:
        raise errors.context_length_exceeded(n_prompt, budget, max_model_len, req.prompt_param)
