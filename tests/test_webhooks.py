"""Clerk webhooks at POST /api/v1/webhooks/clerk, signed with svix's own library.

Each event type, idempotency by svix-id (also under a real concurrent race on PostgreSQL),
out-of-order updates, and every way a delivery can fail verification (4xx, nothing changes).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import User, WebhookDelivery
from accounts.services import user_token_issue
from chatapp.broadcast import user_group
from messaging.models import Message
from messaging.services import message_send
from tests.clerk_fixtures import ClerkEnv, clerk_environment, clerk_event, clerk_user_payload
from tests.conftest import EventCapture, needs

pytestmark = pytest.mark.django_db

URL = "/api/v1/webhooks/clerk"
CLERK_ID = "user_2abcDEFghiJKLmno"


@pytest.fixture
def clerk(settings: Any) -> Iterator[ClerkEnv]:
    with clerk_environment(settings) as env:
        yield env


def deliver(clerk: ClerkEnv, body: str, *, headers: dict[str, str] | None = None, **signing: Any) -> Any:
    """POST ``body`` as Svix would (signed now, fresh svix-id) unless ``headers`` are given."""
    sent = headers if headers is not None else clerk.svix_headers(body, **signing)
    return Client().post(URL, data=body, content_type="application/json", headers=sent)


def user_event(clerk: ClerkEnv, event_type: str = "user.created", **fields: Any) -> Any:
    return deliver(clerk, clerk_event(event_type, clerk_user_payload(**fields)))


def assert_error_shape(response: Any, status: int) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"])


# --- Each event type ------------------------------------------------------------------------------


@pytest.mark.smoke
def test_user_created_creates_the_local_user(clerk: ClerkEnv) -> None:
    response = user_event(clerk)
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "processed"}
    user = User.objects.get(clerk_id=CLERK_ID)
    assert (user.username, user.email, user.first_name, user.last_name) == (
        "ada",
        "ada@example.test",
        "Ada",
        "Lovelace",
    )
    assert user.avatar_url == "https://img.clerk.com/ada.png"
    assert user.clerk_updated_at == 1_700_000_000_000
    assert user.is_active
    assert not user.has_usable_password()
    delivery = WebhookDelivery.objects.get()
    assert delivery.event_type == "user.created"
    assert "ada@example.test" not in json.dumps(delivery.payload)  # ids only: no personal data kept


@pytest.mark.smoke
def test_webhook_fills_in_a_user_first_seen_through_a_token(clerk: ClerkEnv) -> None:
    me = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}")
    assert me.status_code == 200
    placeholder = User.objects.get(clerk_id=CLERK_ID)
    assert placeholder.username == CLERK_ID
    assert user_event(clerk).status_code == 200
    user = User.objects.get(clerk_id=CLERK_ID)
    assert user.pk == placeholder.pk
    assert (user.username, user.email) == ("ada", "ada@example.test")


@pytest.mark.smoke
def test_user_updated_applies_and_broadcasts(
    clerk: ClerkEnv, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    user_event(clerk)
    user = User.objects.get(clerk_id=CLERK_ID)
    capture = events(user_group(user.pk))
    with django_capture_on_commit_callbacks(execute=True):
        response = user_event(
            clerk, "user.updated", username="ada.l", first_name="Augusta", updated_at=1_700_000_000_500
        )
    assert response.json() == {"status": "processed"}
    user.refresh_from_db()
    assert (user.username, user.first_name, user.clerk_updated_at) == ("ada.l", "Augusta", 1_700_000_000_500)
    assert [e["type"] for e in capture.receive_all()] == ["user.updated"]


@pytest.mark.smoke
def test_older_update_is_ignored(clerk: ClerkEnv) -> None:
    user_event(clerk, "user.updated", first_name="Newer", updated_at=1_700_000_002_000)
    response = user_event(clerk, "user.created", first_name="Older", updated_at=1_700_000_001_000)
    assert response.status_code == 200
    assert response.json() == {"status": "ignored"}
    user = User.objects.get(clerk_id=CLERK_ID)
    assert (user.first_name, user.clerk_updated_at) == ("Newer", 1_700_000_002_000)
    assert WebhookDelivery.objects.count() == 2  # recorded, so a redelivery is a duplicate too


@pytest.mark.smoke
def test_username_taken_locally_gets_a_suffix(clerk: ClerkEnv, make_user: Callable[..., User]) -> None:
    make_user("ada")
    user_event(clerk)
    assert User.objects.get(clerk_id=CLERK_ID).username == "ada-2"


@pytest.mark.smoke
def test_user_deleted_deactivates_anonymises_keeps_messages_and_locks_out(
    clerk: ClerkEnv, bob: User, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    from threads.services import thread_create

    jwt_token = clerk.token()
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {jwt_token}").status_code == 200
    user_event(clerk)
    user = User.objects.get(clerk_id=CLERK_ID)
    api_token = user_token_issue(user=user)
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Token {api_token}").status_code == 200
    thread, _ = thread_create(creator=user, title="t", participant_ids=[bob.pk])
    message, _ = message_send(sender=user, thread_id=thread.pk, body="keep me", client_msg_id="k1")
    capture = events(user_group(user.pk))

    with django_capture_on_commit_callbacks(execute=True):
        response = deliver(clerk, clerk_event("user.deleted", {"object": "user", "id": CLERK_ID, "deleted": True}))

    assert response.status_code == 200, response.content
    assert response.json() == {"status": "processed"}
    assert "user.deactivated" in [e["type"] for e in capture.receive_all()]
    user.refresh_from_db()
    assert not user.is_active
    assert user.deactivated_at is not None
    assert (user.username, user.email, user.first_name, user.last_name) == (f"deleted-{user.pk}", "", "", "")
    assert Message.objects.get(pk=message.pk).body == "keep me"
    # Their next request is refused, whichever credential it carries.
    for header in (f"Token {api_token}", f"Bearer {jwt_token}", f"Bearer {clerk.token()}"):
        response = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401, header
        assert response.json()["error"]["code"] == "unauthenticated"
    # A late update does not bring them back.
    assert user_event(clerk, "user.updated", updated_at=1_800_000_000_000).json() == {"status": "ignored"}
    user.refresh_from_db()
    assert not user.is_active
    assert user.username == f"deleted-{user.pk}"


@pytest.mark.smoke
def test_user_deleted_before_created_leaves_a_tombstone(clerk: ClerkEnv) -> None:
    deliver(clerk, clerk_event("user.deleted", {"object": "user", "id": CLERK_ID, "deleted": True}))
    assert user_event(clerk).json() == {"status": "ignored"}
    user = User.objects.get(clerk_id=CLERK_ID)
    assert not user.is_active
    assert user.email == ""
    response = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}")
    assert response.status_code == 401


@pytest.mark.smoke
@pytest.mark.parametrize("event_type", ["session.revoked", "session.ended", "session.removed"])
def test_session_end_refuses_that_sessions_tokens(
    clerk: ClerkEnv,
    event_type: str,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    revoked = clerk.token(sid="sess_revoked")
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {revoked}").status_code == 200
    user = User.objects.get(clerk_id=CLERK_ID)
    capture = events(user_group(user.pk))
    session = {"object": "session", "id": "sess_revoked", "user_id": CLERK_ID, "status": event_type.split(".")[1]}
    with django_capture_on_commit_callbacks(execute=True):
        response = deliver(clerk, clerk_event(event_type, session))
    assert response.json() == {"status": "processed"}
    assert [(e["type"], e["data"]) for e in capture.receive_all()] == [
        ("session.revoked", {"session_id": "sess_revoked"})
    ]
    refused = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {revoked}")
    assert refused.status_code == 401
    other = clerk.token(sid="sess_other")
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {other}").status_code == 200


@pytest.mark.smoke
def test_a_clerk_ban_deactivates_and_an_unban_undoes_only_the_ban(
    clerk: ClerkEnv, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    from accounts.services import user_deactivate

    def update(updated_at: int, **fields: Any) -> Any:
        return deliver(clerk, clerk_event("user.updated", {**clerk_user_payload(updated_at=updated_at), **fields}))

    user_event(clerk)
    user = User.objects.get(clerk_id=CLERK_ID)
    capture = events(user_group(user.pk))
    with django_capture_on_commit_callbacks(execute=True):
        assert update(1_700_000_000_100, banned=True).json() == {"status": "processed"}
    assert "user.deactivated" in [e["type"] for e in capture.receive_all()]  # their sockets close (4403)
    user.refresh_from_db()
    assert not user.is_active
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}").status_code == 401
    update(1_700_000_000_200, banned=False)
    user.refresh_from_db()
    assert user.is_active
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}").status_code == 200
    # A deactivation by staff is not Clerk's to undo.
    user_deactivate(actor=None, user=user, reason="spam")
    update(1_700_000_000_300, banned=False)
    user.refresh_from_db()
    assert not user.is_active


@pytest.mark.smoke
def test_unknown_event_type_is_acknowledged_and_ignored(clerk: ClerkEnv) -> None:
    response = deliver(clerk, clerk_event("organization.created", {"object": "organization", "id": "org_1"}))
    assert response.status_code == 200
    assert response.json() == {"status": "ignored"}
    assert WebhookDelivery.objects.get().event_type == "organization.created"
    assert not User.objects.exists()


# --- Idempotency -----------------------------------------------------------------------------------


@pytest.mark.smoke
def test_redelivery_is_2xx_and_changes_nothing(clerk: ClerkEnv) -> None:
    body = clerk_event("user.created", clerk_user_payload())
    headers = clerk.svix_headers(body, msg_id="msg_once")
    assert deliver(clerk, body, headers=headers).json() == {"status": "processed"}
    user = User.objects.get(clerk_id=CLERK_ID)
    User.objects.filter(pk=user.pk).update(first_name="Changed locally since")
    again = deliver(clerk, body, headers=headers)
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate"}
    # Svix re-signs a retry with a new timestamp; the svix-id is what makes it the same delivery.
    resigned = deliver(clerk, body, msg_id="msg_once")
    assert resigned.json() == {"status": "duplicate"}
    assert User.objects.get(pk=user.pk).first_name == "Changed locally since"
    assert WebhookDelivery.objects.filter(svix_id="msg_once").count() == 1
    assert User.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_duplicates_make_one_row_and_both_succeed(clerk: ClerkEnv) -> None:
    needs("postgres")
    body = clerk_event("user.created", clerk_user_payload())
    headers = clerk.svix_headers(body, msg_id="msg_race")
    start = threading.Barrier(2)
    results: list[Any] = []
    errors: list[BaseException] = []

    def post() -> None:
        try:
            start.wait(5)
            results.append(Client().post(URL, data=body, content_type="application/json", headers=headers))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(r.status_code for r in results) == [200, 200]
    assert sorted(r.json()["status"] for r in results) == ["duplicate", "processed"]
    assert WebhookDelivery.objects.filter(svix_id="msg_race").count() == 1
    assert User.objects.filter(clerk_id=CLERK_ID).count() == 1


# --- Deliveries that must not verify ----------------------------------------------------------------


def _other_secret(clerk: ClerkEnv, body: str) -> dict[str, str]:
    return clerk.svix_headers(body, secret="whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY")


def _without(name: str) -> Callable[[ClerkEnv, str], dict[str, str]]:
    def headers(clerk: ClerkEnv, body: str) -> dict[str, str]:
        signed = clerk.svix_headers(body)
        del signed[name]
        return signed

    return headers


def _replace(name: str, value: str) -> Callable[[ClerkEnv, str], dict[str, str]]:
    def headers(clerk: ClerkEnv, body: str) -> dict[str, str]:
        return {**clerk.svix_headers(body), name: value}

    return headers


BAD_DELIVERIES: dict[str, Callable[[ClerkEnv, str], dict[str, str]]] = {
    "wrong_secret": _other_secret,
    "timestamp_too_old": lambda c, b: c.svix_headers(b, timestamp=datetime.now(tz=UTC) - timedelta(minutes=10)),
    "timestamp_too_new": lambda c, b: c.svix_headers(b, timestamp=datetime.now(tz=UTC) + timedelta(minutes=10)),
    "body_altered_after_signing": lambda c, b: c.svix_headers(b.replace('"ada"', '"mallory"')),
    "svix_id_altered_after_signing": lambda c, b: {**c.svix_headers(b), "svix-id": "msg_other"},
    "missing_svix_id": _without("svix-id"),
    "missing_svix_timestamp": _without("svix-timestamp"),
    "missing_svix_signature": _without("svix-signature"),
    "signature_not_versioned": _replace("svix-signature", "nonsense"),
    "signature_not_base64": _replace("svix-signature", "v1,@@@not-base64@@@"),
    "timestamp_not_a_number": _replace("svix-timestamp", "yesterday"),
}


@pytest.mark.smoke
@pytest.mark.parametrize("name", sorted(BAD_DELIVERIES))
def test_bad_delivery_is_refused_and_changes_nothing(clerk: ClerkEnv, name: str) -> None:
    body = clerk_event("user.created", clerk_user_payload())
    response = deliver(clerk, body, headers=BAD_DELIVERIES[name](clerk, body))
    assert_error_shape(response, 400)
    assert response.json()["error"]["code"] == "invalid_signature"
    assert not WebhookDelivery.objects.exists()
    assert not User.objects.exists()


@pytest.mark.smoke
@pytest.mark.parametrize("secret", ["", "whsec_"])
def test_webhook_without_a_secret_configured_is_refused(clerk: ClerkEnv, secret: str) -> None:
    body = clerk_event("user.created", clerk_user_payload())
    headers = clerk.svix_headers(body)
    clerk.settings.CLERK_WEBHOOK_SECRET = secret
    response = deliver(clerk, body, headers=headers)
    assert_error_shape(response, 404)
    assert response.json()["error"]["code"] == "not_configured"
    assert not WebhookDelivery.objects.exists()
    assert not User.objects.exists()


@pytest.mark.smoke
@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        "[1, 2, 3]",
        json.dumps({"type": "user.created"}),
        json.dumps({"type": "user.created", "data": {"object": "user"}}),
        json.dumps({"type": "session.revoked", "data": {"object": "session"}}),
    ],
)
def test_signed_but_malformed_event_is_400_and_changes_nothing(clerk: ClerkEnv, body: str) -> None:
    response = deliver(clerk, body)
    assert_error_shape(response, 400)
    assert not WebhookDelivery.objects.exists()
    assert not User.objects.exists()


@pytest.mark.smoke
def test_webhook_needs_no_csrf_and_ignores_credentials(clerk: ClerkEnv) -> None:
    body = clerk_event("user.created", clerk_user_payload())
    client = Client(enforce_csrf_checks=True)
    response = client.post(
        URL,
        data=body,
        content_type="application/json",
        headers={**clerk.svix_headers(body), "Authorization": "Bearer forged.token.value"},
    )
    assert response.status_code == 200, response.content
    assert Client().get(URL).status_code == 405
