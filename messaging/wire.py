"""Frame each event once per process, not once per member (on daphne).

Through ASGI, every delivery of an event goes ``send({"type": "websocket.send", ...})`` → daphne's
``handle_reply`` → autobahn's ``sendMessage``, which encodes the text and builds the WebSocket
frame again for each socket. Autobahn has an API for broadcasting: ``factory.prepareMessage()``
frames a payload once, ``protocol.sendPreparedMessage()`` writes those bytes to one connection
(server frames are not masked, so the bytes are the same for every member). The hub and the
consumer use it for events: the prepared frame is built at the first socket that needs it and
kept on the process's copy of the layer message, so the other members of the thread reuse it.

Daphne hands each application ``send = functools.partial(server.handle_reply, protocol)``;
:func:`daphne_protocol` takes the protocol from there. Any other server (or the test
communicator) gives ``None``, and the consumer sends through ASGI as usual. Acks, errors and
other frames for one socket always go through ASGI; both paths write to the same transport in
call order, so frames keep their order.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from chatapp import metrics

TEXT_FRAME = "_frame_text"
ZIPPED_FRAME = "_frame_z"


def daphne_protocol(send: Any) -> Any:
    """The autobahn protocol behind daphne's ASGI ``send``, or None for any other server."""
    if not isinstance(send, functools.partial) or len(send.args) != 1:
        return None
    protocol = send.args[0]
    if not hasattr(protocol, "sendPreparedMessage") or not hasattr(protocol, "factory"):
        return None
    return protocol


def write_event(protocol: Any, message: dict[str, Any], *, zipped: bool) -> bool:
    """Write an event to one socket as a frame prepared once for every socket of the process.

    True when some of it waits in the server (the client is not taking it as fast): only then is
    it worth asking :func:`unsent_bytes` how much.
    """
    if protocol.state != protocol.STATE_OPEN:
        return False  # closing or closed: daphne ends the consumer; the client resumes from the log
    key = ZIPPED_FRAME if zipped else TEXT_FRAME
    frame = message.get(key)
    if frame is None:
        payload = message["z"] if zipped else message["text"].encode()
        frame = message[key] = protocol.factory.prepareMessage(payload, isBinary=zipped)
    if protocol.send_queue or protocol._perMessageCompress is not None:
        protocol.sendPreparedMessage(frame)  # autobahn has frames queued, or compresses: its way
        return True
    return write_now(protocol.transport, frame.payloadHybi)


def unsent_bytes(protocol: Any) -> int:
    """Bytes written for this socket that its client has not taken yet (Twisted's buffers), plus
    autobahn's queued frames counted at a nominal size: a client that stops reading makes it grow."""
    transport = protocol.transport
    written = int(getattr(transport, "offset", 0))  # the front of dataBuffer already sent
    buffered = len(getattr(transport, "dataBuffer", b"")) - written + int(getattr(transport, "_tempDataLen", 0))
    return buffered + len(protocol.send_queue or ()) * 1024


def write_now(transport: Any, data: bytes) -> bool:
    """``transport.write(data)``, written to the socket at once when nothing is waiting before it.

    Twisted's ``write`` only buffers: it registers the socket for writability, and the next turn of
    the loop writes it and unregisters it (two epoll changes and a callback per frame, ~a third of
    the event loop's time in a busy thread). With nothing buffered, ``writeSomeData`` (Twisted's
    "write as much as possible, immediately") sends it now and only a remainder is buffered, so
    bytes still leave in order. A lost connection is left to Twisted's usual path. True when some
    of ``data`` (or earlier data) waits in Twisted's buffer.
    """
    if (
        not isinstance(transport, _tcp_connection())
        or transport.dataBuffer
        or getattr(transport, "_tempDataLen", 1)
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return True
    sent = transport.writeSomeData(data)
    if isinstance(sent, BaseException):
        transport.write(data)  # Twisted notices the loss at its next write and closes as usual
        return True
    if sent < len(data):
        transport.write(data[sent:])
        metrics.socket_writes_buffered.inc()
        return True
    return False


@functools.cache
def _http_channel() -> Any:
    from twisted.web.http import HTTPChannel

    return HTTPChannel


@functools.cache
def _tcp_connection() -> Any:
    from twisted.internet.tcp import Connection

    return Connection


# --- Failing with a close frame, and sends after the client's close ------------------------------


def daphne_fail_with_close_frame() -> None:
    """Have daphne's sockets answer a refused frame with a close frame instead of a TCP drop.

    Daphne caps frames and messages at 1 MiB (autobahn's ``maxFramePayloadSize`` /
    ``maxMessagePayloadSize``), but autobahn *fails* a connection by dropping the TCP connection by
    default (``failByDrop``): the client sees 1006 and cannot tell a refused frame from a lost
    network, so it reconnects and sends the same frame again. RFC 6455 §7.1.7 says an endpoint
    SHOULD send a Close frame first; with ``failByDrop=False`` autobahn sends 1009 for a frame or
    message over the limit (1002 for a protocol error, 1007 for invalid UTF-8), skips the rest of
    the refused frame without buffering it, and drops the connection once the client answers (or
    ``closeHandshakeTimeout`` passes). Daphne builds its factory inside ``Server.run`` with no way to
    pass the option, so it is set when the factory is made. Run at import of the consumer module,
    before daphne starts serving.
    """
    try:
        from daphne.ws_protocol import WebSocketFactory
    except ImportError:  # pragma: no cover - another ASGI server
        return
    if getattr(WebSocketFactory.__init__, "chatapp_patched", False):
        return
    original = WebSocketFactory.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.setProtocolOptions(failByDrop=False)

    init.chatapp_patched = True  # type: ignore[attr-defined]
    WebSocketFactory.__init__ = init  # type: ignore[method-assign]


@functools.cache
def _gone_errors() -> tuple[type[BaseException], ...]:
    """What an ASGI ``send`` raises once the client has closed: autobahn's ``Disconnected`` under
    daphne (autobahn 22+ raises it from ``sendMessage`` on a protocol that is not open), an
    ``OSError`` subclass elsewhere (the ASGI spec's rule, e.g. uvicorn's ``ClientDisconnected``)."""
    try:
        from autobahn.exception import Disconnected
    except ImportError:  # pragma: no cover - no autobahn: not under daphne
        return (OSError,)
    return (Disconnected, OSError)


def send_guard(send: Any, on_gone: Any) -> Any:
    """ASGI ``send`` that drops a frame for a socket its client has already closed, and tells the consumer.

    The client's close frame is answered by autobahn at once, but daphne tells the application
    (``websocket.disconnect``) only when the TCP connection is gone; a frame the consumer sends in
    between (the answer to a request that was in flight, a presence notice) makes ``send`` raise.
    Unhandled, that ends the consumer as a crash ("Exception inside application", logged as an
    error for what is an ordinary close under connection churn) in the middle of whatever it was
    doing. The frame has nowhere to go: drop it, call ``on_gone()`` (the consumer stops writing),
    and let the disconnect that follows end the consumer the usual way.
    """

    async def guarded(message: dict[str, Any]) -> None:
        try:
            await send(message)
        except _gone_errors():
            on_gone()

    return guarded


# --- Flow control for the backlog replay -------------------------------------------------------


class Outflow:
    """Waits until what was written to one daphne socket has gone to the kernel, or the socket closed.

    Twisted's producer/consumer API is the mechanism (no polling): a pull producer registered on
    the transport gets ``resumeProducing()`` each time Twisted has written its whole buffer for the
    socket out to the kernel, and ``stopProducing()`` when the connection is lost. autobahn
    unregisters producers before it drops a connection, so its ``is_closed`` Deferred (fired when
    the WebSocket closes, however) wakes a waiter too. The producer is registered only while a
    writer waits: with one registered, Twisted would hand a finished buffer to it instead of
    completing a ``loseConnection``.

    Daphne upgrades a connection to a WebSocket by handing the TCP transport to autobahn, but
    leaves Twisted's ``HTTPChannel`` registered as the transport's producer. It is inert there (it
    was handling the upgrade request, which never finishes, so it neither pauses nor resumes the
    transport), but it holds the transport's one producer slot; it is unregistered here.
    """

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        closed = getattr(protocol, "is_closed", None)
        if closed is not None and hasattr(closed, "addBoth"):
            closed.addBoth(self._on_closed)
        transport = protocol.transport
        if isinstance(getattr(transport, "producer", None), _http_channel()):
            transport.unregisterProducer()

    def _on_closed(self, result: Any) -> Any:
        self.closed = True
        self.wake()
        return result  # the Deferred's other callbacks see the same result

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # IPullProducer, registered on the transport while a writer waits.
    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's interface
        self.wake()

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's interface
        self.stop()

    def stop(self) -> None:
        """The socket is closing (Twisted lost it, or the application is closing it): nothing more to wait for."""
        self.closed = True
        self.wake()

    @property
    def open(self) -> bool:
        return not self.closed and self.protocol.state == self.protocol.STATE_OPEN

    async def drain(self, below: int) -> bool:
        """Return once at most ``below`` bytes wait in the server for this socket; False if it is
        closing or closed (then nothing more should be written or read for it)."""
        transport = self.protocol.transport
        while self.open and unsent_bytes(self.protocol) > below:
            if getattr(transport, "producer", None) is not None:  # pragma: no cover - not under daphne
                await asyncio.sleep(0.01)  # someone else's producer: Twisted would not call ours
                continue
            transport.registerProducer(self, False)  # a pull producer is asked to resume at once: ignored
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                if getattr(transport, "producer", None) is self:
                    transport.unregisterProducer()
        return self.open
