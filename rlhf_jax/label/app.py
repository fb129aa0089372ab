"""The ranking web app (Starlette): the page and its script and style (static/, served by the package: labeling
machines may be offline), and the pinned JSON API of the labeling service. Every refusal is a 4xx JSON
`{"error": ...}` naming the problem, and writes nothing.

With a token, every request must carry it: an `Authorization: Bearer TOKEN` header, a `token` query parameter,
or the cookie the page gets when opened as `/?token=TOKEN` (so its script, style and API calls carry it too).

Other web pages the labeler's browser shows must not reach the API through it (`SameOrigin`): the Host header must
name this server where it is known (a loopback server answers only to loopback names: a DNS-rebound name gets
403), an API request a browser marks as coming from another site or origin (Sec-Fetch-Site, Origin) gets 403, and
a POST must declare its JSON body as application/json (415 otherwise: a form or text/plain POST, which a page of
any site may send without asking, never reaches the service).
"""

from __future__ import annotations

import hmac
import json
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlhf_jax.label.service import LabelService
from rlhf_jax.label.validate import ApiError

MAX_BODY = 64 * 1024  # bytes; a ranking of 9 responses with ratings and flags is under 1 KiB
STATIC = Path(__file__).parent / "static"
ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# Never inside another site's frame: a framed page's clicks would be the labeler's (its API calls are same-origin).
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'", "X-Frame-Options": "DENY",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
ROUTES = "/, /static/app.js, /static/style.css, /api/next, /api/rankings, /api/skip, /api/stats"


def make_app(service: LabelService, token: str = "", hosts: tuple[str, ...] | None = None):
    """The ASGI app. `hosts`: the names the Host header may carry (None: any, for a server reached by names it
    cannot know, which a token guards)."""
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    async def page(request: Request) -> Response:
        response = Response(assets["index.html"], media_type=ASSETS["index.html"], headers=PAGE_HEADERS)
        if token and request.query_params.get("token"):
            response.set_cookie(cookie_name(request.scope), token, httponly=True, samesite="strict")
        return response

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS or name == "index.html":
            raise HTTPException(404)
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    async def next_prompt(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.next, request.query_params.get("labeler")))

    async def rankings(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.rank, await _json_body(request)))

    async def skip(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.skip, await _json_body(request)))

    async def stats(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.stats))

    app = Starlette(routes=[Route("/", page), Route("/static/{name}", asset), Route("/api/next", next_prompt),
                            Route("/api/rankings", rankings, methods=["POST"]),
                            Route("/api/skip", skip, methods=["POST"]), Route("/api/stats", stats)],
                    exception_handlers={ApiError: _refused, HTTPException: _http_error, Exception: _failed})
    return SameOrigin(TokenCheck(app, token) if token else app, hosts)


async def _json_body(request: Request):
    """The body as JSON, read up to MAX_BODY bytes."""
    length = request.headers.get("content-length", "")
    if length.isdecimal() and int(length) > MAX_BODY:
        raise ApiError(413, f"the body has {length} bytes; the limit is {MAX_BODY}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is over the limit of {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None


async def _refused(request: Request, error: ApiError) -> Response:
    return JSONResponse({"error": str(error)}, status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    if error.status_code == 404:
        message = f"no such path {request.url.path}; the app serves {ROUTES}"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = error.detail
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)


async def _failed(request: Request, error: Exception) -> Response:
    if isinstance(error, sqlite3.OperationalError):  # the database cannot be written now: a full disk, an I/O error
        return JSONResponse({"error": f"label.db cannot be written ({error}); nothing was saved"}, status_code=503)
    return JSONResponse({"error": f"internal error ({type(error).__name__}); nothing was saved"}, status_code=500)


class TokenCheck:
    """ASGI middleware refusing, with 401, every HTTP request that does not carry the token."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if len(self._query_tokens(scope)) > 1:  # one request must not try many guesses, whatever else it carries
            message = "the URL names `token` more than once; one token per request"
            return await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
        if self._carries_token(scope):
            return await self.app(scope, receive, send)
        supplied = bool(self._supplied(scope))
        message = ("wrong token" if supplied else "missing token") + \
            ": open the page as /?token=TOKEN, or send the header Authorization: Bearer TOKEN"
        await JSONResponse({"error": message}, status_code=401)(scope, receive, send)

    def _carries_token(self, scope) -> bool:
        return any(hmac.compare_digest(candidate.encode(), self.token.encode()) for candidate in self._supplied(scope))

    @staticmethod
    def _query_tokens(scope) -> list[str]:
        return parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])

    @classmethod
    def _supplied(cls, scope) -> list[str]:
        """The tokens a request carries: in its Authorization header, query string and cookie."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        found = []
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            found.append(value.strip())
        found += cls._query_tokens(scope)
        # Starlette's parser, as browsers do, reads past another site's cookie that SimpleCookie cannot parse
        if (cookie := cookie_parser(headers.get("cookie", "")).get(cookie_name(scope))) is not None:
            found.append(cookie)
        return found


class SameOrigin:
    """ASGI middleware refusing what another site's page can make a browser send (see the module's docstring)."""

    def __init__(self, app, hosts: tuple[str, ...] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (refusal := self._refusal(scope)) is None:
            return await self.app(scope, receive, send)
        status, message = refusal
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    def _refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            return 403, f"Host {host!r} is not this server's; open it as http://{self.hosts[0]}:PORT/"
        if not scope["path"].startswith("/api/"):
            return None  # the page may be opened from a link anywhere
        # A browser's own Sec-Fetch-Site is trusted alone: Host and Origin differ behind a TLS proxy that sends the
        # upstream's address as Host. Origin against Host is for browsers that send no Sec-Fetch-Site.
        site = headers.get("sec-fetch-site")
        origin = headers.get("origin")
        if (site not in ("same-origin", "none") if site is not None else
                origin is not None and _netloc(origin) != host):
            return 403, "the API answers only the labeling page itself, not requests from another site's page"
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and media_type != "application/json":
            return 415, f"the body must be sent as Content-Type: application/json, not {media_type or 'none'!r}"
        return None


def cookie_name(scope) -> str:
    """The token's cookie, named by the port this server listens on: a browser sends a host's cookies to every port
    of it, and two label servers on one machine would each replace the other's."""
    server = scope.get("server")
    return f"label_token_{server[1]}" if server and server[1] is not None else "label_token"


def _hostname(host: str) -> str:
    """The name in a Host header ('' when it is not a host[:port], such as an unclosed '[::1')."""
    try:
        return urlsplit("//" + host).hostname or ""
    except ValueError:
        return ""


def _netloc(origin: str) -> str | None:
    """The host[:port] of an Origin header (None when it is not a URL)."""
    try:
        return urlsplit(origin).netloc
    except ValueError:
        return None
