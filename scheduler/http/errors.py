"""OpenAI-format errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the scheduler reports to a client goes through ``ApiError`` so bad input is always
a 4xx with a machine-readable ``code`` (never a 500), and every error is counted by ``kind`` in
the Prometheus metrics.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_encode = msgspec.json.encode

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


class ApiError(Exception):
    """An error answered to the client. ``kind`` is the metrics label (stable, low cardinality)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self) -> bytes:
        return _encode(self.body())

    def to_response(self) -> web.Response:
        return web.Response(
            body=self.to_bytes(), status=self.status, content_type="application/json"
        )


def invalid_json(detail: str) -> ApiError:
    return ApiError(400, f"request body is not valid JSON: {detail}", code="invalid_json",
                    kind="invalid_json")  # fmt: skip


def invalid_field(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value", kind="invalid_request")


def missing_field(param: str) -> ApiError:
    return ApiError(400, f"'{param}' is a required property", param=param,
                    code="missing_required_parameter", kind="missing_field")  # fmt: skip


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist. This server serves `{served}`.",
        type=NOT_FOUND,
        param="model",
        code="model_not_found",
        kind="model_not_found",
    )


def context_length_exceeded(
    prompt_tokens: int, max_tokens: int, max_model_len: int, param: str
) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
        f"the completion). Please reduce the prompt or max_tokens.",
        param=param,
        code="context_length_exceeded",
        kind="context_length_exceeded",
    )


def payload_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds the {limit}-byte limit",
                    code="request_too_large", kind="payload_too_large")  # fmt: skip


def no_instance(role: str) -> ApiError:
    return ApiError(503, f"no healthy {role} instance is available", type=UNAVAILABLE,
                    code="no_instance", kind=f"no_{role}_instance")  # fmt: skip


def upstream_failure(role: str, instance: str, detail: str) -> ApiError:
    return ApiError(502, f"{role} instance {instance} failed: {detail}", type=SERVER_ERROR,
                    code="upstream_error", kind=f"upstream_{role}")  # fmt: skip


def upstream_timeout(role: str, instance: str) -> ApiError:
    return ApiError(504, f"{role} instance {instance} did not answer in time", type=SERVER_ERROR,
                    code="upstream_timeout", kind=f"timeout_{role}")  # fmt: skip


def from_upstream(role: str, status: int, raw: bytes) -> ApiError:
    """Re-shape an engine's error reply (vLLM uses both ``{"error": {...}}`` and the older
    ``{"object": "error", "message": ...}``) into our format, keeping the engine's status: a 400
    from vLLM means the request itself is bad, and the client should see that."""
    message, err_type, param = raw.decode("utf-8", "replace")[:2000], None, None
    try:
        parsed = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error") if isinstance(parsed.get("error"), dict) else parsed
        message = str(inner.get("message", message))
        err_type = inner.get("type") if isinstance(inner.get("type"), str) else None
        param = inner.get("param") if isinstance(inner.get("param"), str) else None
    if 400 <= status < 500:
        return ApiError(status, message, type=INVALID_REQUEST, param=param,
                        code=err_type or "invalid_request", kind=f"rejected_by_{role}")  # fmt: skip
    return ApiError(502, f"{role} engine error ({status}): {message}", type=SERVER_ERROR,
                    code="upstream_error", kind=f"upstream_{role}")  # fmt: skip
