"""``manage.py restore_db <name> | --latest``: restore a backup made by ``backup_db``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatapp.backups import Database, backup_resolve, backup_restore, backup_store


class Command(BaseCommand):
    help = (
        "Restore a backup into the configured database, or into --database-url. On PostgreSQL this is "
        "pg_restore --clean --if-exists --no-owner in one transaction: every table in the target is replaced. "
        "Stop the web and scheduler processes first when restoring into the live database."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", nargs="?", help="Backup name, as printed by backup_db or --list.")
        parser.add_argument("--latest", action="store_true", help="Restore the newest backup.")
        parser.add_argument("--list", action="store_true", help="List the available backups, newest first.")
        parser.add_argument("--database-url", help="Restore into this database instead of the configured one.")
        parser.add_argument(
            "--noinput", "--no-input", action="store_false", dest="interactive", help="Do not ask for confirmation."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        store = backup_store()
        if options["list"]:
            for name in reversed(store.names()):
                self.stdout.write(name)
            return
        if bool(options["name"]) == bool(options["latest"]):
            raise CommandError("Give a backup name or --latest (see --list).")
        name = backup_resolve(name=options["name"], latest=options["latest"], store=store)
        url = options["database_url"]
        target = Database.from_url(url) if url else Database.from_settings()
        if options["interactive"]:
            answer = input(
                f"Replace every table of {target.describe()} with backup {name} from {store.description}? "
                "Type 'yes' to continue: "
            )
            if answer.strip().lower() != "yes":
                raise CommandError("Restore cancelled.")
        backup_restore(name=name, database_url=url, store=store)
        self.stdout.write(f"restored {name} into {target.describe()}")
