"""Who may talk to `tiaoyu serve`: the Host and Origin checks in front of the app (an ASGI middleware).

A server on loopback is still reachable from any web page the user opens: a page may POST to
http://127.0.0.1:8000 with `Content-Type: text/plain` (no CORS preflight for such a "simple" request),
and DNS rebinding lets a page on evil.example reach it under its own name. So:

    Host     must name the address the server is bound to (for loopback also localhost, 127.0.0.1, ::1)
             or one of `--allowed-hosts`; bound to a wildcard address (0.0.0.0, ::) any name is taken
             unless `--allowed-hosts` says otherwise. `*` allows every name.
    Origin   a browser sends it with every cross-origin request (and with same-origin POSTs): it must
             be the server's own origin (the chat page at /) or one of `--allow-origin` (`*`: any).
             Allowed origins get CORS headers and answers to preflight (OPTIONS) requests.

Clients that are not browsers (curl, the openai package) send no Origin and the Host they connected
to, so they pass as before. A refused request gets 403 with an OpenAI-shaped JSON error.
"""

from __future__ import annotations

import ipaddress
import json

WILDCARDS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(value: str) -> str:
    """The name part of a Host header value: 'example.com:8000' → 'example.com', '[::1]:80' → '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_host_names(bind_host: str, allowed_hosts: list[str] | tuple[str, ...] = ()) -> set[str] | None:
    """The Host names accepted for a server bound to `bind_host`; None means any."""
    extra = {h.strip().lower() for h in allowed_hosts if h.strip()}
    if "*" in extra:
        return None
    bind = host_name(bind_host or "")
    if bind in WILDCARDS and not extra:
        return None
    names = set(extra)
    if bind not in WILDCARDS:
        names.add(bind)
        if _is_loopback(bind):
            names.update(LOOPBACK_NAMES)
    return names


class Guard:
    """ASGI middleware: refuse requests whose Host or Origin is not allowed; CORS for allowed origins."""

    def __init__(self, app, bind_host: str, allowed_hosts=(), allow_origins=()):
        self.app = app
        self.hosts = allowed_host_names(bind_host, list(allowed_hosts))
        self.origins = {o.strip().rstrip("/").lower() for o in allow_origins if o.strip()}

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in (f"http://{host}", f"https://{host}"):  # the chat page this server serves
            return True
        return "*" in self.origins or origin in self.origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "").strip().lower()
        if self.hosts is not None and host and host_name(host) not in self.hosts:
            return await _refuse(send, f"the Host '{host[:100]}' is not one this server answers to; start it with "
                                       "--allowed-hosts NAME to allow it", "host_not_allowed")
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        if not self._origin_allowed(origin, host):
            return await _refuse(send, f"requests from the web origin '{origin[:100]}' are refused; start the server "
                                       "with --allow-origin ORIGIN to allow that page", "origin_not_allowed")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            asked = headers.get("access-control-request-headers", "content-type, authorization")
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", asked.encode("latin-1")),
                (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + cors}
            await send(message)

        return await self.app(scope, receive, send_cors)


async def _refuse(send, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
