"""The Autobahn memory diet: what makes an idle WebSocket connection small.

Autobahn keeps some hundred attributes per connection, most of them the same
for every connection, and the whole opening handshake besides. pushd goes past
the library here, in four ways, each with a canary in tests/test_canaries.py:

- `protocol_class`: each factory gets a protocol class of its own, so that
  values written onto it at runtime are seen by that factory's connections only;
- `options_on_class`: the factory's options (`CONFIG_ATTRS`) are written onto
  that class, where connections read them, and the class lists none for
  Autobahn to copy at each connect;
- `shrink`: once open, a connection drops what only the handshake reads
  (`_HANDSHAKE_ONLY`), swaps its send queue for an immutable empty one, its
  `is_open`/`is_closed` futures (which nothing of pushd awaits) for one shared
  future that takes results and keeps none, and its traffic counters (which
  nothing reads) for one object its factory's connections share, moves its
  plain values (`_SHAREABLE`) that equal the class's to the class, and gets a
  fresh `__dict__` sized to what is left;
- `drop_cycles`: a closed connection lets go of what points back at it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

# What Autobahn keeps of the opening handshake and never reads once the connection is open.
_HANDSHAKE_ONLY = (
    "http_headers",
    "http_status_line",
    "http_request_data",
    "http_response_data",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_key",
    "_wskey",
)
_SHAREABLE = (type(None), bool, int, float, str)


class _Unheard:
    """A future nobody listens to: Autobahn resolves a connection's `is_open`
    and `is_closed` (txaio.resolve and reject call these), and nothing of
    pushd's waits for them. One for all connections: two Deferreds less each."""

    called = True

    def callback(self, result: object = None) -> None:
        pass

    def errback(self, failure: object = None) -> None:
        pass

    def addCallbacks(self, *args: object, **kwargs: object) -> _Unheard:
        raise TypeError("nothing waits for this connection's open or close: use onOpen/onClose")

    addCallback = addErrback = addBoth = addCallbacks


UNHEARD = _Unheard()
_UNSET = object()

P = TypeVar("P", bound=type)


def protocol_class(base: P) -> P:
    """A subclass of `base` for one factory alone: what `options_on_class` and
    `shrink` write onto it no other factory's connections see."""
    return type(base.__name__, (base,), {})  # type: ignore[return-value]


def options_on_class(factory: WebSocketServerFactory) -> None:
    """Write the factory's options onto its protocol class: connections read
    them from there instead of holding a copy each. The class then lists no
    options to copy: Autobahn's check of each at every connect, and the
    pretty-printed debug line of what it found (7 % of a connect's CPU in a
    profile of 10,000 connects), shrink to nothing."""
    protocol = factory.protocol
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        value = getattr(factory, name)
        # A function read from a class would become a method: keep it plain.
        setattr(protocol, name, staticmethod(value) if callable(value) else value)
    protocol.CONFIG_ATTRS = []


def shrink(connection: WebSocketServerProtocol, also: tuple[str, ...] = ()) -> None:
    """Make an idle open connection small: it keeps nothing of the handshake
    (nor the names in `also`), and no copy of a plain value its class already
    holds. The class must be of one factory alone (`protocol_class`)."""
    own = connection.__dict__
    for name in (*_HANDSHAKE_ONLY, *also):
        own.pop(name, None)
    # Autobahn never appends to its send queue unless asked to (sync or
    # chopsize writes, which pushd does not use): an immutable empty one
    # would fail loudly if it ever did.
    own["send_queue"] = ()
    own["is_open"] = own["is_closed"] = UNHEARD
    cls = type(connection)
    shared_stats = cls.__dict__.get("_shared_traffic_stats")
    if shared_stats is None:
        # Autobahn adds to these per frame and reads them for nothing pushd uses.
        shared_stats = own.get("trafficStats")
        cls._shared_traffic_stats = shared_stats  # type: ignore[attr-defined]
    own["trafficStats"] = shared_stats
    for name, value in list(own.items()):
        if type(value) not in _SHAREABLE or name == "state":  # read per delivery
            continue
        shared = getattr(cls, name, _UNSET)
        if shared is _UNSET:
            # This factory's own class (protocol_class): no other sees it.
            setattr(cls, name, value)
            shared = value
        if type(shared) is type(value) and shared == value:
            del own[name]
    # A dict does not shrink when keys go: a copy is sized to what is left.
    connection.__dict__ = dict(own)


def drop_cycles(connection: Any, also: tuple[str, ...] = ()) -> None:
    """After connectionLost: Autobahn resolves `is_closed` with the protocol
    itself (and `also`, e.g. a session, may point back at it): cycles that would
    leave every closed connection to the cycle collector. Nothing reads them
    once the connection is gone."""
    own = connection.__dict__
    for name in (*also, "is_closed", "is_open"):
        own.pop(name, None)
