"""``manage.py backup_db``: a compressed backup of the database, with retention (chatapp/backups.py)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from chatapp.backups import backup_create, backup_store


class Command(BaseCommand):
    help = (
        "Back up the database (pg_dump -Fc on PostgreSQL, SQLite's online backup API otherwise) to "
        "CHATAPP_BACKUP_DIR, CHATAPP_BACKUP_BUCKET, the S3 attachments bucket (backups/) or DATA_DIR/backups, "
        "then delete all but the newest CHATAPP_BACKUP_KEEP backups. Prints the backup's name."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keep", type=int, default=None, help="Backups to keep (default CHATAPP_BACKUP_KEEP).")

    def handle(self, *args: Any, **options: Any) -> None:
        store = backup_store()
        name, pruned = backup_create(keep=options["keep"], store=store)
        if options["verbosity"] >= 2:
            self.stderr.write(f"written to {store.description}; pruned: {', '.join(pruned) or 'none'}")
        self.stdout.write(name)
