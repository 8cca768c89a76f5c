"""What stands between the network and the search service: ASGI middleware and bounded errors.

    HostAllowList    a Host header not on the list gets a 400 (DNS rebinding reaches a
                     loopback server only under a foreign name)
    BodyLimit        a body over its route's limit gets a 413, before anything buffers it
    SecurityHeaders  nosniff, no framing and a Content-Security-Policy on every answer
    validation_error a RequestValidationError as a short JSON body, however many errors it holds

Every refusal is `{"detail": "<one line saying what to do>"}` and stays well under 4 KB:
whatever the client sent is clipped before it is echoed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The page at "/" loads its script and style from this server and shows uploads through
# blob: URLs; nothing else may run, load or frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
]
SHOWN_ERRORS = 5  # validation errors listed in full; the rest are counted
ANY_HOST = "*"


def clip(text: object, limit: int = 80) -> str:
    """`text` as one printable line of at most `limit` characters (client input, before echoing it)."""
    s = str(text)
    s = s if s.isprintable() else s.encode("unicode_escape", "backslashreplace").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------- Host allow-list


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets, case or a trailing dot."""
    value = header.strip()
    if value.startswith("["):  # [::1]:8000
        value = value[1 : value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:  # name:port (several colons: a bare IPv6 address)
        value = value.split(":")[0]
    return value.lower().rstrip(".")


class HostAllowList:
    """ASGI middleware: answer only requests whose Host names this server.

    A page on another site can make a browser resolve its own name to 127.0.0.1 (DNS
    rebinding) and then read this server's answers as same-origin; its requests still carry
    that foreign name in Host, which is refused here. `*` in `allowed` turns the check off
    (for a proxy in front that checks Host itself).
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str]):
        self.app = app
        self.allowed = frozenset(host_name(h) if h != ANY_HOST else h for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or ANY_HOST in self.allowed:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        if header is not None and host_name(header) in self.allowed:
            await self.app(scope, receive, send)
            return
        await JSONResponse({"detail": self.refusal(header)}, status_code=400)(scope, receive, send)

    def refusal(self, header: str | None) -> str:
        names = sorted(self.allowed)
        served = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        if header is None:
            return f"the request has no Host header; this server answers to {served}"
        name = clip(host_name(header), 64)
        return (f"Host {name!r} is not served here (this server answers to {served}); if that name is "
                f"this server's, restart `embedder serve` with --allowed-host {name}")


# ---------------------------------------------------------------- body limits


class BodyTooLarge(HTTPException):
    """A 413; `BodyLimit` raises it while reading, and answers with it if nothing else did."""

    def __init__(self, detail: str):
        super().__init__(status_code=413, detail=detail)


@dataclass(frozen=True)
class Limit:
    max_bytes: int
    refuse: Callable[[str], BodyTooLarge]  # "the request declares N bytes" -> the 413 to answer


class BodyLimit:
    """ASGI middleware: refuse request bodies over their route's limit, before anything buffers them.

    A Content-Length over the limit is answered 413 at once. Otherwise the bytes are counted
    as they arrive and reading stops with a 413 the moment the count passes the limit, so a
    client that sends no length (chunked) or a wrong one cannot make the multipart parser
    spool an arbitrarily large file to disk, nor the JSON parser hold one in memory.
    """

    def __init__(self, app: ASGIApp, default: Limit, by_path: dict[str, Limit]):
        self.app, self.default, self.by_path = app, default, by_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.by_path.get(scope["path"], self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit.max_bytes:
            await _error_response(limit.refuse(f"the request declares {declared} bytes"), scope, receive, send)
            return

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading as they are: a JSON 413.
                    raise limit.refuse(f"the request body passed {seen} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            # Normally the app's own exception handler has already answered 413; this is the
            # fallback for a refusal raised where no handler catches it.
            if started:
                raise
            await _error_response(exc, scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _error_response(exc: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
    # No "Connection: close" on purpose: on a keep-alive connection uvicorn then discards
    # (never buffers) the rest of the body, and the client reads this answer. Closing with
    # unread bytes in flight makes the kernel send a reset, and a client still uploading sees
    # "connection reset" instead of the message (as urllib, which itself asks for close, does
    # with a 2 MB upload).
    response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    await response(scope, receive, send)


# ---------------------------------------------------------------- headers


class SecurityHeaders:
    """ASGI middleware: add SECURITY_HEADERS to every answer that does not set them itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------- validation errors


def validation_error(errors: Sequence[dict]) -> dict:
    """A bounded answer for pydantic's error list: the first SHOWN_ERRORS, then a count.

    FastAPI's own answer repeats every error with the input it rejected, so a million bad
    list items came back as a 143 MB body; this one stays under 2 KB whatever was sent.
    """
    shown = [{"loc": [clip(part, 40) for part in e.get("loc", ())][:6], "msg": _message(e)}
             for e in errors[:SHOWN_ERRORS]]
    summary = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in shown)
    more = len(errors) - len(shown)
    detail = f"invalid request: {summary}" + (f" (and {more} more errors like these)" if more > 0 else "")
    return {"detail": detail, "errors": shown, "error_count": len(errors)}


def _message(error: dict) -> str:
    msg = str(error.get("msg", "invalid"))
    reason = (error.get("ctx") or {}).get("error")
    if error.get("type") == "json_invalid" and reason:
        msg = f"{msg} ({reason})"  # where the JSON broke, e.g. "Expecting value"
    return clip(msg, 160)

