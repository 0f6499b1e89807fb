"""The OpenAPI schema documents the API, and schemathesis, run against a LIVE server (a real daphne
process on the real PostgreSQL and Redis, as production runs), finds no 5xx: as a signed-in member
whose paths name real threads, messages, attachments and people, and anonymously. Positive cases
are also checked against the schema (status codes, content types, response bodies); negative cases
(wrong types, missing fields, out-of-range values) only for "never a 5xx".

The run is deterministic (``derandomize``: the same cases in the same order on every run) and
bounded (a few examples per operation, well within three minutes on a busy two-core machine).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.models import User
from attachments.services import attachment_upload, attachment_upload_request
from bench.servers import ServerProcess
from messaging.services import message_send, reaction_add
from tests.conftest import needs
from tests.live import start_servers
from threads.services import thread_create

# Fresh ids on every run (sequences reset), so the cases and the objects they hit are the same each time.
pytestmark = [pytest.mark.django_db(transaction=True, reset_sequences=True)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SERVER_ENV = {
    "CHATAPP_SENDS_PER_MINUTE": "1000000",
    "CHATAPP_API_RATE_PER_USER": "1000000/m",
    "CHATAPP_API_RATE_PER_IP": "1000000/m",
    "CHATAPP_AUTH_TOKEN_RATE_PER_IP": "1000000/m",
}
# A request that takes this long has hung: generous, for a busy machine.
REQUEST_TIMEOUT = 60


@pytest.fixture(scope="module")
def server(django_db_setup: None) -> Iterator[ServerProcess]:
    """One app process for the module; each test seeds (and its end flushes) the data it serves."""
    needs("postgres")
    needs("redis")
    [live] = start_servers(1, **SERVER_ENV)
    yield live
    live.close()


@pytest.fixture
def api_schema(server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(f"{server.origin}/api/schema/?format=json", timeout=REQUEST_TIMEOUT)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def seeded(transactional_db: None) -> dict[str, Any]:
    """A member (bob, the fuzzing identity) in a thread with history: messages of his and others',
    a mention, a reply, a reaction, a clean attachment and a pending one; a thread he is not in."""
    alice, bob, carol = (User.objects.create_user(name, display_name=name.title()) for name in ["ann", "bob", "cy"])
    thread, _ = thread_create(creator=alice, title="launch", participant_ids=[bob.pk, carol.pk])
    other, _ = thread_create(creator=carol, title="private", participant_ids=[alice.pk])
    mention, _ = message_send(sender=alice, thread_id=thread.pk, body="hello @bob", client_msg_id="seed-1")
    mine, _ = message_send(sender=bob, thread_id=thread.pk, body="hi all", client_msg_id="seed-2")
    reply, _ = message_send(
        sender=carol, thread_id=thread.pk, body="welcome", client_msg_id="seed-3", reply_to_id=mention.pk
    )
    reaction_add(actor=bob, message_id=mention.pk, emoji="👍")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dot.png"
        path.write_bytes(_png())
        clean = attachment_upload(uploader=bob, thread_id=thread.pk, path=path, name="dot.png")
    pending, _ = attachment_upload_request(
        uploader=bob, thread_id=thread.pk, name="later.png", size=100, content_type="image/png"
    )
    return {
        "token": Token.objects.create(user=bob).key,
        # Real values for path parameters, drawn half of the time instead of generated ones.
        "path": {
            "thread_id": [thread.pk, other.pk],
            "message_id": [mention.pk, mine.pk, reply.pk],
            "attachment_id": [clean.pk, pending.pk],
            "user_id": [alice.pk, bob.pk, carol.pk],
            "emoji": ["👍"],
        },
    }


def _nested(depth: int, leaf: Any = 1) -> Any:
    for _ in range(depth):
        leaf = {"a": [leaf]} if depth % 2 else [leaf]
    return leaf


# What PostgreSQL cannot store (or nesting past every bound), planted in a quarter of the generated
# cases: schemathesis itself strips control characters from paths and generates only text that
# encodes as UTF-8. A URL carries NUL; a JSON body can also carry a lone surrogate (as "\ud800").
URL_POISON = ["a\x00b", "\x00"]
BODY_POISON = [*URL_POISON, "\ud800", "x\udfffy", {"k\x00": 1}, {"\udc00": "v"}, [_nested(400)], _nested(400, "x")]


def _poison(case: Any, data: st.DataObject) -> None:
    """Plant one unstorable value in the case: a path parameter, a query parameter (a new one when
    it has none) or a field of its JSON body."""
    targets = [("path", name) for name in sorted(case.path_parameters or {})]
    targets += [("query", name) for name in sorted(case.query or {})] or [("query", "q")]
    if case.media_type == "application/json" and isinstance(case.body, dict):
        targets += [("body", name) for name in sorted(case.body)] or [("body", "title")]
    where, name = data.draw(st.sampled_from(targets), label="poisoned")
    if where == "path":
        case.path_parameters[name] = data.draw(st.sampled_from(URL_POISON), label="value")
    elif where == "query":
        case.query = {**(case.query or {}), name: data.draw(st.sampled_from(URL_POISON), label="value")}
    else:
        case.body[name] = data.draw(st.sampled_from(BODY_POISON), label="value")


def fuzz(schema: Any, *, max_examples: int, headers: dict[str, str], after: Callable[[Any, Any], None]) -> int:
    """In process (a schema with ``.app`` set): positive cases of every operation, all checks. For
    a part of the API on its own (test_attachments_fuzz.py); the whole API runs live (:func:`fuzz_live`)."""
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
        )
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            after(case, response)

        run()
    return calls


def _destructive(operation: Any) -> bool:
    """Operations that end the member's access to the seeded data run last (in schema order)."""
    return operation.method.upper() == "DELETE" or operation.path.endswith("/leave")


def fuzz_live(
    schema: Any,
    server: ServerProcess,
    *,
    examples: int,
    headers: dict[str, str],
    real_paths: dict[str, list[Any]],
    after: Callable[[Any, Any], None] = lambda case, response: None,
) -> int:
    """Drive every operation with generated cases against the live server; fail on any 5xx (with the
    server's errors) and, for positive cases, on any answer the schema does not document."""
    session = requests.Session()
    calls = 0
    failures: list[str] = []

    def run_operation(operation: Any, mode: GenerationMode, checks: list[Any], count: int) -> None:
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        @hypothesis_settings(
            max_examples=count,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: report the case as found
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any, data: st.DataObject) -> None:
            nonlocal calls
            for name in list(case.path_parameters or {}):
                if name in real_paths and data.draw(st.booleans(), label=f"real {name}"):
                    case.path_parameters[name] = data.draw(st.sampled_from(real_paths[name]), label=name)
            poisoned = data.draw(st.integers(0, 3), label="poison?") == 0
            if poisoned:
                _poison(case, data)
            calls += 1
            response = case.call_and_validate(
                base_url=server.origin,
                session=session,
                headers=headers,
                checks=[not_a_server_error] if poisoned else checks,
                timeout=REQUEST_TIMEOUT,
            )
            if poisoned:  # refused, in the one shape, whatever the operation
                assert 400 <= response.status_code < 500, (case.method, case.path, response.status_code, response.text)
                error = response.json()["error"]
                assert response.status_code != 400 or error["code"] in ("invalid", "malformed"), response.text
            after(case, response)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # collected: one run reports every failing operation
            failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in sorted(operations, key=_destructive):
        if operation.method.upper() == "DELETE" and operation.path == "/api/v1/auth/token":
            continue  # revoking the fuzzing token would turn every later case into a 401
        run_operation(operation, GenerationMode.POSITIVE, CHECKS, examples)
        run_operation(operation, GenerationMode.NEGATIVE, [not_a_server_error], max(1, examples // 2))
    errors = [line for line in server.output().splitlines() if '"level": "ERROR"' in line]
    assert not failures, "\n\n".join(failures) + "\n\nserver errors:\n" + "\n".join(errors)
    return calls


def test_api_fuzz_as_member(api_schema: Any, server: ServerProcess, seeded: dict[str, Any]) -> None:
    calls = fuzz_live(
        api_schema,
        server,
        examples=20,
        headers={"Authorization": f"Token {seeded['token']}"},
        real_paths=seeded["path"],
    )
    assert calls >= 600


def test_api_fuzz_anonymous(api_schema: Any, server: ServerProcess, seeded: dict[str, Any]) -> None:
    def refused(case: Any, response: Any) -> None:
        if not case.path.startswith("/api/v1/webhooks") and not case.path.startswith("/api/v1/auth/"):
            assert response.status_code in (400, 401, 404), (case.method, case.path, response.status_code)

    assert fuzz_live(api_schema, server, examples=6, headers={}, real_paths=seeded["path"], after=refused) >= 100


@pytest.mark.smoke
@pytest.mark.django_db
def test_schema_documents_every_operation_with_errors(client: Any) -> None:
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) >= 25
    assert "/api/v1/threads/{thread_id}/messages" in spec["paths"]
    for path, method, op in operations:
        if path.startswith("/api/v1/webhooks") or path == "/api/v1/auth/token":
            continue
        assert "401" in op["responses"], (method, path)
        assert "summary" in op, (method, path)
    assert client.get("/api/docs/").status_code == 200
