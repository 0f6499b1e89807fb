"""Unstorable input through a live daphne (the transport production runs): over the socket every frame
field that carries it gets an ``error`` frame (code ``invalid``, the field named, the request's id)
and the connection survives; over HTTP what daphne itself decodes (paths, query strings, bodies) is
a 400 in the one JSON shape. The in-process table for every REST place is in test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from accounts.models import User
from bench.servers import ServerProcess
from messaging.models import Message, Reaction
from messaging.services import message_send
from tests.conftest import needs
from tests.live import Client, session_cookie, start_servers
from threads.models import Thread

pytestmark = [pytest.mark.django_db(transaction=True)]

# JSON text of what PostgreSQL cannot store: NUL and lone surrogates as the escapes a client sends,
# nesting past the bound (32) and a number past the float range (which Python reads as infinity).
BAD_JSON = {
    "nul": json.dumps("a\x00b"),
    "high_surrogate": json.dumps("\ud800"),
    "low_surrogate": json.dumps("x\udc00y"),
    "deep": "[" * 400 + "]" * 400,
    "huge_float": "1e400",
}
BAD = "__BAD__"


@pytest.fixture(scope="module")
def server(django_db_setup: None) -> Iterator[ServerProcess]:
    needs("postgres")
    needs("redis")
    [live] = start_servers(1, CHATAPP_SENDS_PER_MINUTE="1000000")
    yield live
    live.close()


Frame = Callable[[Thread, Message], dict[str, Any]]
FRAME_PLACES: list[tuple[str, Frame, str]] = [
    ("body", lambda t, m: {"type": "message.send", "thread_id": t.pk, "body": BAD, "client_msg_id": "c"}, "body"),
    ("client_msg_id", lambda t, m: {"type": "message.send", "thread_id": t.pk, "client_msg_id": BAD}, "client_msg_id"),
    (
        "attachment_ids",
        lambda t, m: {"type": "message.send", "thread_id": t.pk, "client_msg_id": "c", "attachment_ids": [1, BAD]},
        "attachment_ids",
    ),
    ("edit", lambda t, m: {"type": "message.edit", "message_id": m.pk, "body": BAD, "version": 1}, "body"),
    ("reaction", lambda t, m: {"type": "reaction.add", "message_id": m.pk, "emoji": BAD}, "emoji"),
    ("unreaction", lambda t, m: {"type": "reaction.remove", "message_id": m.pk, "emoji": BAD}, "emoji"),
    ("subscribe", lambda t, m: {"type": "subscribe", "thread_id": BAD}, "thread_id"),
    ("read", lambda t, m: {"type": "read", "thread_id": t.pk, "seq": BAD}, "seq"),
    ("extra", lambda t, m: {"type": "ping", "extra": {"a": [BAD]}}, "extra"),  # a field no frame declares
    ("type", lambda t, m: {"type": BAD}, "type"),
]


def _frame_text(frame: dict[str, Any], bad: str, request_id: str | None) -> str:
    if request_id is not None:
        frame = {**frame, "id": request_id}
    return json.dumps(frame).replace(f'"{BAD}"', bad)


@pytest.mark.parametrize(("name", "frame", "field"), FRAME_PLACES, ids=[p[0] for p in FRAME_PLACES])
def test_unstorable_frame_fields_get_an_error_frame_and_the_socket_survives(
    server: ServerProcess, alice: User, thread: Thread, name: str, frame: Frame, field: str
) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="kept", client_msg_id="keep")
    cookie = session_cookie(alice)

    async def scenario() -> None:
        client = await Client.open(server, cookie)
        for value, bad in BAD_JSON.items():
            request_id = f"{name}-{value}"
            await client.send(_frame_text(frame(thread, message), bad, request_id))
            reply = await client.wait_for(lambda f: f.get("id") == request_id)  # noqa: B023 - awaited here
            assert reply["type"] == "error", (value, reply)
            assert reply["error"]["code"] == "invalid", (value, reply)
            assert field in reply["error"]["fields"], (value, reply)
            assert (await client.request("ping"))["type"] == "pong"  # the connection survives
        await client.close()

    asyncio.run(scenario())
    message.refresh_from_db()
    assert (message.body, message.version) == ("kept", 1)
    assert list(Message.objects.values_list("client_msg_id", flat=True)) == ["keep"]
    assert not Reaction.objects.exists()


def test_an_unstorable_request_id_is_not_echoed(server: ServerProcess, alice: User) -> None:
    cookie = session_cookie(alice)

    async def scenario() -> None:
        client = await Client.open(server, cookie)
        for value, bad in BAD_JSON.items():
            if value in ("deep", "huge_float"):
                continue
            await client.send(f'{{"type": "ping", "id": {bad}}}')
            reply = await client.wait_for(lambda f: f["type"] == "error" and "id" in f["error"].get("fields", {}))
            assert reply["id"] is None
            client.frames.clear()
            assert (await client.request("ping"))["type"] == "pong"
        await client.close()

    asyncio.run(scenario())


def _http(server: ServerProcess, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body, headers={"Host": "127.0.0.1", **headers})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    assert response.getheader("Content-Type", "").startswith("application/json"), (response.status, raw)
    return response.status, json.loads(raw)


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "field"),
    [
        ("DELETE", "/api/v1/messages/{message}/reactions/a%00b", "", "", "emoji"),
        ("GET", "/api/v1/search?q=%00", "", "", "q"),
        ("GET", "/api/v1/threads/{thread}%00", "", "", "path"),
        ("PATCH", "/api/v1/me", '{"preferences": {"\\ud800": 1}}', "application/json", "preferences"),
        ("PATCH", "/api/v1/me", '{"preferences": {"a": ' + BAD_JSON["deep"] + "}}", "application/json", "preferences"),
        ("PATCH", "/api/v1/me", '{"preferences": {"a": 1e400}}', "application/json", "preferences"),
        ("PATCH", "/api/v1/me", "display_name=a%00", "application/x-www-form-urlencoded", "display_name"),
        # Twisted parsed multipart bodies itself and answered one it could not parse with a bare 400.
        ("POST", "/api/v1/threads/{thread}/messages", "--x--\r\n", "multipart/form-data; boundary=x", "client_msg_id"),
        ("POST", "/api/v1/threads/{thread}/messages", "", "multipart/form-data; boundary=x", "client_msg_id"),
    ],
)
def test_unstorable_input_over_http_is_a_json_400(
    server: ServerProcess,
    alice: User,
    thread: Thread,
    method: str,
    path: str,
    body: str,
    content_type: str,
    field: str,
) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="kept", client_msg_id="keep")
    headers = {"Authorization": f"Token {Token.objects.create(user=alice).key}"}
    if content_type:
        headers["Content-Type"] = content_type
    url = path.format(thread=thread.pk, message=message.pk)
    status, reply = _http(server, method, url, body.encode(), **headers)
    assert status == 400, reply
    assert reply["error"]["code"] == "invalid", reply
    assert field in reply["error"]["fields"], reply
    alice.refresh_from_db()
    assert (alice.display_name, alice.preferences) == ("Alice", {})
    assert Message.objects.count() == 1
