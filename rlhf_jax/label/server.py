"""Serving the ranking app with uvicorn until its goal is reached (`service.Goal`) or the operator stops it
(Ctrl-C, SIGTERM), with a progress line per tenth of the target on stderr. Binding beyond loopback needs a
token."""

from __future__ import annotations

import errno
import ipaddress
import re
import signal
import socket
import sys
import threading

import uvicorn

from rlhf_jax.errors import UserError, os_reason
from rlhf_jax.label.app import make_app
from rlhf_jax.label.assign import is_shared
from rlhf_jax.label.service import Goal, LabelService
from rlhf_jax.label.store import Store
from rlhf_jax.runtime.progress import progress


def is_loopback(host: str) -> bool:
    """An address of loopback, or `localhost` where every address it resolves to is (a hosts file may say else)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None) if host == "localhost" else []
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(addr[4][0].split("%")[0]).is_loopback for addr in found)


TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")
TOKEN_MIN = 16  # characters: a shorter token falls to guessing
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def served_names(host: str) -> tuple[str, ...] | None:
    """The names a browser may reach a server bound to `host` by: loopback's own for loopback (a DNS-rebound name
    is refused), any other (None) for an address other machines reach, where the token guards."""
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host))) if is_loopback(host) else None


def check_binding(host: str, token: str) -> None:
    """Another machine may reach any address but loopback: then every request must carry a token, which travels
    in a header, a URL and a cookie, so it is made of the characters a URL carries as they are."""
    if token and not TOKEN_CHARS.fullmatch(token):
        raise UserError("label.token: expected letters, digits and . _ ~ - only (it travels in the page's URL, where "
                        "+ & % # and the like change it; `openssl rand -hex 24` makes one)")
    if token and len(token) < TOKEN_MIN:
        raise UserError(f"label.token: expected at least {TOKEN_MIN} characters, got {len(token)} (a short one is "
                        "guessed; `openssl rand -hex 24` makes one)")
    if not is_loopback(host) and not token:
        raise UserError(f"label.host={host}: other machines can reach it; set label.token too (every request must "
                        "then carry it)")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why not (a port in use, an address not of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"label.port={port}: in use on {host}; choose another (0 picks a free one)") from None
        raise UserError(f"label.host={host}: cannot listen there ({os_reason(e)})") from None


def check_target(store: Store, target: int, overlap: float) -> None:
    """A target the task can reach: without shared prompts each prompt is ranked once, by one labeler."""
    n = len(store.prompts)
    if target > n and not any(is_shared(i, overlap) for i in range(n)):
        raise UserError(f"label.target={target}: at most {n} rankings can be stored, one per prompt, when no prompt "
                        f"is shared (label.overlap={overlap:g}); lower the target or share prompts")


def serve(store: Store, host: str, port: int, token: str, target: int, overlap: float) -> bool:
    """Serve the app on host:port until the Goal of `target` is reached (True) or SIGTERM/SIGINT (False)."""
    check_binding(host, token)
    check_target(store, target, overlap)
    goal = Goal(store, target)
    if goal.done() >= goal.total:
        return True
    sock = listen(host, port)
    lock = threading.Lock()
    total = goal.total
    bar = progress(total, "label", "rankings" if target else "prompts", initial=goal.done())

    def saved(done: int) -> None:
        with lock:
            if done > bar.n:
                bar.update(min(done, total) - bar.n)
            if done >= total:
                server.should_exit = True

    service = LabelService(store, target, overlap, on_saved=saved)
    # log_config=None: uvicorn leaves the process's logging as it is (its own would replace every handler)
    app = make_app(service, token, served_names(host))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"label: the ranking page is at http://{_url_host(bound_host)}:{bound_port}/"
          f"{'?token=<label.token>' if token else ''} ({goal}; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    with StopSignals(server) as signals:
        server.run(sockets=[sock])
    bar.close()
    return signals.received is None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class StopSignals:
    """SIGTERM and SIGINT stop the server gracefully (requests in flight are answered) and are remembered: the
    server lends them to uvicorn while it runs and hands them back on the way out."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, server: uvicorn.Server):
        self.server, self.received = server, None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.server.should_exit = True

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
