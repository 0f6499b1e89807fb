"""Schemathesis over the attachment endpoints alone: no 5xx and every answer matches the documented schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.urls import include, path
from drf_spectacular.generators import SchemaGenerator
from rest_framework.authtoken.models import Token

from accounts.models import User
from attachments.services import attachment_upload
from messaging.services import message_send
from tests.test_api_schema import fuzz
from tests.test_attachments import png_bytes
from threads.models import Thread


@pytest.fixture
def attachment_schema(db: None) -> Iterator[Any]:
    import chatapp.api_urls  # registers the <id:...> converter
    import chatapp.schema  # noqa: F401 - the authentication schemes

    generator = SchemaGenerator(patterns=[path("api/v1/", include("attachments.urls"))])
    spec = json.loads(json.dumps(generator.get_schema(request=None, public=True), default=str))
    schema = schemathesis.openapi.from_dict(spec)
    schema.app = WSGIHandler()
    # Like Django's test client: keep the test's connection (and its transaction) across requests.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schema
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_attachment_api_fuzz(
    attachment_schema: Any, alice: User, bob: User, thread: Thread, settings: Any, tmp_path: Path
) -> None:
    settings.API_RATE_PER_USER = "100000/m"
    settings.API_RATE_PER_IP = "100000/m"
    # Seeded through the service: Django's test client would reconnect close_old_connections.
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    attachment = attachment_upload(uploader=bob, thread_id=thread.pk, path=image, name="a.png")
    message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="seed", attachment_ids=[attachment.pk])
    token = Token.objects.create(user=bob).key
    assert (
        fuzz(attachment_schema, max_examples=10, headers={"Authorization": f"Token {token}"}, after=lambda c, r: None)
        >= 40
    )

    def refused(case: Any, response: Any) -> None:
        assert response.status_code in (401, 404), (case.method, case.path, response.status_code)

    assert fuzz(attachment_schema, max_examples=3, headers={}, after=refused) >= 9
