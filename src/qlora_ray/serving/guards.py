"""Request guards for the HTTP ingress: what every request passes before a route sees it,
and the checks both APIs share.

- `Guards` (ASGI middleware): the Host header must name an allowed host (DNS rebinding), a
  request with an Origin header must come from an allowed origin (cross-site pages), a POST
  must say `Content-Type: application/json` (a cross-site form or `text/plain` POST cannot
  reach a route without a CORS preflight, which is never approved), and the body is limited
  before it is parsed: by Content-Length, and by counting the bytes as they arrive.
- `parse_json`: bytes -> JSON value, or a 400 for anything that is not strict JSON (invalid
  UTF-8, NaN/Infinity, overflowing numbers, integers past Python's digit limit, nesting deep
  enough to hit the recursion limit).
- `text_problem`: a text that is empty, invisible, unencodable (lone surrogates) or too long.
- `public` / `hide_paths`: listings and messages without local filesystem paths.
- `ApiError` and `SafeJSONResponse`: errors as values the routes raise, JSON that always encodes.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ApiError(Exception):
    """An HTTP error a route raises; the app renders it in its API's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.headers = headers or {}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def quote(value: object, limit: int = 80) -> str:
    """A client's value for an error message: ASCII-only (no lone surrogates), bounded."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# JSON in and out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, finite numbers only; every failure is a 400 ApiError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: invalid UTF-8 at byte {e.start}") from None
    if not text.strip():
        raise ApiError(400, "request body is not valid JSON: the body is empty")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, 1e999, integers past the digit limit
        reason = "a number is out of range" if "limit" in str(e) or "range" in str(e) else str(e)
        raise ApiError(400, f"request body is not valid JSON: {reason}") from None


def finite(value: Any) -> Any:
    """`value` with non-finite floats as None (a registry may record a NaN metric)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """Always encodes: NaN/Infinity become null, lone surrogates are escaped."""

    def render(self, content: Any) -> bytes:
        content = finite(content)
        try:
            return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Texts

# Characters Unicode files as letters or symbols that render as nothing.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")
# Not visible on their own: controls, formatting (zero-width, bidi), surrogates, private use,
# unassigned, separators (spaces), and combining marks with nothing to combine with.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})


def has_visible(text: str) -> bool:
    return any(ch not in _BLANK_LETTERS and unicodedata.category(ch) not in _INVISIBLE for ch in text)


def first_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate (JSON "\\ud800" decodes to one), else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


@dataclass
class TextProblem:
    kind: str  # "type", "empty", "surrogate", "too_long"
    message: str


def text_problem(text: object, where: str, max_chars: int) -> TextProblem | None:
    """What is wrong with a text a client sent, or None. `where` names it: "text[1]"."""
    if not isinstance(text, str):
        return TextProblem("type", f"{where} must be a string")
    if len(text) > max_chars:
        return TextProblem("too_long", f"{where} has {len(text)} characters; the limit is {max_chars}")
    pos = first_surrogate(text)
    if pos is not None:
        return TextProblem("surrogate", f"{where} contains an unpaired surrogate ({quote(text[pos])} at "
                                        f"position {pos}), which cannot be encoded as UTF-8")
    if not has_visible(text):
        return TextProblem("empty", f"{where} is empty (no visible characters)")
    return None


# ---------------------------------------------------------------------------------------------
# Paths

_PATH_LIKE = re.compile(r"^(?:/|~/|\./|\.\./|file://|[A-Za-z]:[\\/])")
# An absolute path inside a message: at least two components, not part of a URL, not one of this server's
# routes (/v1/...), which messages name to say where to go instead.
_EMBEDDED_PATH = re.compile(r"(?<![\w/.:~-])(?:~|file://)?/(?!v1/)(?:[^\s'\"/]+/)+[^\s'\",;:)\]}]*")


def last_component(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path.rstrip("\\/")) if p]
    return parts[-1] if parts else path


def hide_paths(text: str) -> str:
    """`text` with each absolute filesystem path replaced by its last component."""
    if _PATH_LIKE.match(text) and not any(c.isspace() for c in text):
        return last_component(text)
    return _EMBEDDED_PATH.sub(lambda m: last_component(m.group(0)), text)


def public(value: Any, show_paths: bool) -> Any:
    """A listing for clients: strings that are (or contain) local paths cut to their last part."""
    if show_paths:
        return value
    if isinstance(value, str):
        return hide_paths(value)
    if isinstance(value, dict):
        return {k: public(v, show_paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v, show_paths) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Host, Origin, Content-Type, body size


def _split(csv: str | Iterable[str]) -> tuple[str, ...]:
    items = csv.split(",") if isinstance(csv, str) else csv
    return tuple(i.strip().lower() for i in items if i.strip())


def host_name(host_header: str) -> str | None:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'; None when malformed."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not re.fullmatch(r":\d{1,5}", host[end + 1:])):
            return None
        return host[1:end]
    name, sep, port = host.partition(":")
    if sep and not re.fullmatch(r"\d{1,5}", port):
        return None
    name = name.rstrip(".")
    return name or None


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Any port; entries are names ("localhost", "[::1]", "*.example.com") or "*" for any host."""
    if "*" in allowed:
        return True
    if not host_header:
        return False
    name = host_name(host_header)
    if name is None:
        return False
    for entry in allowed:
        entry = host_name(entry) or entry
        if name == entry or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Exact scheme://host[:port] matches (case-insensitive), or "*" for any origin."""
    return "*" in allowed or origin.strip().lower().rstrip("/") in {a.rstrip("/") for a in allowed}


def is_json_content_type(value: str | None) -> bool:
    """application/json, with no charset or charset=utf-8."""
    if not value:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


@dataclass(frozen=True)
class GuardConfig:
    allowed_hosts: tuple[str, ...]
    allowed_origins: tuple[str, ...]
    max_body_bytes: int

    @classmethod
    def from_settings(cls, settings) -> GuardConfig:
        return cls(_split(settings.allowed_hosts), _split(settings.allowed_origins), settings.max_body_bytes)


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Guards:
    """ASGI middleware: Host, Origin, Content-Type and body size, before any route runs.

    `config()` returns the GuardConfig (read per request, so a replica can supply its own);
    `render(path, error)` turns an ApiError into the response shape of the API at `path`.
    """

    def __init__(self, app, *, config: Callable[[], GuardConfig], render: Callable[[str, ApiError], Response]):
        self.app, self.config, self.render = app, config, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.config()
        path = route_path(scope)
        headers = _headers(scope)
        error = self.check(scope["method"], headers, config)
        if error is not None:
            await self.render(path, error)(scope, receive, send)
            return

        limit, received, started = config.max_body_bytes, 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except ApiError as e:  # the body limit, raised where no route's handler caught it
            if started:
                raise
            await self.render(path, e)(scope, receive, send)

    @staticmethod
    def check(method: str, headers: dict[str, str], config: GuardConfig) -> ApiError | None:
        if not host_allowed(headers.get("host"), config.allowed_hosts):
            return ApiError(400, f"Host {quote(headers.get('host', ''))} is not allowed "
                                 "(serve setting allowed_hosts)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, config.allowed_origins):
            return ApiError(403, f"Origin {quote(origin)} is not allowed (serve setting allowed_origins)",
                            code="origin_not_allowed")
        if method in BODY_METHODS:
            if not is_json_content_type(headers.get("content-type")):
                return ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None:
                if not re.fullmatch(r"\d{1,20}", length.strip()):
                    return ApiError(400, "invalid Content-Length header")
                if int(length) > config.max_body_bytes:
                    return too_large(config.max_body_bytes)
        return None


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")


def route_path(scope: Scope) -> str:
    """The path inside the application (without its route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _headers(scope: Scope) -> dict[str, str]:
    """Header names lowercased; a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out
