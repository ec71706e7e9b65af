"""Request bodies: bytes -> UTF-8 -> JSON -> a validated model, every failure a 4xx APIError naming what was wrong
(a non-UTF-8 byte and its offset, the JSON syntax error and its position, the field and what it should be)."""
from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posi_jax.serving.errors import APIError

MAX_BODY_BYTES = 1 << 20  # a request holds prompts, not images: 1 MiB is generous

T = TypeVar("T", bound=BaseModel)


class RewriteRequest(BaseModel):
    """`POST /v1/rewrite`. The sampling fields override the server's defaults; the result must be one of the
    sampling settings the server compiled at start-up (GET /healthz lists them)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompts: list[str]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    greedy: bool | None = None
    max_new_tokens: int | None = None

    def sampling_overrides(self) -> dict:
        names = ("temperature", "top_p", "top_k", "greedy", "max_new_tokens")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class ImagesRequest(BaseModel):
    """`POST /v1/images/generations`, OpenAI's request. Fields we do not read (quality, style, user, ...) are kept
    and forwarded to an upstream images API."""

    model_config = ConfigDict(extra="allow", strict=True)
    prompt: str
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=10)] | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None


async def read_json(request, model: type[T], max_bytes: int = MAX_BODY_BYTES) -> T:
    """The request body parsed into `model`; 413 over `max_bytes`, 400 for anything else that is not that object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return parse_body(b"".join(chunks), model)


def parse_body(raw: bytes, model: type[T]) -> T:
    if not raw.strip():
        raise APIError(400, "empty request body: expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                       code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(data)}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _field_error(e, model) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes",
                    code="request_too_large")


def _field_error(error: ValidationError, model: type[BaseModel]) -> APIError:
    first = error.errors(include_url=False)[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                    for i, p in enumerate(first["loc"]))
    kind = first["type"]
    if kind == "missing":
        message = f"missing required field '{param}'"
    elif kind == "extra_forbidden":
        message = f"unknown field '{param}'; valid fields: {', '.join(model.model_fields)}"
    else:
        message = f"'{param}': {first['msg'][0].lower()}{first['msg'][1:]}, got {_json_type(first.get('input'))}"
    return APIError(400, message, param=param or None, code="invalid_value")


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__
