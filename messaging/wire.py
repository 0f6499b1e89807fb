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
    buffered = len(getattr(transport, "dataBuffer", b"")) + int(getattr(transport, "_tempDataLen", 0))
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
def _tcp_connection() -> Any:
    from twisted.internet.tcp import Connection

    return Connection
