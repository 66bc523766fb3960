"""The web dashboard: ``twisted.web`` resources served from the server's own reactor.

Routes (all read-only, ``GET`` only, behind :class:`~achilles.server.webauth.Access`):

``/``                 the page (static files shipped in the package, no CDN)
``/static/<file>``    its script and style sheet
``/api/events``       Server-Sent Events: ``history`` once, then ``update`` each tick
``/api/dashboard``    one ``update`` (``?since=SEQ``), for the page's polling fallback
``/api/history``      throughput series of the last minutes
``/api/status``       the same JSON as ``status()``
``/metrics``          Prometheus text format (:mod:`achilles.server.metrics`)

Updates are coalesced: whatever happens, a viewer gets at most one ``update`` per
:data:`~achilles.server.monitor.TICK` seconds, and a viewer that does not read (its socket
buffer full) is skipped until it does.
"""

from __future__ import annotations

import json
import logging
import socket
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple, cast

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from achilles.core.errors import ConfigError
from achilles.server.metrics import CONTENT_TYPE, registry_for, render
from achilles.server.monitor import TICK, Monitor
from achilles.server.webauth import COOKIE, Access, derive_token, is_loopback

log = logging.getLogger("achilles.server")

#: The page's files: name -> content type.
STATIC = {"index.html": b"text/html; charset=utf-8",
          "dashboard.js": b"text/javascript; charset=utf-8",
          "dashboard.css": b"text/css; charset=utf-8"}
#: Viewers with an open event stream at once; more get 503 and fall back to polling.
MAX_STREAMS = 64
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'self'; img-src 'self' data:; "
                                b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}


def static_file(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return (resources.files("achilles.server") / "static" / name).read_bytes()


class Dashboard:
    """The dashboard of one server: its monitor, who may read it, and its open event streams."""

    def __init__(self, monitor: Monitor, access: Access, secure: bool = False) -> None:
        self.monitor = monitor
        self.access = access
        self.secure = secure
        self.streams: List["Stream"] = []
        self.registry = registry_for(monitor)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = monitor.clock
        self.files = {name: static_file(name) for name in STATIC}

    def start(self) -> None:
        """Start sampling and pushing updates."""
        if not self._loop.running:
            self._loop.start(TICK, now=True)

    def stop(self) -> None:
        """Stop the tick and close every open event stream."""
        if self._loop.running:
            self._loop.stop()
        for stream in list(self.streams):
            stream.close()

    def tick(self) -> None:
        """Sample, then send one update to each viewer that is keeping up."""
        self.monitor.tick()
        views: Dict[int, bytes] = {}
        for stream in list(self.streams):
            if stream.paused:
                continue
            data = views.get(stream.seq)
            if data is None:
                data = views[stream.seq] = event("update", self.monitor.view(stream.seq))
            stream.write(data, self.monitor.seq)

    def site(self) -> Site:
        """A ``twisted.web`` site serving this dashboard."""
        site = QuietSite(Root(self))
        site.displayTracebacks = False
        return site


def event(name: str, data: Any) -> bytes:
    """One Server-Sent Event with a JSON body (JSON never contains a raw line break)."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode("utf-8") + b"\n\n"


def json_response(request: Request, data: Any) -> bytes:
    """``data`` as a JSON response body."""
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(data).encode("utf-8")


class QuietSite(Site):
    """A site that does not log each request (the server's log is about the cluster)."""

    def log(self, request: http.Request) -> None:
        """Skip the access log."""


@implementer(IPushProducer)
class Stream:
    """One viewer's open event stream; paused while its socket buffer is full."""

    def __init__(self, dashboard: Dashboard, request: Request) -> None:
        self.dashboard = dashboard
        self.request = request
        self.seq = 0
        self.paused = False
        self.closed = False
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)

    def write(self, data: bytes, seq: int) -> None:
        """Send ``data``; the viewer has now seen everything up to ``seq``."""
        if not self.closed:
            self.request.write(data)
            self.seq = seq

    def pauseProducing(self) -> None:
        """The socket buffer is full: skip this viewer until it drains."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The socket drained: send again from the next tick."""
        self.paused = False

    def stopProducing(self) -> None:
        """The connection is gone."""
        self.closed = True

    def close(self) -> None:
        """End the response (the browser reconnects, or falls back to polling)."""
        if not self.closed:
            self.closed = True
            self.request.unregisterProducer()
            self.request.finish()

    def _finished(self, _: Any) -> None:
        self.closed = True
        if self in self.dashboard.streams:
            self.dashboard.streams.remove(self)


class Text(Resource):
    """A fixed plain-text response with a status code."""

    isLeaf = True

    def __init__(self, code: int, text: str) -> None:
        super().__init__()
        self.code = code
        self.text = text.encode("utf-8")

    def render_GET(self, request: Request) -> bytes:
        """The text, with its status code."""
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return self.text

    render_HEAD = render_GET


class Redirect(Resource):
    """Answer with a redirect to a path on this site."""

    isLeaf = True

    def __init__(self, path: bytes) -> None:
        super().__init__()
        self.path = b"/" + path.lstrip(b"/")  # never //host: no open redirect

    def render_GET(self, request: Request) -> bytes:
        """Redirect to :attr:`path`."""
        request.redirect(self.path)
        return b""


class Root(Resource):
    """Checks access for every request, then routes it."""

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard
        static = Resource()
        for name in STATIC:
            if name != "index.html":
                static.putChild(name.encode(), cast(IResource, File(dashboard, name)))
        self.putChild(b"", cast(IResource, File(dashboard, "index.html")))
        self.putChild(b"static", cast(IResource, static))
        api = Resource()
        api.putChild(b"events", cast(IResource, Events(dashboard)))
        api.putChild(b"dashboard", cast(IResource, Api(dashboard, "dashboard")))
        api.putChild(b"history", cast(IResource, Api(dashboard, "history")))
        api.putChild(b"status", cast(IResource, Api(dashboard, "status")))
        self.putChild(b"api", cast(IResource, api))
        self.putChild(b"metrics", cast(IResource, Metrics(dashboard)))

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        """Refuse the request unless :class:`Access` allows it; trade a good ``?token=``
        for a cookie."""
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        access = self.dashboard.access
        query = (request.args or {}).get(b"token", [None])[0]
        auth = request.getHeader(b"authorization") or b""
        bearer = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
        if not access.allowed(request.getCookie(COOKIE), query, bearer,
                              request.getHeader(b"host")):
            if access.needs_token:
                return Text(403, "The dashboard needs its token: open the ?token= URL the server "
                                 "printed at start (or send Authorization: Bearer TOKEN).\n")
            return Text(403, "The dashboard listens on loopback only: reach it as localhost or "
                             "127.0.0.1 (through an SSH tunnel from another machine).\n")
        if access.needs_token and access.matches(query):
            # Trade the token in the address for a cookie, and drop it from the address bar.
            request.addCookie(COOKIE, query, path=b"/", httpOnly=True, sameSite="strict",
                              secure=self.dashboard.secure)
            return Redirect(request.path)
        return super().getChildWithDefault(path, request)


class File(Resource):
    """One of the page's static files."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard, name: str) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.name = name

    def render_GET(self, request: Request) -> bytes:
        """The file, or 404 for anything below it."""
        if request.postpath not in ([], [b""]):
            return Text(404, "not found\n").render_GET(request)
        request.setHeader(b"Content-Type", STATIC[self.name])
        return self.dashboard.files[self.name]

    render_HEAD = render_GET


class Api(Resource):
    """A JSON view of the cluster: ``dashboard``, ``history`` or ``status``."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard, what: str) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.what = what

    def render_GET(self, request: Request) -> bytes:
        """The JSON view this resource names (``?since=SEQ`` for ``dashboard``)."""
        monitor = self.dashboard.monitor
        if self.what == "status":
            return json_response(request, monitor.scheduler.status())
        if self.what == "history":
            return json_response(request, monitor.history())
        try:
            since = int((request.args or {}).get(b"since", [b"0"])[0])
        except ValueError:
            since = 0
        return json_response(request, monitor.view(since))


class Metrics(Resource):
    """``/metrics`` for Prometheus."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    def render_GET(self, request: Request) -> bytes:
        """The metrics in the Prometheus text format."""
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        return render(self.dashboard.registry)


class Events(Resource):
    """``/api/events``: the live stream."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    def render_GET(self, request: Request) -> Any:
        """Open the stream: the history and a full update at once, then updates each tick."""
        dashboard = self.dashboard
        if len(dashboard.streams) >= MAX_STREAMS:
            return Text(503, "too many open dashboards; this one polls instead\n").render_GET(request)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"X-Accel-Buffering", b"no")
        stream = Stream(dashboard, request)
        dashboard.streams.append(stream)
        monitor = dashboard.monitor
        stream.write(b"retry: 2000\n\n" + event("history", monitor.history())
                     + event("update", monitor.view(0)), monitor.seq)
        return NOT_DONE_YET


def listen(dashboard: Dashboard, host: str, port: int, tls: Optional[Any] = None) -> Any:
    """Serve ``dashboard`` on ``host:port`` (TLS with ``tls`` options); return the listening port."""
    from achilles.core.reactor import get_reactor

    reactor = get_reactor()
    site = dashboard.site()
    if tls is None:
        return reactor.listenTCP(port, site, interface=host)
    return reactor.listenSSL(port, site, tls, interface=host)


def parse_address(value: str) -> Optional[Tuple[str, int]]:
    """``HOST:PORT`` (``[v6]:PORT``; a bare ``PORT`` means loopback) as ``(host, port)``, or
    None for ``off``. Raises :class:`ConfigError` when it is neither."""
    text = value.strip()
    if text.lower() in ("off", "no", "false", "none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ConfigError(f"--dashboard / ACHILLES_DASHBOARD must be HOST:PORT or off, got {value!r}")
    return host, number


def url_of(host: str, port: int, secure: bool, token: Optional[str]) -> str:
    """The address to open: this machine's name for a wildcard bind, ``?token=`` when needed."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    query = f"?token={token}" if token else ""
    return f"{'https' if secure else 'http'}://{shown}:{port}/{query}"


def serve_dashboard(monitor: Monitor, address: str, secret: str, token: Optional[str] = None,
                    tls: Optional[Any] = None, required: bool = False) -> Optional[str]:
    """Serve the dashboard at ``address`` (``HOST:PORT`` or ``off``) and return its URL.

    ``token`` defaults to one derived from ``secret``; it is asked for only off loopback. When
    the port cannot be bound, a ``required`` dashboard raises :class:`ConfigError`, any other
    logs a warning and the server runs without one.
    """
    from twisted.internet.error import CannotListenError

    where = parse_address(address)
    if where is None:
        return None
    host, port = where
    access = Access(token or derive_token(secret), is_loopback(host))
    dashboard = Dashboard(monitor, access, secure=tls is not None)
    try:
        listening = listen(dashboard, host, port, tls)
    except CannotListenError as exc:
        message = (f"cannot serve the dashboard on {host}:{port}: {exc.socketError}; pick "
                   "another with --dashboard HOST:PORT (or --dashboard off)")
        if required:
            raise ConfigError(message) from None
        log.warning("%s", message)
        return None
    dashboard.start()
    bound = listening.getHost().port
    url = url_of(host, bound, tls is not None, access.token if access.needs_token else None)
    log.info("dashboard: %s", url)
    return url
