from __future__ import annotations

from django.apps import AppConfig


class ChatappConfig(AppConfig):
    """The project package as an app: its management commands and operations hooks."""

    name = "chatapp"
    verbose_name = "chatapp operations"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from chatapp import metrics
        from chatapp.db import slow_query_install

        connection_created.connect(slow_query_install, dispatch_uid="chatapp.slow_query")
        metrics.multiprocess_setup()
