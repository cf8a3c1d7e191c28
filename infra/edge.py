"""The first thing every API request meets: credentials checked, the body
bounded in bytes and in JSON nesting -- before any byte of it is parsed, so an
anonymous 200 MB body costs a header read, not seconds and hundreds of MB.

An ASGI middleware, shared by both APIs; the routes still resolve the principal
themselves (verified tokens are cached, so the second check is a dict lookup)."""

from __future__ import annotations

import re

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra.auth import Authenticator, AuthError
from infra.problems import PROBLEM_JSON, Problem

# A JSON string (skipped whole) or a bracket; possessive, so no backtracking.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether brackets nest deeper than `limit` (strings are skipped, so a "[" in
    a title does not count). Invalid JSON is left to the parser to name."""
    depth = 0
    for match in _TOKENS.finditer(body):
        first = match.group()[0]
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif first in _CLOSE:
            depth -= 1
    return False


class RequestGuard:
    def __init__(self, app: ASGIApp, *, auth: Authenticator, max_body_bytes: int,
                 max_json_depth: int, protected_prefix: str = "/api/") -> None:
        self.app, self.auth = app, auth
        self.max_body, self.max_depth = max_body_bytes, max_json_depth
        self.prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self.auth.authenticate(headers.get("authorization"), headers.get("x-api-key"))
        except AuthError as exc:
            await _send(send, scope, Problem(
                401, "unauthenticated", "Authentication required", str(exc),
                headers={"www-authenticate": 'Bearer realm="ringiflow"'}))
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(send, scope)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._too_large(send, scope)
                return
            if not message.get("more_body", False):
                break
        if body and json_depth_exceeds(bytes(body), self.max_depth):
            await _send(send, scope, Problem(
                422, "validation_error", "Request is invalid",
                f"the JSON body nests deeper than {self.max_depth} levels; send the "
                "documented shape",
                errors=[{"field": "body", "in": "body", "type": "json_too_deep",
                         "message": f"nesting deeper than {self.max_depth}"}]))
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, send: Send, scope: Scope) -> None:
        await _send(send, scope, Problem(
            413, "payload_too_large", "Request body too large",
            f"request bodies are limited to {self.max_body} bytes (and need a valid "
            "Content-Length); documents are sent as metadata, not content",
            headers={"connection": "close"}))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only a disconnect can come

    return replayed


async def _send(send: Send, scope: Scope, problem: Problem) -> None:
    """The problem+json the exception handlers would answer, sent before any route."""
    body = orjson.dumps(problem.body(scope["path"]))
    raw = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
