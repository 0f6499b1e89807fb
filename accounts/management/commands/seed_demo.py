"""Create demo data on first run: two users and a thread. Credentials are printed once."""

from __future__ import annotations

import secrets
from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import SystemRole, User
from accounts.services import user_create_local
from messaging.services import message_send
from threads.services import thread_create


class Command(BaseCommand):
    help = "Create two demo users (alice is a system OWNER) and a thread between them, once."

    def handle(self, *args: Any, **options: Any) -> None:
        if User.objects.filter(username__in=["alice", "bob"]).exists():
            self.stdout.write("Demo data already present (users alice and bob).")
            return
        passwords = {name: secrets.token_urlsafe(9) for name in ("alice", "bob")}
        with transaction.atomic():
            alice = user_create_local(
                username="alice", password=passwords["alice"], display_name="Alice", system_role=SystemRole.OWNER
            )
            bob = user_create_local(username="bob", password=passwords["bob"], display_name="Bob")
            thread, _ = thread_create(creator=alice, title="Welcome", participant_ids=[bob.pk])
        message_send(sender=alice, thread_id=thread.pk, body="Welcome to **chatapp**, @bob!", client_msg_id="seed-1")
        self.stdout.write(self.style.SUCCESS("Demo users created (shown once, keep them):"))
        for name, password in passwords.items():
            self.stdout.write(f"  {name} / {password}")
        self.stdout.write("alice is a system OWNER and can open the admin at /admin/.")
