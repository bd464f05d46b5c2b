"""pushd's HTTP connection: Twisted Web's channel and request with pushd's
bounds (slowloris deadline, header limits, RFC 9110's field grammar), the
contract's JSON for every error twisted.web would answer itself, the producers'
hot path (pushd.web.hotpath) between requests, and a graceful stop."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET, Request, supportedMethods

from pushd.message import dump_json
from pushd.sending import write_now
from pushd.web import errors
from pushd.web.hotpath import MAX_HEADERS, FastPublish, bad_field_line

log = Logger()

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.web.http_headers import Headers
    from twisted.web.resource import IResource

    # twisted.web's Request and HTTPChannel are unannotated: the methods pushd
    # calls on them (through super() or self), with their types.

    class _Request(Request):
        def gotLength(self, length: int | None) -> None: ...
        def handleContentChunk(self, data: bytes) -> None: ...
        def process(self) -> None: ...
        def render(self, resrc: IResource) -> None: ...
        def setHeader(self, name: bytes, value: bytes) -> None: ...
        def write(self, data: bytes) -> None: ...
        def finish(self) -> None: ...

    class _HTTPChannel(HTTPChannel):
        def connectionMade(self) -> None: ...
        def lineReceived(self, line: bytes) -> None: ...
        def allHeadersReceived(self) -> None: ...
        def checkPersistence(self, request: Request, version: bytes) -> bool: ...
        def _send100Continue(self) -> None: ...
        def allContentReceived(self) -> None: ...
        def writeHeaders(
            self, version: bytes, code: bytes, reason: bytes, headers: Headers
        ) -> None: ...
        def requestDone(self, request: Request) -> None: ...
        def connectionLost(self, reason: Failure | None = None) -> None: ...
        def dataReceived(self, data: bytes) -> None: ...
        def clearLineBuffer(self) -> bytes: ...
        def setTimeout(self, period: float | None) -> float | None: ...
        def resetTimeout(self) -> None: ...
        def callLater(self, delay: float, f: Callable[[], object]) -> IDelayedCall: ...

else:
    _Request = Request
    _HTTPChannel = HTTPChannel


class PushdRequest(_Request):
    """A request whose body is capped: past the limit the rest is discarded
    and the resource answers 413, so a large body never sits in memory. The
    limit is the path's (`max_bodies`: `POST /publish` takes a batch), else
    `max_body` (a message)."""

    max_body = 65536
    max_bodies: dict[bytes, int] = {}
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        path = getattr(self.channel, "request_path", b"")
        self.max_body = self.max_bodies.get(path, self.max_body)
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > self.max_body:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    # Every answer twisted.web would make itself is the contract's JSON error.

    def process(self) -> None:
        """A request that arrives while the node stops gets 503 `shutting_down`
        (with `Connection: close`): nothing of it reaches a resource or the broker."""
        site = self.channel.site  # type: ignore[attr-defined]
        if getattr(site, "stopping", False):
            self.site = site
            self.channel.persistent = False
            self.setHeader(b"connection", b"close")
            errors.write_error(self, *errors.SHUTTING_DOWN)
            return
        super().process()

    def render(self, resrc: Any) -> None:
        try:
            body = resrc.render(self)
        except UnsupportedMethod as e:
            if self.method == b"HEAD" and b"GET" in e.allowedMethods:
                super().render(resrc)  # twisted.web answers HEAD as GET without a body
                return
            if self.method in supportedMethods:
                self.setHeader(b"allow", b", ".join(e.allowedMethods))
                error = (405, "method_not_allowed", f"{self.method.decode()} is not allowed here")
            else:
                error = (501, "not_implemented", f"{self.method.decode()} is not implemented")
            errors.write_error(self, *error)
            return
        if body is NOT_DONE_YET:
            return
        if not isinstance(body, bytes):
            self.processingFailed(Failure(TypeError(f"{resrc!r} rendered {body!r}")))
            return
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(b"" if self.method == b"HEAD" else body)
        self.finish()

    def processingFailed(self, reason: Failure) -> None:
        log.failure("request {uri} failed", reason, uri=self.uri)
        if self.finished or self._disconnected:
            return
        if self.startedWriting:
            self.finish()
            return
        errors.write_error(self, 500, "internal", "internal error")

    def _handleStar(self) -> None:
        if self.method == b"OPTIONS":
            self.setResponseCode(200)
            self.setHeader(b"content-length", b"0")
            self.finish()
            return
        self.setHeader(b"allow", b"OPTIONS")
        errors.write_error(self, 405, "method_not_allowed", "only OPTIONS is allowed on *")


_NO_REST = (b"", 0)


class PushdChannel(_HTTPChannel):
    """Twisted Web's connection with pushd's bounds and manners.

    Bounds on what a stranger sends before a request is complete:
    `handshake_timeout` seconds for the request line and headers (slowloris),
    `max_header_size` bytes for them (414 for a request line over it, 431 for
    headers), MAX_HEADERS header fields, and RFC 9110's field grammar (no NUL,
    CR, LF or other control byte, names that are tokens, no obs-fold): 400.
    Every error it answers itself is the contract's JSON, with `Connection:
    close`; so is a 413 for a body announced over the limit with `Expect:
    100-continue`, sent at once instead of `100 Continue`.

    The producers' hot path (pushd.web.hotpath) answers whole publishes here,
    between requests; bytes that arrive while one waits for the broker queue,
    and reading pauses once `fast_queue_limit` bytes wait.

    While the node stops (`PushdSite.begin_stop`), every answer carries
    `Connection: close` and is the connection's last; requests that arrive get
    503 `shutting_down` (PushdRequest.process); an idle connection is closed
    after a grace period in which a request may still come and be answered.
    """

    handshake_timeout = 10.0
    max_header_size = 16384
    maxHeaders = MAX_HEADERS
    fast_queue_limit = 65536
    #: Seconds a refused client has to close its side before it is cut off.
    linger = 2.0
    site: Any
    _deadline: Any = None
    _header_bytes = 0
    _header_count = 0
    _refused = False
    # The connection is gone: nothing more is written or timed.
    _gone = False
    _linger_call: Any = None
    _stop_call: Any = None
    #: The producers' hot path (pushd.web.hotpath), when the site has one.
    fast: FastPublish | None = None
    # While a request of the hot path waits for the broker: what arrived meanwhile.
    _fast_waiting: list[bytes] | None = None
    _fast_queued = 0
    _fast_paused = False
    # The read that request came in, and where the request ended in it.
    _fast_rest: tuple[bytes, int] = _NO_REST
    # True while a hot-path publish is being sent: its answer may come at once.
    _fast_sending = False
    _peer: Any = None
    #: The path of the request being read (its head), without the query.
    request_path = b""
    # Between requests, no byte of the next one yet (_await_head).
    _idle = False

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.totalHeadersSize = self.max_header_size
        super().connectionMade()
        self._start_deadline()
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "channels"):
            site.channels.add(self)
            if site.stopping:
                self.stop(site.stop_grace)

    def _start_deadline(self) -> None:
        self._header_bytes = 0
        self._header_count = 0
        if not self._gone:
            self._deadline = self.callLater(self.handshake_timeout, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    @property
    def _stopping(self) -> bool:
        return bool(getattr(self.site, "stopping", False))

    # -- the head of a request, line by line (twisted.web's path)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        self._header_bytes += len(line) + 2
        if self._header_bytes > self.max_header_size:
            self._refuse(b"431 Request Header Fields Too Large", "headers_too_large")
            return
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            if line and _bad_request_line(line):
                self._bad_request()
                return
            if line:
                # The body's limit depends on the path (PushdRequest.gotLength).
                self.request_path = line.split(b" ", 2)[1].partition(b"?")[0]
        elif line:
            if line[0] in b" \t":
                self._refuse(
                    b"400 Bad Request", "bad_request", "obsolete line folding (obs-fold) refused"
                )
                return
            if bad_field_line(line):
                self._refuse(
                    b"400 Bad Request",
                    "bad_request",
                    "a header field outside RFC 9110's grammar (a control byte, CR or LF"
                    " alone, a name that is not a token)",
                )
                return
            self._header_count += 1
            if self._header_count > self.maxHeaders:
                self._refuse(
                    b"400 Bad Request",
                    "too_many_headers",
                    f"more than {self.maxHeaders} header fields",
                )
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._header_bytes == 0:
            self._refuse(b"414 URI Too Long", "url_too_long")
        else:
            self._refuse(b"431 Request Header Fields Too Large", "headers_too_large")

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        # Pipelined requests are parsed before requestDone: count each one's own.
        self._header_bytes = 0
        self._header_count = 0
        super().allHeadersReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self._stopping:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def _send100Continue(self) -> None:
        if getattr(self.requests[-1], "body_too_large", False):
            # The client waits for a word before it sends the body: the last one.
            error = errors.TOO_LARGE
            self._refuse(b"413 Content Too Large", error.code, error.message)
            return
        super()._send100Continue()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._bad_request()

    def _bad_request(self) -> None:
        self._refuse(b"400 Bad Request", "bad_request", "malformed HTTP request")

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not self.persistent and not headers.hasHeader(b"connection"):
            headers.setRawHeaders(b"connection", [b"close"])
        super().writeHeaders(version, code, reason, headers)

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.transport is not None and not self._handlingRequest:
            self._await_head()

    def _await_head(self) -> None:
        """Between requests: the next head's deadline starts with its first
        byte; an idle kept-alive connection is the site's timeout's (closed
        without a word, never a 408 that could cross the client's next request)."""
        self._stop_deadline()
        self._idle = True

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        self._stop_deadline()
        for call in (self._linger_call, self._stop_call):
            if call is not None and call.active():
                call.cancel()
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "channel_gone"):
            site.channel_gone(self)

    def _too_slow(self) -> None:
        self._deadline = None
        if self._fast_waiting is not None:
            self._start_deadline()  # a whole request waits for the broker, not the client
            return
        self._refuse(b"408 Request Timeout", "timeout")

    def _refuse(self, status: bytes, code: str, message: str | None = None) -> None:
        """Answer an error of the connection's own and close it, reading no more."""
        self._stop_deadline()
        if self.transport is None or self._refused or self._gone:
            return
        self._refused = True
        self.clearLineBuffer()
        body = dump_json({"error": code, "message": message or status[4:].decode()})
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        self._close_gently()

    def _close_gently(self) -> None:
        """Close after what is written, without a reset: send FIN, read and drop
        what the client still sends (a body, pipelined requests) until it closes
        too, or `linger` seconds pass. Closing with unread bytes would reset the
        connection, and the client could lose the answer."""
        self._refused = True
        if self._gone:
            return
        transport: Any = self.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None or getattr(transport, "TLS", False):
            HTTPChannel.loseConnection(self)
            return
        self._networkProducer.unregisterProducer()
        self.setTimeout(None)
        transport.resumeProducing()
        half_close()
        self._linger_call = self.callLater(self.linger, transport.abortConnection)

    def loseConnection(self) -> None:
        """twisted.web closes here after a last answer (`Connection: close`, a
        stop, HTTP/1.0, an idle timeout): gently, as `_close_gently` says."""
        if self.transport is not None and not self._refused:
            self._close_gently()

    # -- stopping

    def stop(self, grace: float) -> None:
        """The node stops: the request in progress is the connection's last (its
        answer says `Connection: close`); an idle connection waits `grace`
        seconds for a request (answered 503), then is closed."""
        if self.transport is None or self._refused or self._gone:
            return
        if self.requests:
            self.persistent = False
        self._stop_call = self.callLater(grace, self._stopped)

    def _stopped(self) -> None:
        self._stop_call = None
        idle = not self.requests and self._fast_waiting is None
        if self.transport is not None and not self._refused and idle:
            self._close_gently()

    # -- the hot path

    def dataReceived(self, data: bytes, start: int = 0) -> None:
        """`data[start:]` through the hot path while it holds whole publishes,
        the rest through twisted.web."""
        if self._fast_waiting is not None:
            self._fast_waiting.append(data)
            self._fast_queued += len(data)
            if self._fast_queued > self.fast_queue_limit:
                self._fast_paused = True
                self._network().pauseProducing()
            return
        if self._refused:
            return
        # The first bytes of a head: its deadline starts, unless the hot path
        # takes the whole request (the answer then sees to what comes next).
        begun = self._idle and start < len(data)
        if begun:
            self._idle = False
        fast = self.fast
        while (
            fast is not None
            and start < len(data)
            and not fast.closing
            # Between requests, as far as twisted.web is concerned:
            and self._HTTPChannel__first_line  # type: ignore[attr-defined]
            and self.line_mode
            and not self.requests
            and not self._buffer
            and self.persistent
        ):
            if self._peer is None:
                transport: Any = self.transport
                self._peer = transport.getPeer()
            request = fast.parse(data, start, self._peer)
            if request is None:
                break
            self.resetTimeout()
            # As twisted.web's allContentReceived after each request: one blank
            # line before the next request line is eaten again.
            web: Any = self
            web._HTTPChannel__first_line = 1
            self._fast_waiting = []
            self._fast_queued = len(data) - request.end
            self._fast_rest = (data, request.end)
            self._fast_sending = True
            fast.publish(request, self._fast_answer)
            self._fast_sending = False
            begun = False
            if self._fast_waiting is not None:
                if self._fast_queued > self.fast_queue_limit:
                    self._fast_paused = True
                    self._network().pauseProducing()
                return  # _fast_answer goes on
            if self._refused:
                return
            data, start = self._fast_rest
        if begun:
            self._start_deadline()
        if start < len(data):
            super().dataReceived(data[start:] if start else data)

    def _network(self) -> Any:
        return self._networkProducer

    def _fast_answer(self, response: bytes) -> None:
        """The hot path's answer; then what came meanwhile (pipelined) is read."""
        waiting, self._fast_waiting = self._fast_waiting, None
        if self.transport is None or self._gone:
            return
        write_now(self.transport, response)
        if self.fast is not None and self.fast.closing:
            # The answer said `Connection: close`: it is the last.
            self._close_gently()
            return
        data, start = self._fast_rest
        if waiting or start < len(data):
            # The next request's headers, already begun, have their deadline from now.
            self._stop_deadline()
            self._start_deadline()
        else:
            self._await_head()
        if self._fast_paused:
            self._fast_paused = False
            if not self._waitingForTransport:
                self._network().resumeProducing()
        data, start = self._fast_rest
        if waiting:
            data, start = data[start:] + b"".join(waiting), 0
            self._fast_rest = (data, start)
        if self._fast_sending:
            return  # dataReceived goes on from _fast_rest
        self._fast_rest = _NO_REST
        if start < len(data):
            self.dataReceived(data, start)


# method SP request-target SP HTTP-version: a target of visible ASCII only
# (twisted.web lets bytes 0x7f-0xb0 through).
_REQUEST_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/1\.[01]")


def let_go(channel: Any) -> None:
    """Twisted Web's `channel` is done with: its connection is another
    protocol's now (a WebSocket upgrade, a stream's own connection). It and its
    request hold each other: one side is let go, so both go now, not at a full
    GC; and the site stops counting it (what took the connection closes it on
    a stop)."""
    channel.requests.clear()
    gone = getattr(channel.site, "channel_gone", None)
    if gone is not None:
        gone(channel)


def _bad_request_line(line: bytes) -> bool:
    return _REQUEST_LINE.fullmatch(line) is None
