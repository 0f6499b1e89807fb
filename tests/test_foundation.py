"""The foundation: events leave only after commit, through the real channel layer, with gapless sequences."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

from accounts.models import User
from chatapp.broadcast import layer_message, thread_event_record, thread_group
from messaging.models import Message
from messaging.services import message_send
from tests.conftest import EventCapture, needs
from threads.models import Thread, ThreadEvent

pytestmark = pytest.mark.django_db


@pytest.mark.smoke
def test_message_send_broadcasts_after_commit(
    thread: Thread, alice: User, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        message, created = message_send(sender=alice, thread_id=thread.pk, body="hello", client_msg_id="c1")
        assert created
        assert capture.receive_all(timeout=0.3) == []  # nothing leaves before commit
    for callback in callbacks:
        callback()
    (event,) = capture.receive_all()
    assert event["type"] == "message.created"
    assert event["seq"] == message.sequence
    assert event["data"]["message"]["body"] == "hello"
    assert ThreadEvent.objects.get(thread=thread, sequence=message.sequence).payload == event


@pytest.mark.django_db(transaction=True)
def test_event_delivered_through_redis_after_commit_not_after_rollback(
    alice: User, bob: User, events: Callable[..., EventCapture]
) -> None:
    needs("redis")
    from threads.services import thread_create

    thread, _ = thread_create(creator=alice, title="t", participant_ids=[bob.pk])
    capture = events(thread_group(thread.pk))
    with pytest.raises(RuntimeError), transaction.atomic():
        thread_event_record(thread_id=thread.pk, type="probe", data={"n": 1})
        raise RuntimeError("roll back")
    assert capture.receive_all(timeout=0.5) == []
    assert not ThreadEvent.objects.filter(thread=thread, type="probe").exists()
    with transaction.atomic():
        recorded = thread_event_record(thread_id=thread.pk, type="probe", data={"n": 2})
    (event,) = capture.receive_all(timeout=2)
    assert event == recorded
    # The rolled-back allocation left no gap.
    assert recorded["seq"] == Thread.objects.get(pk=thread.pk).last_sequence
    assert list(ThreadEvent.objects.filter(thread=thread).values_list("sequence", flat=True)) == list(
        range(1, recorded["seq"] + 1)
    )


@pytest.mark.django_db(transaction=True)
def test_concurrent_sends_get_distinct_gapless_sequences(alice: User, bob: User) -> None:
    needs("postgres")
    from threads.services import thread_create

    thread, _ = thread_create(creator=alice, title="race", participant_ids=[bob.pk])
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait()
            sender = alice if n % 2 else bob
            for i in range(5):
                message_send(sender=sender, thread_id=thread.pk, body=f"m{n}-{i}", client_msg_id=f"w{n}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    seqs = sorted(Message.objects.filter(thread=thread).values_list("sequence", flat=True))
    assert len(seqs) == 40
    events_seqs = list(
        ThreadEvent.objects.filter(thread=thread).order_by("sequence").values_list("sequence", flat=True)
    )
    assert events_seqs == list(range(1, 42))  # thread.created + 40 messages, no gaps, no duplicates
    assert set(seqs) <= set(events_seqs)


@pytest.mark.smoke
def test_large_events_are_compressed_once(settings: Any) -> None:
    import zlib

    event = {"type": "message.created", "thread_id": 1, "seq": 5, "data": {"body": "x" * 20000}}
    message = layer_message(event)
    assert "z" in message
    assert zlib.decompress(message["z"], -15).decode() == message["text"]
    small = layer_message({"type": "t", "thread_id": 1, "seq": 1, "data": {}})
    assert "z" not in small


@pytest.mark.smoke
def test_embedded_default_creates_its_data_folder_and_migrates(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    data = tmp_path / "fresh" / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "AWS_"))}
    env.update({"DJANGO_DEBUG": "1", "CHATAPP_DATA_DIR": str(data), "CHATAPP_TESTING": "0"})
    result = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (data / "chatapp.sqlite3").exists()


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("name", "value"),
    [("DATABASE_URL", "mysql://x@y/z"), ("DATABASE_URL", "postgres://u@h:99999999/db"), ("REDIS_URL", "nonsense")],
)
def test_malformed_service_urls_stop_start_up_naming_the_variable(name: str, value: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DJANGO_DEBUG": "1", name: value}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert name in result.stderr


@pytest.mark.smoke
def test_database_url_options_are_kept_beside_the_pool() -> None:
    """``?sslmode=require`` in DATABASE_URL reaches psycopg: the pool settings are added, not swapped in."""
    from chatapp.settings import _database_from_url

    config = _database_from_url("postgres://u:pw@db.example:5432/chat?sslmode=require&sslrootcert=/ca.pem")
    assert config["OPTIONS"]["sslmode"] == "require"
    assert config["OPTIONS"]["sslrootcert"] == "/ca.pem"
    assert config["OPTIONS"]["pool"]["max_size"] >= 1
    assert config["OPTIONS"]["options"].startswith("-c statement_timeout=")
