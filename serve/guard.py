"""The HTTP guard in front of every route of the endpoint: the API key, the body's type and size, admission.

It runs as pure ASGI middleware before FastAPI parses anything, in ray.serve.llm's ingress (`openai` shape) or in the
engine replica's vLLM app (`direct` shape); see serve/app.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from serve.config import AuthSection

VERSION_HEADER = "x-rayloop-model-version"


def stamp_events(text: str, version: str) -> str:
    """Server-sent events (`data: {...}\n\n`) with `system_fingerprint` set to `version` in each JSON event;
    anything else (`[DONE]`, a partial event) as it was."""
    out = []
    for event in text.split("\n\n"):
        if event.startswith("data: {"):
            try:
                data = json.loads(event[len("data: "):])
                data["system_fingerprint"] = version
                event = "data: " + json.dumps(data, separators=(",", ":"))
            except ValueError:
                pass
        out.append(event)
    return "\n\n".join(out)


def read_api_key(auth: AuthSection) -> str | None:
    """The key from `auth.api_key_file`, else from the environment; None if neither has one."""
    if auth.api_key_file:
        path = Path(auth.api_key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"auth.api_key_file: no such file {auth.api_key_file!r}")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"auth.api_key_file: {auth.api_key_file!r} is empty")
        return key
    return os.environ.get(auth.api_key_env, "").strip() or None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def openai_error(status: int, message: str, type_: str, code: str | None = None):
    """A JSON response in OpenAI's error shape."""
    from starlette.responses import JSONResponse

    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": None, "code": code}})


class GuardMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer streams): API key, JSON content type, body size, all
    before the body is parsed; and, where it is given `max_in_flight`, admission (503 beyond it).
    /health stays open so load balancers and Serve's own probes need no key."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, key_sha256: str | None, max_request_bytes: int, max_in_flight: int | None = None,
                 model_version: str | None = None):
        """`model_version`: named by every response (header and `system_fingerprint`), where the guard runs in the
        engine replica itself and vLLM's own app writes the body."""
        self.app, self.key_sha256, self.max_request_bytes = app, key_sha256, max_request_bytes
        self.max_in_flight, self.in_flight = max_in_flight, 0
        self.model_version = model_version

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.model_version:
            send = self._stamping(send)
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key_sha256 is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = key_digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
            if not hmac.compare_digest(given, self.key_sha256):
                response = openai_error(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                                        "invalid_request_error", "invalid_api_key")
                return await response(scope, receive, send)
        media_type = headers.get("content-type", "").split(";")[0].strip()
        if scope.get("method") == "POST" and media_type != "application/json":
            response = openai_error(415, "Send the request body as JSON (Content-Type: application/json).",
                                    "invalid_request_error", "unsupported_media_type")
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > self.max_request_bytes):
            response = openai_error(413, f"Request body over {self.max_request_bytes} bytes.",
                                    "invalid_request_error", "request_too_large")
            return await response(scope, receive, send)
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # A chunked body has no length up front: read it here, at most the cap, and replay it.
            chunks, seen = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                if seen > self.max_request_bytes:
                    response = openai_error(413, f"Request body over {self.max_request_bytes} bytes.",
                                            "invalid_request_error", "request_too_large")
                    return await response(scope, receive, send)
                if not message.get("more_body"):
                    break
            receive = self._replay(b"".join(chunks), receive)
        if self.max_in_flight is None:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            response = openai_error(503, "The model is at capacity (its queue is full); retry shortly.",
                                    "server_overloaded", "overloaded")
            response.headers["Retry-After"] = "1"
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _stamping(self, send):
        """`send` with the model version added: a header on every response, `system_fingerprint` in completion
        bodies (a JSON body is held until complete, to fix its length; a stream is stamped event by event)."""
        version, start, body, kind, pending = self.model_version, None, [], None, b""

        async def send_stamped(message):
            nonlocal start, kind, pending
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (VERSION_HEADER.encode(), version.encode("latin-1"))]
                media = dict(headers).get(b"content-type", b"").split(b";")[0].strip()
                kind = {b"application/json": "json", b"text/event-stream": "events"}.get(media)
                start = {**message, "headers": headers}
                if kind != "json":
                    await send(start)
                return
            if message["type"] == "http.response.body" and kind == "json":
                body.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                raw = b"".join(body)
                try:
                    data = json.loads(raw)
                    if isinstance(data, dict) and "choices" in data:
                        data["system_fingerprint"] = version
                        raw = json.dumps(data, separators=(",", ":")).encode()
                except ValueError:
                    pass
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(raw)).encode())]})
                message = {"type": "http.response.body", "body": raw, "more_body": False}
            elif message["type"] == "http.response.body" and kind == "events":
                # Whole events only: one may arrive split across messages (and a character across bytes).
                pending += message.get("body", b"")
                more = message.get("more_body", False)
                end = pending.rfind(b"\n\n")
                if more and end < 0:
                    return
                cut = end + 2 if more else len(pending)
                ready, pending = pending[:cut], pending[cut:]
                message = {**message, "body": stamp_events(ready.decode(), version).encode()}
            await send(message)

        return send_stamped

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
