"""Who may use the endpoint: the API key (GS_RAY_API_KEY), and the refusal to serve other machines without one.

The server fails closed: bound to an address other machines can reach, it does not start
without a key unless `serve.allow_unauthenticated` says something else authenticates.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os

from gs_ray.core.errors import ConfigError

logger = logging.getLogger(__name__)

API_KEY_ENV = "GS_RAY_API_KEY"
LOCAL_HOSTNAMES = ("localhost",)
"""Host names taken as loopback without resolving them; any other name counts as reachable from elsewhere."""


def key_digest(key: str) -> str:
    """What a replica keeps of the key: its SHA-256, compared in constant time."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str | None) -> bool:
    """Whether an HTTP bind address only accepts connections from this machine (None: not known, so no)."""
    if not host:
        return False
    if host.lower() in LOCAL_HOSTNAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_authentication(http_host: str | None, allow_unauthenticated: bool) -> str | None:
    """GS_RAY_API_KEY (None if unset or empty); refuses, with a ConfigError, to serve other machines without one.

    http_host is where the HTTP proxy binds, None when it is not known (the Serve instance is not running yet).
    """
    key = os.environ.get(API_KEY_ENV) or None
    if key is None and not allow_unauthenticated and not is_loopback(http_host):
        where = (f"the HTTP proxy binds {http_host}, which is not a loopback address" if http_host else
                 "the HTTP proxy's address is not known here (no Serve instance is running), so it may not be a "
                 "loopback address")
        raise ConfigError(
            f"refusing to serve without authentication: {where} and {API_KEY_ENV} is unset or empty, so anyone who "
            f"can reach the port could use the endpoint. Set {API_KEY_ENV} (clients send 'Authorization: Bearer "
            "<key>'), bind serve.host=127.0.0.1, or set serve.allow_unauthenticated=true if something else "
            "authenticates the requests")
    return key


def serve_http_host() -> str | None:
    """Where the running Serve instance's HTTP proxy binds (its http_options.host), or None without one."""
    import ray
    from ray.serve import context

    if not ray.is_initialized():  # the lookup would start Ray
        return None
    try:
        client = context._get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:
        logger.warning("could not read the Serve HTTP proxy's address", exc_info=True)
        return None


def bearer_matches(authorization: str, digest: str) -> bool:
    """Whether an Authorization header carries `Bearer <the key whose digest this is>`."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), digest)
