"""What every request passes before any route: HTTP Basic auth and the body-size limit (an ASGI middleware).

With ``--api-auth`` every route, the API docs included, needs one of the user:password pairs (401
otherwise); each pair is compared in constant time (``secrets.compare_digest``), all of them every
time, so the answer's timing tells nothing about which part was wrong. A body over the limit is a 413
before any handler reads it, whether the client sent a Content-Length or streamed it in chunks.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets

BODY_METHODS = (b"POST", b"PUT", b"PATCH")


class Guard:
    def __init__(self, app, credentials: tuple[tuple[str, str], ...], max_body_bytes: int):
        self.app = app
        self.credentials = [(user.encode(), password.encode()) for user, password in credentials]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.credentials and not self.authorized(headers.get(b"authorization", b"")):
            return await answer(send, 401, "Not authenticated: this server needs HTTP Basic auth (--api-auth)",
                                [(b"www-authenticate", b'Basic realm="ldm"')])
        if scope["method"].encode() not in BODY_METHODS:
            return await self.app(scope, receive, send)
        body = await self.read_body(headers, receive)
        if body is None:
            return await answer(send, 413, f"the request body is over this server's limit of {self.max_body_bytes} bytes")
        return await self.app(scope, replay(body, receive), send)

    def authorized(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        matched = False
        for known_user, known_password in self.credentials:  # no early exit: the same work for every answer
            same = secrets.compare_digest(user, known_user) & secrets.compare_digest(password, known_password)
            matched |= same and bool(sep)
        return matched

    async def read_body(self, headers: dict[bytes, bytes], receive) -> bytes | None:
        """The whole body, or None as soon as it is over the limit."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that gives ``body`` once, then what the client sends next (its disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def answer(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    content = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": content})
