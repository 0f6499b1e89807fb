"""A live daphne serving the test database, and Chromium driven by Playwright, for the web tests."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def listening_socket() -> socket.socket:
    """A socket bound here to a free port and listening, to hand to daphne (as bench/servers.py does).

    The port is never released between choosing it and serving on it, nor across a restart: no other
    process can take it, and nothing but the daphne started here can answer on it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def test_database_url() -> str:
    """The URL of the database pytest-django created, for a server process to share."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("postgresql"):
        return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    raise RuntimeError("live servers need PostgreSQL (run through make test)")


class LiveServer:
    """One daphne process on a socket bound here; ``restart()`` stops it with SIGTERM and starts
    another on the same socket. ``close()`` stops it and releases the port."""

    START_TIMEOUT = 60.0

    def __init__(self) -> None:
        self.sock = listening_socket()
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"daphne-{self.port}.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": test_database_url(),
                "DJANGO_DEBUG": "1",
                "CHATAPP_TESTING": "0",
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
                "CHATAPP_DATA_DIR": str(Path(settings.DATA_DIR)),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"daphne {self.proc.pid} is still running on {self.port}")
        fd = self.sock.fileno()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daphne", "--fd", str(fd), "chatapp.asgi:application"],
                cwd=ROOT,
                env=self.env(),
                pass_fds=(fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops it
            )
        self.wait_ready(self.proc)

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Until ``proc`` answers GET /healthz on the socket. Only it can: the socket is ours, and no
        earlier daphne is left on it (``start`` refuses to run two)."""
        deadline = time.monotonic() + self.START_TIMEOUT
        last = "no answer"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daphne exited with {proc.returncode} before answering; see {self.log_path}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"daphne did not answer GET /healthz in {self.START_TIMEOUT:.0f} s ({last}); see {self.log_path}"
                )
            probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=min(10.0, left))
            try:
                probe.request("GET", "/healthz", headers={"Host": "127.0.0.1"})
                response = probe.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            else:
                if response.status == 200 and b'"ok"' in body and proc.poll() is None:
                    return
                last = f"HTTP {response.status}: {body[:200]!r}"
            finally:
                probe.close()
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the daphne started here (by its PID), then SIGKILL if it lingers. The socket stays
        open: connections made meanwhile wait for the next start."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.sock.close()


@pytest.fixture
def live_daphne(transactional_db: None) -> Iterator[LiveServer]:
    server = LiveServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    from tests.conftest import needs

    needs("chromium")
    # Playwright's sync API keeps an event loop running in this thread; the test's own ORM calls
    # are still plain synchronous code, which Django would otherwise refuse.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    executable = os.environ.get("CHATAPP_CHROMIUM") or shutil.which("chromium")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


def session_cookie_for(user: Any, server: LiveServer) -> dict[str, Any]:
    """A logged-in Django session for ``user``, as a browser cookie for the live server."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return {"name": settings.SESSION_COOKIE_NAME, "value": session.session_key, "url": server.url}


class FileChoosers:
    """The file choosers a page opens, caught through a DevTools session of the test's own.

    Not ``page.expect_file_chooser()``: Playwright asks Chromium to intercept file choosers only
    when a listener is added, and does not wait for the answer before the test's next action. A
    chooser the page opens in the next milliseconds then goes to the browser itself, which (headless)
    cancels it at once, and the event never comes: the page had opened it. Seen in a protocol log
    (DEBUG=pw:protocol) of the keyboard test failing 1 run in 4: the reply to the key press came
    back before the reply to ``Page.setInterceptFileChooserDialog`` sent just ahead of it, and the
    page's input got ``cancel``. Here the interception is in force, answered, before anything
    else happens.
    """

    def __init__(self, page: Any) -> None:
        self.page = page
        self.opened: list[dict[str, Any]] = []
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.on("Page.fileChooserOpened", self._opened)
        self.cdp.send("Page.enable")
        self.cdp.send("Page.setInterceptFileChooserDialog", {"enabled": True})

    def _opened(self, event: dict[str, Any]) -> None:
        self.opened.append(event)

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next chooser opened (``mode`` and ``backendNodeId`` of its input), waiting for it."""
        deadline = time.monotonic() + timeout
        while not self.opened:
            if time.monotonic() > deadline:
                raise AssertionError("the page opened no file chooser")
            self.page.wait_for_timeout(50)
        return self.opened.pop(0)

    def input_id(self, chooser: dict[str, Any]) -> str:
        """The id attribute of the input that opened ``chooser``."""
        node = self.cdp.send("DOM.describeNode", {"backendNodeId": chooser["backendNodeId"]})["node"]
        attributes = node.get("attributes", [])
        return str(dict(zip(attributes[::2], attributes[1::2], strict=True)).get("id", ""))

    def choose(self, chooser: dict[str, Any], paths: list[Path]) -> None:
        """Pick ``paths`` in ``chooser``, as a person would in the dialog (the input's change fires)."""
        self.cdp.send(
            "DOM.setFileInputFiles",
            {"backendNodeId": chooser["backendNodeId"], "files": [str(p) for p in paths]},
        )
