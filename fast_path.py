"""The common recommendation request answered below the web framework: a plain ASGI middleware.

Why: a recommendation's model work is ~0.15-0.3 ms of CPU, and FastAPI's handling of the same request
(route matching, the dependency solver validating three query parameters through pydantic, the Request
and Response objects, the exception middleware) cost about as much again on top of the framework floor
that `/health/live` measures. For the request that memory alone answers (a well-formed query string, a
user the state holds, every post text in memory) the middleware parses the query, asks the same
function the endpoint asks (`app.memory_answer`) and sends the same bytes with the same headers.
Anything else (a missing, malformed, repeated or unknown parameter, a value out of range, an unknown
user, texts not in memory, no model) goes on to FastAPI unchanged, which answers it as before (the
422/404/503 messages, the database path). A test holds the two paths' answers byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Receive, Scope, Send

from times import parse_time

# (the app's state, user id, time in seconds, limit) -> the JSON body, or None: let the endpoint answer
Answer = Callable[[object, int, int, int], bytes | None]
_NAMES = (b"id", b"time", b"limit")


@dataclass(frozen=True)
class _Route:
    path: str


class FastRecommendations:
    """Serves GET `paths` itself when `answer` can, passes every other request on."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: tuple[str, ...],
        answer: Answer,
        max_id: int,
        max_limit: int,
        default_limit: int,
    ) -> None:
        self.app, self.paths, self.answer = app, frozenset(paths), answer
        self.route = _Route(
            paths[0] if paths else ""
        )  # what the metrics middleware outside reads as the route template
        self.max_id, self.max_limit, self.default_limit = max_id, max_limit, default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in self.paths:
            query = self.parse(scope["query_string"])
            body = None if query is None else self.answer(scope["app"].state, *query)
            if body is not None:
                scope["route"] = self.route
                # what starlette's Response(body, media_type="application/json") sends, in its order
                headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def parse(self, query_string: bytes) -> tuple[int, int, int] | None:
        """(id, time in seconds, limit) when the query string is exactly id, time and optionally limit,
        each once, with values FastAPI would accept unchanged; None for anything else (FastAPI then
        decides, with its own messages)."""
        values: dict[bytes, bytes] = {}
        for part in query_string.split(b"&"):
            name, equals, value = part.partition(b"=")
            if not equals or name not in _NAMES or name in values:
                return None
            values[name] = value
        id_text, limit_text = values.get(b"id", b""), values.get(b"limit")
        # plain ASCII digits only: no sign, space, decimal point or other form left to pydantic's rules
        if not (id_text.isdigit() and len(id_text) <= 10) or b"time" not in values:
            return None
        if limit_text is not None and not (limit_text.isdigit() and len(limit_text) <= 3):
            return None
        user_id = int(id_text)
        limit = self.default_limit if limit_text is None else int(limit_text)
        if user_id > self.max_id or not 1 <= limit <= self.max_limit:
            return None
        try:  # decoded as starlette decodes a query string (latin-1 bytes, then %-escapes as UTF-8)
            moment = parse_time(unquote_plus(values[b"time"].decode("latin-1"), errors="replace"))
        except ValueError:
            return None
        return user_id, moment, limit
