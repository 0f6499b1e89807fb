"""run_scheduler: the jobs, their schedules, one-off runs, and tolerated absences."""

from __future__ import annotations

import contextvars
import io
import logging
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from django.core.management import call_command, get_commands
from django.core.management.base import CommandError

from chatapp.logging import ContextFilter
from chatapp.management.commands import run_scheduler

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]

CALLS: list[str] = []


def fake_presence_expire() -> int:
    CALLS.append("expired")
    return 3


def test_scheduler_has_every_job_on_its_schedule(settings: Any) -> None:
    settings.SCHEDULE_BACKUP_CRON = "0 3 * * *"
    settings.SCHEDULE_CLEANUP_CRON = "17 * * * *"
    settings.PRESENCE_EXPIRE_SECONDS = 30
    settings.PRESENCE_EXPIRE_FUNCTION = "tests.test_ops_scheduler.fake_presence_expire"
    scheduler = run_scheduler.build_scheduler(BackgroundScheduler)
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs) == {"cleanup_attachments", "backup_db", "presence_expire"}
    assert str(jobs["backup_db"].trigger) == "cron[month='*', day='*', day_of_week='*', hour='3', minute='0']"
    assert str(jobs["presence_expire"].trigger) == "interval[0:00:30]"


def test_disabled_and_missing_jobs_are_not_scheduled(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.SCHEDULE_BACKUP_CRON = "off"
    settings.PRESENCE_EXPIRE_FUNCTION = "messaging.no_such_module.presence_expire_stale"
    with caplog.at_level(logging.WARNING, logger="chatapp.scheduler"):
        scheduler = run_scheduler.build_scheduler(BackgroundScheduler)
    assert {job.id for job in scheduler.get_jobs()} == {"cleanup_attachments"}
    assert "presence_expire is not scheduled" in caplog.text


def test_an_invalid_crontab_is_a_clear_error(settings: Any) -> None:
    settings.SCHEDULE_CLEANUP_CRON = "every hour"
    with pytest.raises(CommandError, match="Invalid crontab 'every hour' for cleanup_attachments"):
        run_scheduler.job_triggers()


def test_list_prints_the_jobs_and_next_runs(settings: Any) -> None:
    settings.PRESENCE_EXPIRE_FUNCTION = "tests.test_ops_scheduler.fake_presence_expire"
    out = io.StringIO()
    call_command("run_scheduler", "--list", stdout=out)
    lines = out.getvalue().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["cleanup_attachments", "backup_db", "presence_expire"]
    assert all("next 20" in line for line in lines)


def test_a_missing_command_is_a_logged_error_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="chatapp.scheduler"):
        assert run_scheduler.command_job("no_such_cleanup_command") is False
    assert "scheduled command no_such_cleanup_command is not installed" in caplog.text


def test_presence_job_calls_the_configured_function(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.PRESENCE_EXPIRE_FUNCTION = "tests.test_ops_scheduler.fake_presence_expire"
    CALLS.clear()
    with caplog.at_level(logging.INFO, logger="chatapp.scheduler"):
        call_command("run_scheduler", "--once", "presence_expire")
    assert CALLS == ["expired"]
    assert "3 stale entries expired" in caplog.text
    settings.PRESENCE_EXPIRE_FUNCTION = "messaging.no_such_module.presence_expire_stale"
    with caplog.at_level(logging.WARNING, logger="chatapp.scheduler"), pytest.raises(CommandError, match="failed"):
        call_command("run_scheduler", "--once", "presence_expire")
    assert "presence expiry function messaging.no_such_module.presence_expire_stale is not available" in caplog.text


def test_job_failures_are_logged_under_the_job_id(monkeypatch: Any) -> None:
    def broken() -> bool:
        logging.getLogger("chatapp.test").warning("inside the job")
        raise RuntimeError("disk full")

    seen: list[tuple[str, str | None, bool]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), getattr(record, "request_id", None), record.exc_info is not None))

    grab = Grab(level=logging.INFO)
    grab.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(grab)
    monkeypatch.setitem(run_scheduler.JOBS, "backup_db", broken)
    try:
        assert contextvars.copy_context().run(run_scheduler.run_job, "backup_db") is False
    finally:
        root.removeHandler(grab)
    lines = {message: (request_id, has_exc) for message, request_id, has_exc in seen}
    inside_id, _ = lines["inside the job"]
    failed_id, failed_has_exc = lines["job backup_db failed"]
    assert inside_id == failed_id
    assert inside_id is not None
    assert inside_id.startswith("job-backup_db-")
    assert failed_has_exc


def test_the_default_presence_function_is_provided_by_the_realtime_layer(settings: Any) -> None:
    from django.utils.module_loading import import_string

    assert callable(import_string(settings.PRESENCE_EXPIRE_FUNCTION))


@pytest.mark.django_db(transaction=True)
def test_backup_job_runs_backup_db(settings: Any, tmp_path: Path) -> None:
    settings.BACKUP_DIR = str(tmp_path)
    call_command("run_scheduler", "--once", "backup_db")
    assert len(list(tmp_path.glob("chatapp-*Z.*"))) == 1


@pytest.mark.django_db(transaction=True)
def test_cleanup_job_runs_the_attachments_command() -> None:
    assert "cleanup_attachments" in get_commands()
    call_command("run_scheduler", "--once", "cleanup_attachments")


@pytest.mark.django_db
def test_a_scheduled_occurrence_runs_once_across_schedulers(monkeypatch: Any) -> None:
    """Two schedulers (started by mistake) fire the same occurrence: the shared cache lets one run it."""
    runs: list[str] = []

    def backup() -> bool:
        runs.append("backup")
        return True

    monkeypatch.setitem(run_scheduler.JOBS, "backup_db", backup)
    assert run_scheduler.run_scheduled("backup_db") is True
    assert run_scheduler.run_scheduled("backup_db") is False  # the other scheduler, same occurrence
    assert runs == ["backup"]
    assert run_scheduler.run_job("backup_db") is True  # `--once` claims nothing: it always runs
    assert runs == ["backup", "backup"]


def test_a_hung_backup_tool_fails_the_backup(settings: Any) -> None:
    from chatapp.backups import BackupError, _run

    settings.BACKUP_TOOL_TIMEOUT_SECONDS = 1
    with pytest.raises(BackupError, match="did not finish in 1 s"):
        _run(["sleep", "30"], {}, "pg_dump")
