"""``manage.py run_scheduler``: the process for scheduled work (APScheduler, in-process, UTC).

Jobs (schedules from settings, see docs/operations.md):

- ``cleanup_attachments``: runs ``manage.py cleanup_attachments`` (``CHATAPP_CLEANUP_CRON``);
- ``backup_db``: runs ``manage.py backup_db`` (``CHATAPP_BACKUP_CRON``, ``off`` disables it);
- ``presence_expire``: calls ``settings.PRESENCE_EXPIRE_FUNCTION`` (default
  ``messaging.realtime.presence_expire_stale``) every ``CHATAPP_PRESENCE_EXPIRE_SECONDS``.

Run exactly one scheduler process. ``--once JOB`` runs one job now and exits (non-zero on
failure), for platforms whose own scheduler (cron, Heroku Scheduler, a Kubernetes CronJob)
should drive the work instead; ``--list`` prints the jobs and their next run times.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from django.conf import settings
from django.core.management import call_command, get_commands
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections
from django.utils.module_loading import import_string

from chatapp.logging import new_id, request_id_bind

logger = logging.getLogger("chatapp.scheduler")

DISABLED = {"", "off", "none", "disabled"}


def command_job(command: str) -> bool:
    """Run a management command by name; a missing command is a logged error, not a crash."""
    if command not in get_commands():
        logger.error(
            "scheduled command %s is not installed: no app provides manage.py %s; skipping this run",
            command,
            command,
            extra={"command": command},
        )
        return False
    call_command(command, verbosity=0)
    return True


def presence_expire_job() -> bool:
    """Call the presence-expiry function; tolerate its absence with a log line."""
    path = settings.PRESENCE_EXPIRE_FUNCTION
    try:
        expire: Callable[[], Any] = import_string(path)
    except ImportError:
        logger.warning("presence expiry function %s is not available; skipping", path, extra={"function": path})
        return False
    result = expire()
    if isinstance(result, int) and result:
        logger.info("presence: %d stale entries expired", result, extra={"expired": result})
    return True


JOBS: dict[str, Callable[[], bool]] = {
    "cleanup_attachments": lambda: command_job("cleanup_attachments"),
    "backup_db": lambda: command_job("backup_db"),
    "presence_expire": presence_expire_job,
}
# Frequent jobs log their successful runs at DEBUG only.
QUIET_JOBS = frozenset({"presence_expire"})


def run_job(name: str) -> bool:
    """Run one job with its own log id; return whether it succeeded. Never raises."""
    request_id_bind(f"job-{name}-{new_id()[:12]}")
    started = time.perf_counter()
    close_old_connections()
    try:
        ok = JOBS[name]()
    except Exception:
        logger.exception("job %s failed", name, extra={"job": name})
        return False
    finally:
        close_old_connections()
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    if ok:
        level = logging.DEBUG if name in QUIET_JOBS else logging.INFO
        logger.log(level, "job %s done", name, extra={"job": name, "duration_ms": duration_ms})
    return ok


# How long a scheduled run keeps its claim (shorter than the job's interval): a second scheduler
# started by mistake finds the occurrence claimed and skips it, instead of running it again.
CLAIM_SECONDS = {"presence_expire": 20, "cleanup_attachments": 600, "backup_db": 3600}


def run_scheduled(name: str) -> bool:
    """A scheduled occurrence of ``name``: claimed in the shared cache first (Redis when configured,
    so across processes and hosts), then run. False when another scheduler had claimed it."""
    from django.core.cache import cache

    try:
        claimed = cache.add(f"chatapp:scheduler:{name}", new_id(), timeout=CLAIM_SECONDS.get(name, 60))
    except Exception:
        logger.warning("could not claim job %s (cache down); running it", name, exc_info=True)
        claimed = True
    if not claimed:
        logger.info("job %s skipped: another scheduler ran this occurrence", name, extra={"job": name})
        return False
    return run_job(name)


def job_triggers() -> dict[str, BaseTrigger]:
    """The enabled jobs and when they run (UTC)."""
    triggers: dict[str, BaseTrigger] = {}
    for name, expression in (
        ("cleanup_attachments", settings.SCHEDULE_CLEANUP_CRON),
        ("backup_db", settings.SCHEDULE_BACKUP_CRON),
    ):
        if expression.strip().lower() in DISABLED:
            continue
        try:
            triggers[name] = CronTrigger.from_crontab(expression, timezone=dt.UTC)
        except ValueError as exc:
            raise CommandError(f"Invalid crontab {expression!r} for {name}: {exc}") from None
    if settings.PRESENCE_EXPIRE_SECONDS > 0:
        triggers["presence_expire"] = IntervalTrigger(seconds=settings.PRESENCE_EXPIRE_SECONDS, timezone=dt.UTC)
    return triggers


def build_scheduler(scheduler_class: type[BaseScheduler] = BlockingScheduler) -> BaseScheduler:
    scheduler = scheduler_class(
        timezone=dt.UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 600},
        executors={"default": {"type": "threadpool", "max_workers": 3}},
    )
    for name, trigger in job_triggers().items():
        if name == "presence_expire" and not _importable(settings.PRESENCE_EXPIRE_FUNCTION):
            logger.warning(
                "presence expiry function %s is not available; presence_expire is not scheduled",
                settings.PRESENCE_EXPIRE_FUNCTION,
            )
            continue
        scheduler.add_job(run_scheduled, trigger=trigger, args=[name], id=name, name=name)
    return scheduler


def _importable(path: str) -> bool:
    try:
        import_string(path)
    except ImportError:
        return False
    return True


class Command(BaseCommand):
    help = "Run scheduled work (attachment cleanup, backups, presence expiry) until SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", choices=sorted(JOBS), help="Run this job now and exit.")
        parser.add_argument("--list", action="store_true", help="Print the enabled jobs and their next run times.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            if not run_job(options["once"]):
                raise CommandError(f"job {options['once']} failed; see the log")
            return
        triggers = job_triggers()
        if options["list"]:
            now = dt.datetime.now(dt.UTC)
            for name, trigger in triggers.items():
                self.stdout.write(f"{name}\t{trigger}\tnext {trigger.get_next_fire_time(None, now)}")
            return
        scheduler = build_scheduler()

        def stop(signum: int, frame: FrameType | None) -> None:
            if scheduler.running:
                logger.info("scheduler stopping on %s; waiting for running jobs", signal.Signals(signum).name)
                scheduler.shutdown(wait=True)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        logger.info("scheduler starting", extra={"jobs": {name: str(trigger) for name, trigger in triggers.items()}})
        scheduler.start()
        logger.info("scheduler stopped")
