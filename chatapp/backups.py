"""Database backups: create, list, prune and restore (``manage.py backup_db`` / ``restore_db``).

- PostgreSQL: ``pg_dump --format=custom`` (compressed) with the pg_dump of the server's major
  version; restored with ``pg_restore --clean --if-exists --no-owner`` in one transaction.
- SQLite (the embedded default): SQLite's online backup API, gzip-compressed; restored with the
  same API into the target database.

Where backups go, first match wins: ``CHATAPP_BACKUP_DIR`` (a local folder);
``CHATAPP_BACKUP_BUCKET`` (a dedicated S3 bucket); the attachments bucket when the default
storage is S3; else ``DATA_DIR/backups``. S3 keys live under ``backups/``. The newest
``CHATAPP_BACKUP_KEEP`` backups are kept, older ones are deleted after each successful backup.
Names sort by time: ``chatapp-20260121T030000123456Z.pgdump`` / ``...Z.sqlite3.gz``.
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, connections

logger = logging.getLogger("chatapp.backups")

S3_PREFIX = "backups/"
NAME_RE = re.compile(r"^chatapp-\d{8}T\d{12}Z\.(?P<ext>pgdump|sqlite3\.gz)$")
EXTENSIONS = {"postgresql": "pgdump", "sqlite": "sqlite3.gz"}


class BackupError(CommandError):
    """A backup or restore could not be done; the message says why and what to do."""


# --- where backups live -----------------------------------------------------------------------


class BackupStore(Protocol):
    description: str

    def names(self) -> list[str]: ...
    def put(self, name: str, source: Path) -> None: ...
    def get(self, name: str, target: Path) -> None: ...
    def delete(self, name: str) -> None: ...


def _sorted_backups(names: list[str]) -> list[str]:
    """Backup names only, oldest first (the timestamp makes the names sort by time)."""
    return sorted(name for name in names if NAME_RE.match(name))


class LocalStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = f"folder {folder}"

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return _sorted_backups([entry.name for entry in self.folder.iterdir() if entry.is_file()])

    def put(self, name: str, source: Path) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{name}.partial"
        try:
            shutil.copyfile(source, partial)
            partial.chmod(0o600)  # a backup holds every message
            os.replace(partial, self.folder / name)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def get(self, name: str, target: Path) -> None:
        source = self.folder / name
        if not source.is_file():
            raise BackupError(f"No backup named {name} in {self.description}.")
        shutil.copyfile(source, target)

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


class S3Store:
    def __init__(self, bucket: str) -> None:
        import boto3

        options = settings.STORAGES["default"].get("OPTIONS", {})
        self.bucket = bucket
        self.description = f"s3://{bucket}/{S3_PREFIX}"
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.AWS_S3_ENDPOINT_URL,
            region_name=settings.AWS_S3_REGION_NAME,
            aws_access_key_id=settings.AWS_ACCESS_KEY_ID,
            aws_secret_access_key=settings.AWS_SECRET_ACCESS_KEY,
            config=_boto_config(options.get("addressing_style", "auto")),
        )

    def names(self) -> list[str]:
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=S3_PREFIX):
            found.extend(item["Key"][len(S3_PREFIX) :] for item in page.get("Contents", []))
        return _sorted_backups(found)

    def put(self, name: str, source: Path) -> None:
        self.client.upload_file(
            str(source), self.bucket, S3_PREFIX + name, ExtraArgs={"ContentType": "application/octet-stream"}
        )

    def get(self, name: str, target: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, S3_PREFIX + name, str(target))
        except ClientError as exc:
            raise BackupError(f"Could not fetch backup {name} from {self.description}: {exc}") from None

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=S3_PREFIX + name)


def _boto_config(addressing_style: str) -> Any:
    from botocore.config import Config

    return Config(signature_version="s3v4", s3={"addressing_style": addressing_style})


def backup_store() -> BackupStore:
    """Where backups are written and read (see the module docstring for the order)."""
    if settings.BACKUP_DIR:
        return LocalStore(Path(settings.BACKUP_DIR))
    if settings.BACKUP_BUCKET:
        return S3Store(settings.BACKUP_BUCKET)
    if settings.STORAGES["default"]["BACKEND"].endswith("S3Storage") and settings.AWS_STORAGE_BUCKET_NAME:
        return S3Store(settings.AWS_STORAGE_BUCKET_NAME)
    return LocalStore(Path(settings.DATA_DIR) / "backups")


# --- databases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A database to dump or restore into, from Django's settings or a URL."""

    vendor: str
    name: str
    user: str = ""
    password: str = ""
    host: str = ""
    port: str = ""
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls, alias: str = DEFAULT_DB_ALIAS) -> Database:
        wrapper = connections[alias]
        conf = wrapper.settings_dict
        options = tuple(
            (key, str(value)) for key, value in conf.get("OPTIONS", {}).items() if key in ("sslmode", "sslrootcert")
        )
        return cls(
            vendor=wrapper.vendor,
            name=str(conf["NAME"]),
            user=conf.get("USER") or "",
            password=conf.get("PASSWORD") or "",
            host=conf.get("HOST") or "",
            port=str(conf.get("PORT") or ""),
            options=options,
        )

    @classmethod
    def from_url(cls, url: str) -> Database:
        import dj_database_url

        try:
            conf = dj_database_url.parse(url)
        except Exception as exc:
            raise BackupError(f"--database-url could not be parsed: {exc}") from None
        engine = str(conf.get("ENGINE", ""))
        vendor = "postgresql" if "postgresql" in engine else "sqlite" if "sqlite" in engine else engine
        if vendor not in EXTENSIONS:
            raise BackupError(f"--database-url must be a postgres:// or sqlite:/// URL, got engine {engine!r}.")
        options = tuple(
            (key, str(value)) for key, value in (conf.get("OPTIONS") or {}).items() if key in ("sslmode", "sslrootcert")
        )
        return cls(
            vendor=vendor,
            name=str(conf.get("NAME") or ""),
            user=str(conf.get("USER") or ""),
            password=str(conf.get("PASSWORD") or ""),
            host=str(conf.get("HOST") or ""),
            port=str(conf.get("PORT") or ""),
            options=options,
        )

    def conninfo(self) -> str:
        """A libpq connection string without the password (that goes in PGPASSWORD, not on argv)."""
        from psycopg.conninfo import make_conninfo

        params = {"dbname": self.name, "user": self.user, "host": self.host, "port": self.port, **dict(self.options)}
        return make_conninfo(**{key: value for key, value in params.items() if value})

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def server_major(self) -> int:
        import psycopg

        try:
            with psycopg.connect(self.conninfo(), password=self.password or None, connect_timeout=10) as conn:
                return conn.info.server_version // 10000
        except psycopg.Error as exc:
            raise BackupError(f"Cannot connect to PostgreSQL database {self.name!r} on {self.host}: {exc}") from None

    def describe(self) -> str:
        if self.vendor == "sqlite":
            return f"SQLite database {self.name}"
        return f"PostgreSQL database {self.name!r} on {self.host or 'localhost'}:{self.port or 5432}"


def _tool_major(path: str) -> int:
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False, timeout=30)
    match = re.search(r"\)\s+(\d+)", result.stdout)
    return int(match.group(1)) if match else 0


def pg_tool(tool: str, server_major: int) -> str:
    """The pg_dump/pg_restore to use: ``CHATAPP_PG_BIN_DIR``, then Debian's per-version folder,
    then PATH; it must be at least the server's major version (pg_dump refuses newer servers)."""
    candidates: list[str] = []
    if settings.PG_BIN_DIR:
        candidates.append(str(Path(settings.PG_BIN_DIR) / tool))
    candidates.append(f"/usr/lib/postgresql/{server_major}/bin/{tool}")
    on_path = shutil.which(tool)
    if on_path:
        candidates.append(on_path)
    rejected: list[str] = []
    for candidate in candidates:
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        major = _tool_major(candidate)
        if major >= server_major:
            return candidate
        rejected.append(f"{candidate} is version {major}")
    raise BackupError(
        f"No {tool} for PostgreSQL {server_major} found"
        + (f" ({'; '.join(rejected)})" if rejected else "")
        + f". Install the PostgreSQL {server_major} client (Debian: postgresql-client-{server_major}) "
        "or set CHATAPP_PG_BIN_DIR to its bin folder."
    )


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    try:
        result = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=settings.BACKUP_TOOL_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        # A hung pg_dump would hold the scheduler's backup job (it never overlaps itself) forever.
        raise BackupError(f"{what} did not finish in {settings.BACKUP_TOOL_TIMEOUT_SECONDS} s") from None
    if result.returncode != 0:
        raise BackupError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")


# --- backup -------------------------------------------------------------------------------------


def backup_name(vendor: str, now: dt.datetime | None = None) -> str:
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"chatapp-{moment:%Y%m%dT%H%M%S%f}Z.{EXTENSIONS[vendor]}"


def _dump_postgres(db: Database, target: Path) -> None:
    pg_dump = pg_tool("pg_dump", db.server_major())
    argv = [pg_dump, "--format=custom", "--compress=6", "--file", str(target), "--dbname", db.conninfo()]
    _run(argv, db.env(), "pg_dump")


def _dump_sqlite(target: Path) -> None:
    wrapper = connections[DEFAULT_DB_ALIAS]
    wrapper.ensure_connection()
    raw = target.with_suffix(".raw")
    destination = sqlite3.connect(raw)
    try:
        wrapper.connection.backup(destination)
    finally:
        destination.close()
    try:
        with raw.open("rb") as source, gzip.open(target, "wb", compresslevel=6) as packed:
            shutil.copyfileobj(source, packed)
    finally:
        raw.unlink(missing_ok=True)


def backup_create(*, keep: int | None = None, store: BackupStore | None = None) -> tuple[str, list[str]]:
    """Back up the default database; return its name and the names pruned by the retention count."""
    keep = settings.BACKUP_KEEP if keep is None else keep
    if keep < 1:
        raise BackupError("The retention count (CHATAPP_BACKUP_KEEP / --keep) must be at least 1.")
    store = store or backup_store()
    db = Database.from_settings()
    if db.vendor not in EXTENSIONS:
        raise BackupError(f"Backups support PostgreSQL and SQLite, not {db.vendor}.")
    name = backup_name(db.vendor)
    with tempfile.TemporaryDirectory(prefix="chatapp-backup-") as tmp:
        dump = Path(tmp) / name
        if db.vendor == "postgresql":
            _dump_postgres(db, dump)
        else:
            _dump_sqlite(dump)
        store.put(name, dump)
        size = dump.stat().st_size
    names = store.names()
    pruned = names[: max(0, len(names) - keep)]
    for old in pruned:
        store.delete(old)
    logger.info(
        "backup %s written to %s",
        name,
        store.description,
        extra={"backup": name, "bytes": size, "pruned": pruned, "store": store.description},
    )
    return name, pruned


# --- restore ------------------------------------------------------------------------------------


def backup_resolve(*, name: str | None, latest: bool, store: BackupStore) -> str:
    names = store.names()
    if latest:
        if not names:
            raise BackupError(f"No backups in {store.description}.")
        return names[-1]
    if not name or not NAME_RE.match(name):
        raise BackupError(f"{name!r} is not a backup name (expected chatapp-<time>Z.pgdump or .sqlite3.gz).")
    if name not in names:
        raise BackupError(f"No backup named {name} in {store.description}.")
    return name


def _restore_postgres(db: Database, dump: Path) -> None:
    pg_restore = pg_tool("pg_restore", db.server_major())
    argv = [pg_restore, "--clean", "--if-exists", "--no-owner", "--single-transaction", "--exit-on-error"]
    argv += ["--dbname", db.conninfo(), str(dump)]
    _run(argv, db.env(), "pg_restore")


def _restore_sqlite(db: Database | None, packed: Path) -> None:
    raw = packed.with_suffix(".raw")
    with gzip.open(packed, "rb") as source, raw.open("wb") as plain:
        shutil.copyfileobj(source, plain)
    source_db = sqlite3.connect(raw)
    try:
        if db is None:
            wrapper = connections[DEFAULT_DB_ALIAS]
            wrapper.ensure_connection()
            source_db.backup(wrapper.connection)
        else:
            target = sqlite3.connect(db.name)
            try:
                source_db.backup(target)
            finally:
                target.close()
    finally:
        source_db.close()
        raw.unlink(missing_ok=True)


def backup_restore(*, name: str, database_url: str | None = None, store: BackupStore | None = None) -> Database:
    """Replace the contents of the target database (the configured one, or ``database_url``) with
    backup ``name``. Returns the target. Raises BackupError on a vendor mismatch or tool failure."""
    store = store or backup_store()
    target = Database.from_url(database_url) if database_url else Database.from_settings()
    match = NAME_RE.match(name)
    if not match:
        raise BackupError(f"{name!r} is not a backup name.")
    vendor = "postgresql" if match.group("ext") == "pgdump" else "sqlite"
    if vendor != target.vendor:
        raise BackupError(f"Backup {name} is a {vendor} backup; it cannot be restored into {target.describe()}.")
    with tempfile.TemporaryDirectory(prefix="chatapp-restore-") as tmp:
        dump = Path(tmp) / name
        store.get(name, dump)
        if vendor == "postgresql":
            if not database_url:
                connections.close_all()  # our own pooled connections must not hold locks on the tables
            _restore_postgres(target, dump)
        else:
            _restore_sqlite(target if database_url else None, dump)
    logger.info("backup %s restored into %s", name, target.describe(), extra={"backup": name})
    return target
