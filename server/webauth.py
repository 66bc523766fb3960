"""Who may read the dashboard: loopback binds are open to this machine, others need a token.

The token is ``ACHILLES_DASHBOARD_TOKEN`` or, without it, an HMAC of the cluster secret under
a fixed label (so it is stable across restarts and reveals nothing of the secret). A browser
presents it once as ``?token=`` and gets it back as an ``HttpOnly`` ``SameSite=Strict``
cookie (``EventSource`` cannot send headers); scripts may send ``Authorization: Bearer``.
Every comparison is constant-time. On a loopback bind the ``Host`` header must name a
loopback host too, so a web page cannot reach the dashboard through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Optional
from urllib.parse import urlsplit

COOKIE = b"achilles_dashboard"
TOKEN_LABEL = b"achilles dashboard token v1"


def derive_token(secret: str) -> str:
    """The dashboard token that belongs to a cluster secret (hex, 32 characters)."""
    return hmac.new(secret.encode("utf-8"), TOKEN_LABEL, hashlib.sha256).hexdigest()[:32]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only listens on this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_header_is_local(value: Optional[bytes]) -> bool:
    """Whether a request's ``Host`` header names this machine (``localhost``, ``127.x``, ``[::1]``)."""
    if not value:
        return False
    try:
        host = urlsplit("//" + value.decode("ascii")).hostname or ""
    except (UnicodeDecodeError, ValueError):
        return False
    return is_loopback(host)


class Access:
    """The access rule of one dashboard listener: open (loopback) or by ``token``."""

    def __init__(self, token: Optional[str], loopback: bool) -> None:
        self.token = token
        self.loopback = loopback

    @property
    def needs_token(self) -> bool:
        """Whether requests must carry the token (any bind that is not loopback-only)."""
        return not self.loopback

    def matches(self, presented: Optional[bytes]) -> bool:
        """Whether ``presented`` is the token (constant time; False when there is none)."""
        if self.token is None or not presented:
            return False
        return hmac.compare_digest(presented, self.token.encode("utf-8"))

    def allowed(self, cookie: Optional[bytes], query_token: Optional[bytes],
                bearer: Optional[bytes], host: Optional[bytes]) -> bool:
        """Whether a request with these credentials (and ``Host`` header) may read."""
        if self.loopback:
            return host_header_is_local(host)
        return any(self.matches(c) for c in (cookie, query_token, bearer))
