"""The one shape of every error the service returns: OpenAI's error object `{"error": {"message", "type", "param",
"code"}}` with the HTTP status, so OpenAI-compatible clients show the message instead of failing to parse it."""
from __future__ import annotations


class APIError(Exception):
    """An error reply. `type` follows OpenAI's vocabulary: invalid_request_error for the caller's mistakes (4xx),
    server_error for ours or the upstream's (5xx)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None, reply: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param, self.code = param, code
        self.headers = dict(headers or {})
        self.reply = reply  # an upstream's own OpenAI-style error object, passed back as it came

    def body(self) -> dict:
        return self.reply if self.reply is not None else error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
