"""backup_db / restore_db: a PostgreSQL backup restored into an empty database is identical
(every table's rows and every sequence); the SQLite path round-trips; retention and refusals."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from psycopg import sql

from accounts.models import User
from attachments.models import Attachment, AttachmentKind, ScanStatus
from chatapp.backups import NAME_RE, LocalStore, S3Store, backup_store
from messaging.models import Message
from messaging.services import message_edit, message_send, reaction_add, receipt_mark
from tests.conftest import needs
from threads.services import thread_create


def run(*args: Any) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip()


def make_chat_data(alice: User, bob: User, carol: User) -> None:
    """Threads, messages (with a reply, an edit, reactions, receipts) and attachments, via the services."""
    general, _ = thread_create(creator=alice, title="General", participant_ids=[bob.pk, carol.pk])
    direct, _ = thread_create(creator=bob, participant_ids=[carol.pk], kind="DIRECT")
    first, _ = message_send(sender=alice, thread_id=general.pk, body="Ship it **today**, @bob", client_msg_id="a-1")
    reply, _ = message_send(
        sender=bob, thread_id=general.pk, body="On it ✅", client_msg_id="b-1", reply_to_id=first.pk
    )
    message_send(sender=carol, thread_id=direct.pk, body="psst", client_msg_id="c-1")
    message_edit(actor=bob, message_id=reply.pk, body="On it ✅ (after lunch)", expected_version=1)
    reaction_add(actor=carol, message_id=first.pk, emoji="👍")
    receipt_mark(user=bob, thread_id=general.pk, read_up_to=first.sequence)
    for n, message in enumerate([first, None]):
        Attachment.objects.create(
            uploader=alice,
            thread=general,
            message=message,
            storage_key=f"attachments/{general.pk}/{n}-{secrets.token_hex(4)}.png",
            original_name=f"diagram-{n}.png",
            content_type="image/png",
            declared_size=1234,
            size=1234,
            checksum="ab" * 32,
            kind=AttachmentKind.IMAGE,
            scan_status=ScanStatus.CLEAN if message else ScanStatus.PENDING,
            width=64,
            height=48,
        )


# --- PostgreSQL ---------------------------------------------------------------------------------


def _server_conninfo(dbname: str) -> tuple[str, str]:
    conf = connection.settings_dict
    info = psycopg.conninfo.make_conninfo(dbname=dbname, user=conf["USER"], host=conf["HOST"], port=str(conf["PORT"]))
    return info, conf["PASSWORD"]


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server; yields its URL and drops it afterwards."""
    needs("postgres")
    name = f"chatapp_restore_{secrets.token_hex(4)}"
    info, password = _server_conninfo("postgres")
    with psycopg.connect(info, password=password, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conf = connection.settings_dict
    try:
        yield f"postgres://{conf['USER']}:{conf['PASSWORD']}@{conf['HOST']}:{conf['PORT']}/{name}"
    finally:
        with psycopg.connect(info, password=password, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def snapshot(dbname: str) -> dict[str, Any]:
    """Every table's rows (as text, sorted) and every sequence's state, read with plain psycopg."""
    info, password = _server_conninfo(dbname)
    with psycopg.connect(info, password=password) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
            )
        ]
        rows = {
            table: sorted(
                row[0] for row in conn.execute(sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier(table)))
            )
            for table in tables
        }
        sequences = sorted(
            conn.execute("SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'").fetchall()
        )
    return {"tables": tables, "rows": rows, "sequences": sequences}


@pytest.mark.django_db(transaction=True)
def test_postgres_backup_restores_into_an_empty_database_identically(
    alice: User, bob: User, carol: User, empty_database: str, settings: Any
) -> None:
    needs("s3")
    make_chat_data(alice, bob, carol)
    store = backup_store()
    assert isinstance(store, S3Store)  # the default storage is S3: backups go under backups/ in its bucket
    name = run("backup_db")
    assert NAME_RE.match(name)
    assert name.endswith(".pgdump")
    assert name in store.names()
    keys = [item["Key"] for item in store.client.list_objects_v2(Bucket=store.bucket, Prefix="backups/")["Contents"]]
    assert f"backups/{name}" in keys

    run("restore_db", name, "--database-url", empty_database, "--noinput")

    source, restored = snapshot(connection.settings_dict["NAME"]), snapshot(empty_database.rsplit("/", 1)[1])
    app_tables = {
        "accounts_user",
        "threads_thread",
        "threads_threadevent",
        "messaging_message",
        "attachments_attachment",
    }
    assert app_tables <= set(source["tables"])
    assert restored["tables"] == source["tables"]
    for table in source["tables"]:
        assert len(restored["rows"][table]) == len(source["rows"][table]), table
        assert restored["rows"][table] == source["rows"][table], table
    assert restored["sequences"] == source["sequences"]
    assert len(source["rows"]["messaging_message"]) == 3
    assert len(source["rows"]["attachments_attachment"]) == 2


# --- retention, listing, refusals (any database) -----------------------------------------------


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_backups_keep_only_the_newest(settings: Any, tmp_path: Path, alice: User) -> None:
    settings.BACKUP_DIR = str(tmp_path)
    settings.BACKUP_KEEP = 2
    names = [run("backup_db") for _ in range(3)]
    assert names == sorted(names)
    store = backup_store()
    assert isinstance(store, LocalStore)
    assert store.names() == names[1:]
    assert sorted(path.name for path in tmp_path.iterdir()) == names[1:]  # no partial files left behind
    assert all((tmp_path / name).stat().st_mode & 0o077 == 0 for name in names[1:])
    assert run("restore_db", "--list").splitlines() == names[:0:-1]
    assert run("backup_db", "--keep", "1") not in names
    assert len(store.names()) == 1


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_restore_refuses_unknown_names_and_the_wrong_database_kind(settings: Any, tmp_path: Path) -> None:
    settings.BACKUP_DIR = str(tmp_path)
    with pytest.raises(CommandError, match="No backups"):
        run("restore_db", "--latest", "--noinput")
    name = run("backup_db")
    with pytest.raises(CommandError, match="not a backup name"):
        run("restore_db", "../../etc/passwd", "--noinput")
    with pytest.raises(CommandError, match="Give a backup name or --latest"):
        run("restore_db", name, "--latest", "--noinput")
    other = "sqlite:///" + str(tmp_path / "x.sqlite3") if name.endswith(".pgdump") else "postgres://u:p@h:5432/db"
    with pytest.raises(CommandError, match="cannot be restored into"):
        run("restore_db", name, "--database-url", other, "--noinput")


# --- the configured database (SQLite on the embedded default, PostgreSQL under make test) -------


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_restore_latest_brings_the_configured_database_back(
    alice: User, bob: User, carol: User, settings: Any, tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    settings.BACKUP_DIR = str(tmp_path / "backups")
    with django_capture_on_commit_callbacks(execute=True):
        make_chat_data(alice, bob, carol)
    models = (User, Message, Attachment)
    before = {model: list(model.objects.order_by("pk").values()) for model in models}
    name = run("backup_db")
    expected_kind = {"sqlite": ".sqlite3.gz", "postgresql": ".pgdump"}[connection.vendor]
    assert name.endswith(expected_kind)
    packed = (tmp_path / "backups" / name).read_bytes()
    assert packed[:5] == b"PGDMP" if connection.vendor == "postgresql" else packed[:2] == b"\x1f\x8b"  # -Fc / gzip

    Message.objects.all().delete()
    User.objects.create(username="after-backup")
    assert run("restore_db", "--latest", "--noinput").startswith(f"restored {name}")
    assert {model: list(model.objects.order_by("pk").values()) for model in models} == before


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_sqlite_backup_restores_into_another_file(tmp_path: Path, settings: Any, alice: User, bob: User) -> None:
    """The embedded default: SQLite's online backup API, gzip, restored into a file named by URL.
    Under make test the configured database is PostgreSQL, so this runs in the smoke part."""
    assert connection.vendor in ("sqlite", "postgresql")
    settings.BACKUP_DIR = str(tmp_path)
    thread, _ = thread_create(creator=alice, title="Backups", participant_ids=[bob.pk])
    name = run("backup_db")
    if connection.vendor == "postgresql":
        with pytest.raises(CommandError, match="cannot be restored into SQLite"):
            run("restore_db", name, "--database-url", f"sqlite:///{tmp_path / 'copy.sqlite3'}", "--noinput")
        return
    copy = tmp_path / "copy.sqlite3"
    run("restore_db", name, "--database-url", f"sqlite:///{copy}", "--noinput")
    import sqlite3

    with sqlite3.connect(copy) as restored:
        assert restored.execute("SELECT title FROM threads_thread WHERE id = ?", [thread.pk]).fetchone() == ("Backups",)
        assert restored.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.smoke
def test_backup_store_selection(settings: Any, tmp_path: Path) -> None:
    settings.BACKUP_DIR = ""
    settings.BACKUP_BUCKET = ""
    settings.DATA_DIR = tmp_path
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {}},
    }
    store = backup_store()
    assert isinstance(store, LocalStore)
    assert store.folder == tmp_path / "backups"
    settings.BACKUP_BUCKET = "chatapp-backups"
    store = backup_store()
    assert isinstance(store, S3Store)
    assert store.bucket == "chatapp-backups"
    settings.BACKUP_DIR = str(tmp_path / "elsewhere")
    store = backup_store()
    assert isinstance(store, LocalStore)
    assert store.folder == tmp_path / "elsewhere"
