"""The OpenAPI schema documents the API, and a schemathesis run over it finds no 5xx and no
response that breaks the schema, as a member and anonymously."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.models import User
from messaging.services import message_send
from threads.models import Thread

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.fixture
def api_schema(db: None) -> Iterator[Any]:
    # Like Django's test client: keep the test's connection (and its transaction) across requests.
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/schema/", WSGIHandler())
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def member_token(alice: User, bob: User, thread: Thread, settings: Any) -> str:
    message_send(sender=alice, thread_id=thread.pk, body="hello @bob", client_msg_id="seed")
    return Token.objects.create(user=bob).key


@pytest.fixture
def generous_limits(settings: Any) -> None:
    settings.CHAT_SENDS_PER_MINUTE = 100_000
    settings.API_RATE_PER_USER = "100000/m"
    settings.API_RATE_PER_IP = "100000/m"


def fuzz(schema: Any, *, max_examples: int, headers: dict[str, str], after: Callable[[Any, Any], None]) -> int:
    """Drive every operation with hypothesis-generated cases (schemathesis's pytest plugin predates pytest 9)."""
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "DELETE" and operation.path == "/api/v1/auth/token":
            continue  # revoking the fuzzing token would turn every later case into a 401

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


def test_api_fuzz_as_member(api_schema: Any, member_token: str, generous_limits: None) -> None:
    calls = fuzz(
        api_schema, max_examples=8, headers={"Authorization": f"Token {member_token}"}, after=lambda c, r: None
    )
    assert calls >= 100


def test_api_fuzz_anonymous(api_schema: Any, generous_limits: None) -> None:
    def refused(case: Any, response: Any) -> None:
        if not case.path.startswith("/api/v1/webhooks") and not case.path.startswith("/api/v1/auth/"):
            assert response.status_code in (401, 404), (case.method, case.path, response.status_code)

    assert fuzz(api_schema, max_examples=3, headers={}, after=refused) >= 30


@pytest.mark.smoke
def test_schema_documents_every_operation_with_errors(client: Any, db: None) -> None:
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
