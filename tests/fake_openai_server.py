"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1, for tests of the dataset builder.

It answers `POST /v1/chat/completions` like the real API (JSON body with `choices` and `usage`). What it does for a
request is chosen by a script: `rules` maps a marker substring of the user message to a list of behaviours, consumed
in order on each matching request (the last one repeats), so a test says e.g. "the prompt containing `p3` gets a 429,
then a 500, then a normal answer" independently of request order under concurrency. Requests matching no rule get
`default`. Behaviours:

    ok         a rewrite: "safe rendition of <prompt>"
    429        HTTP 429 with `Retry-After: <retry_after>`
    500        HTTP 500 with an OpenAI-style error body
    400        HTTP 400 (e.g. the provider's own content filter refusing the prompt)
    401        HTTP 401 (bad key)
    401echo    HTTP 401 whose message quotes the key it was sent (some providers do)
    slow       sleeps `slow_s` (longer than the client timeout), then answers ok
    malformed  HTTP 200, content-type application/json, a body that is not JSON
    drop       closes the connection without any response
    refusal    "I'm sorry, but I can't help with that request."
    echo       the prompt itself, unchanged
    empty      an empty message
    long       a 5000-character message
    junk       a chatty multi-line answer with quotes around the rewrite
    filtered   finish_reason "content_filter" with empty content
    keyleak_500, keyleak_400   HTTP 500 / 400 whose error message quotes the request's Authorization header back (a
               misbehaving proxy): what the client reports must not show the key

Every request is logged (time, marker-free prompt, behaviour) so tests can count attempts per prompt.

It also answers `POST /v1/images/generations` (the evaluation's black-box mode) with `n` small PNGs as b64_json, of
the requested size, each a solid colour derived from the prompt; the same rules apply to the request's `prompt`
(the error behaviours as above; "400" is the provider's safety system refusing the prompt).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SAFE_PREFIX = "safe rendition of "


def prompt_of(user_message: str) -> str:
    """The toxic prompt inside the builder's user message: its last line (the template puts it there)."""
    return user_message.strip().splitlines()[-1].strip()


def fake_png(prompt: str, k: int, size: str) -> str:
    """A base64 PNG of `size` ("WxH"), one solid colour per (prompt, k)."""
    import base64
    import io
    import zlib

    from PIL import Image

    w, h = (int(v) for v in size.split("x"))
    seed = zlib.crc32(f"{prompt}|{k}".encode())
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class FakeOpenAI:
    def __init__(self, *, default: str = "ok", delay_s: float = 0.0, slow_s: float = 1.5, retry_after: str = "1"):
        self.rules: dict[str, list[str]] = {}
        self.default = default
        self.delay_s = delay_s  # added to every answer: keeps a run long enough to interrupt it mid-way
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.log: list[dict] = []  # {"t", "prompt", "behaviour", "auth", "model", "temperature", "max_tokens"}
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests handled at the same time
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- script -----------------------------------------------------------------------------------------------
    def script(self, rules: dict[str, list[str]]) -> None:
        with self._lock:
            self.rules = {k: list(v) for k, v in rules.items()}

    def _behaviour_for(self, user_message: str) -> str:
        with self._lock:
            for marker, behaviours in self.rules.items():
                if marker in user_message:
                    return behaviours.pop(0) if len(behaviours) > 1 else behaviours[0]
            return self.default

    def attempts(self, marker: str) -> list[dict]:
        with self._lock:
            return [r for r in self.log if marker in r["prompt"]]

    # --- lifecycle --------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._handle()
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _handle(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/images/generations"):
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                try:
                    body = json.loads(raw)
                    if route == "/v1/images/generations":
                        user = body["prompt"]
                        images = (int(body.get("n") or 1), str(body.get("size") or "64x64"))
                    else:
                        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                        images = None
                except (ValueError, KeyError, IndexError, TypeError):
                    return self._send(400, {"error": {"message": "bad request body", "type": "invalid_request"}})
                prompt = user if images else prompt_of(user)
                behaviour = fake._behaviour_for(user)
                with fake._lock:
                    fake.log.append({"t": time.monotonic(), "prompt": prompt, "behaviour": behaviour,
                                     "auth": self.headers.get("authorization"), "model": body.get("model"),
                                     "temperature": body.get("temperature"), "max_tokens": body.get("max_tokens"),
                                     "system": [m["content"] for m in body.get("messages", [])
                                                if m["role"] == "system"],
                                     "n": body.get("n"), "size": body.get("size")})
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                self._act(behaviour, prompt, body.get("model", "?"), images)

            def _act(self, behaviour: str, prompt: str, model: str, images: tuple[int, str] | None = None):
                if behaviour == "429":
                    return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                      {"Retry-After": fake.retry_after})
                if behaviour == "500":
                    return self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                if behaviour == "400":
                    return self._send(400, {"error": {"message": "Your request was rejected by the safety system",
                                                      "type": "invalid_request_error",
                                                      "code": "content_policy_violation"}})
                if behaviour.startswith("keyleak_"):
                    return self._send(int(behaviour[-3:]), {"error": {
                        "message": f"upstream refused Authorization: {self.headers.get('authorization')}",
                        "type": "server_error"}})
                if behaviour == "401":
                    return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "auth"}})
                if behaviour == "401echo":
                    key = (self.headers.get("authorization") or "").split(" ", 1)[-1]
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                                      "type": "auth"}})
                if behaviour == "malformed":
                    return self._send_raw(200, b'{"id": "chatcmpl-x", "choices": [ {"mess', "application/json")
                if behaviour == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if behaviour == "slow":
                    time.sleep(fake.slow_s)
                if images is not None:
                    return self._send(200, {"created": int(time.time()),
                                            "data": [{"b64_json": fake_png(prompt, k, images[1])}
                                                     for k in range(images[0])]})
                finish = "stop"
                content = {
                    "ok": SAFE_PREFIX + prompt, "slow": SAFE_PREFIX + prompt,
                    "refusal": "I'm sorry, but I can't help with that request.",
                    "echo": prompt, "empty": "", "long": "x" * 5000,
                    "junk": f'Sure! Here is the rewritten prompt:\n\n"{SAFE_PREFIX}{prompt}"\n\n'
                            "Note: I removed the violent elements.",
                    "filtered": "",
                }[behaviour]
                if behaviour == "filtered":
                    finish = "content_filter"
                prompt_tokens, completion_tokens = 40 + len(prompt) // 4, max(1, len(content) // 4)
                self._send(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                })

            def _send(self, status: int, obj: dict, headers: dict | None = None):
                self._send_raw(status, json.dumps(obj).encode(), "application/json", headers)

            def _send_raw(self, status: int, data: bytes, ctype: str, headers: dict | None = None):
                try:
                    self.send_response(status)
                    self.send_header("content-type", ctype)
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and went away
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
