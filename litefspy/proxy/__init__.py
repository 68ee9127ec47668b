"""The HTTP proxy in front of the application (see `litefspy.proxy.server`)."""

from litefspy.http.server import ListenError
from litefspy.proxy.routing import HEALTH_PATH, TXID_COOKIE
from litefspy.proxy.server import (
    DEFAULT_TXID_TIMEOUT,
    TXID_COOKIE_MAX_AGE,
    ProxyState,
    serve_proxy,
)
from litefspy.proxy.txid import TxidWaiters

__all__ = [
    "DEFAULT_TXID_TIMEOUT",
    "HEALTH_PATH",
    "TXID_COOKIE",
    "TXID_COOKIE_MAX_AGE",
    "ListenError",
    "ProxyState",
    "TxidWaiters",
    "serve_proxy",
]
