"""Remove uploads never sent, files of deleted messages and threads, and orphaned stored objects.

Run it hourly (it is idempotent), e.g. ``python manage.py cleanup_attachments`` from cron or a
scheduler; see docs/attachments.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from attachments.services import attachments_cleanup


class Command(BaseCommand):
    help = (
        "Delete uploads not sent with a message within CHATAPP_ATTACHMENT_ORPHAN_HOURS, the files of deleted "
        "messages and threads, and stored objects (files, thumbnails, abandoned direct uploads) no row points at."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Report what would be removed, change nothing.")
        parser.add_argument(
            "--grace-minutes",
            type=int,
            default=60,
            help="Spare unreferenced objects newer than this (an upload in flight stores its file first). Default 60.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        report = attachments_cleanup(
            object_grace=timedelta(minutes=max(0, options["grace_minutes"])), dry_run=options["dry_run"]
        )
        verb = "Would remove" if options["dry_run"] else "Removed"
        self.stdout.write(
            f"{verb} {report.unattached} unsent upload(s), revoked {report.revoked} file(s) of deleted messages "
            f"or threads, {len(report.keys)} stored object(s)."
        )
        if options["verbosity"] >= 2:
            for key in report.keys:
                self.stdout.write(f"  {key}")
