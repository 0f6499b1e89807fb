#!/usr/bin/env python3
"""Throwaway real servers for the test suite: PostgreSQL 15, Redis, S3 (moto) and ClamAV (+ Chromium's path).

Run it with the project's virtualenv python (moto and boto3 live there):

    .venv/bin/python scripts/testenv.py ensure            # install missing system packages (apt-get, as root)
    .venv/bin/python scripts/testenv.py run -- CMD ARGS   # start the servers, run CMD against them, stop them

``run`` picks free ports on 127.0.0.1, works inside one temporary directory and exports DATABASE_URL,
REDIS_URL, the AWS_* storage settings, CHATAPP_CLAMD_SOCKET, CHATAPP_CHROMIUM and CHATAPP_TESTENV_STATE
to CMD. It exits with CMD's status and always stops what it started, by PID, then removes the directory.

Tests can stop and restart Redis or PostgreSQL on the same port (load this file with importlib):

    state = testenv.load_state()             # reads $CHATAPP_TESTENV_STATE
    state["services"]["redis"]["port"]
    testenv.stop_service("redis")
    pid = testenv.start_service("redis")     # same argv and port; waits until it answers; returns the new pid

The state file is ``{"state_file": ..., "tmpdir": ..., "services": {"postgres": {...}, "redis": {...},
"s3": {...}, "clamd": {...}}}``; every service has ``pid`` (None while stopped), ``port`` and ``argv``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import http.client
import importlib.metadata
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import FrameType
from typing import Any

State = dict[str, Any]

HOST = "127.0.0.1"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
CLAMD = Path("/usr/sbin/clamd")
DB_NAME = "chatapp"
DB_USER = "chatapp"
DB_PASSWORD = "chatapp"  # noqa: S105 - throwaway loopback server
BUCKET = "chatapp-test"
AWS_REGION = "us-east-1"
AWS_KEY = "testing"
AWS_SECRET = "testing"  # noqa: S105 - moto accepts any credentials
STATE_ENV = "CHATAPP_TESTENV_STATE"
PG_START = ("-w", "-t", "60", "start")  # pg_ctl waits up to 60 s for the server to accept connections
PG_SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"

START_TIMEOUT = 30.0  # seconds for a server to answer
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
COMMAND_GRACE = 30.0  # seconds the command gets after a forwarded signal before SIGKILL

# The EICAR test string, kept as hex so that this file itself is never flagged by a scanner. Checked against
# the published SHA-256 of eicar.com, so a typo in the hex cannot silently produce a signature that matches
# only itself.
EICAR_HEX = (
    "58354f2150254041505b345c505a58353428505e2937434329377d"
    "2445494341522d5354414e444152442d414e544956495255532d544553542d46494c452124482b482a"
)
EICAR_SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
EICAR_SIGNATURE = "Eicar-Test-Signature"

# (what must exist, packages that provide it). Names without a slash are looked up on PATH.
REQUIREMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (str(PG_BIN / "postgres"), ("postgresql-15",)),
    (str(PG_BIN / "initdb"), ("postgresql-15",)),
    (str(PG_BIN / "pg_ctl"), ("postgresql-15",)),
    (str(PG_BIN / "pg_dump"), ("postgresql-client-15",)),
    (str(PG_BIN / "pg_restore"), ("postgresql-client-15",)),
    (str(PG_BIN / "psql"), ("postgresql-client-15",)),
    ("redis-server", ("redis-server",)),
    ("chromium", ("chromium",)),
    ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", ("fonts-noto-color-emoji",)),  # emoji in screenshots
    (str(CLAMD), ("clamav-daemon", "clamav")),
    ("/usr/sbin/nginx", ("nginx",)),  # tests/test_deploy_nginx.py: the shipped reverse-proxy config
)

# Processes this interpreter started, so that stopping one also reaps it (no zombies, no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class SetupError(RuntimeError):
    """A server could not be installed, started, verified or stopped."""


def log(message: str) -> None:
    print(f"testenv: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- ensure


def _present(item: str) -> bool:
    if "/" in item:  # a program must be executable; a data file (the emoji font) only present
        return os.path.isfile(item) and (item.endswith(".ttf") or os.access(item, os.X_OK))
    return shutil.which(item) is not None


def _missing() -> list[tuple[str, tuple[str, ...]]]:
    return [(item, packages) for item, packages in REQUIREMENTS if not _present(item)]


def ensure() -> None:
    """Install the missing server packages with apt-get (root only); raise SetupError if anything stays missing."""
    missing = _missing()
    if not missing:
        return
    items = ", ".join(item for item, _ in missing)
    packages = list(dict.fromkeys(package for _, pkgs in missing for package in pkgs))
    if os.geteuid() != 0:
        raise SetupError(
            f"missing {items}; as root, run: apt-get install -y {' '.join(packages)} "
            "(or run this script as root to install them)"
        )
    log(f"missing {items}; installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        try:
            result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
        except OSError as exc:
            raise SetupError(f"{shlex.join(argv)} could not run ({exc}); still missing: {items}") from exc
        if result.returncode != 0:
            raise SetupError(f"{shlex.join(argv)} failed with exit {result.returncode}; still missing: {items}")
    still = _missing()
    if still:
        raise SetupError(f"still missing after apt-get install: {', '.join(item for item, _ in still)}")
    log(f"installed {' '.join(packages)}")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment for PostgreSQL's tools, without PG* variables that could point them elsewhere."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _tail(path: str | Path | None, lines: int = 25) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    last = text.splitlines()[-lines:]
    return f"\n--- last lines of {path}:\n" + "\n".join(last) if last else ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as dead (and our own children get reaped here)."""
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _is_ours(pid: int, match: list[str]) -> bool:
    """Guard against PID reuse: the process's command line must still contain every marker."""
    cmdline = _cmdline(pid)
    return bool(cmdline) and all(marker in cmdline for marker in match)


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(pid: int | None, match: list[str], what: str) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; only if ``pid`` still is the process we started."""
    if not pid or not _alive(pid):
        return
    if pid not in _CHILDREN and not _is_ours(pid, match):  # an unreaped child of ours cannot have been reused
        log(f"not stopping pid {pid} ({what}): it is no longer the process we started ({_cmdline(pid)!r})")
        return
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_dead(pid, timeout):
            _CHILDREN.pop(pid, None)
            return
    raise SetupError(f"{what} (pid {pid}) survived SIGKILL")


def _spawn(argv: list[str], log_file: str, cwd: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (a terminal's Ctrl-C reaches only the command), output to ``log_file``."""
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def _wait_until(
    what: str,
    probe: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    log_file: str,
    abort: threading.Event | None = None,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if abort is not None and abort.is_set():
            raise SetupError(f"{what}: start-up aborted")
        if proc is not None and proc.poll() is not None:
            raise SetupError(f"{what} exited with status {proc.returncode} during start-up{_tail(log_file)}")
        if probe():
            return
        if time.monotonic() > deadline:
            raise SetupError(f"{what} did not answer within {START_TIMEOUT:.0f} s{_tail(log_file)}")
        time.sleep(0.05)


def _port_taken(log_file: str) -> bool:
    return "Address already in use" in _tail(log_file, 50)


# --------------------------------------------------------------------------- state file


def load_state(path: str | os.PathLike[str] | None = None) -> State:
    """The state written by ``run`` (default: the file named by $CHATAPP_TESTENV_STATE)."""
    where = path or os.environ.get(STATE_ENV)
    if not where:
        raise RuntimeError(f"${STATE_ENV} is not set: run the command under `scripts/testenv.py run -- ...`")
    state: State = json.loads(Path(where).read_text())
    return state


def _save_state(state: State) -> None:
    path = Path(state["state_file"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- redis


def _redis_info(port: int) -> dict[str, Any] | None:
    import redis  # from the virtualenv; imported late so that loading this file needs the stdlib only

    client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        if client.ping():
            info: dict[str, Any] = client.info("server")
            return info
    except redis.RedisError:
        return None
    finally:
        client.close()
    return None


def _redis_start(svc: dict[str, Any], abort: threading.Event | None = None) -> tuple[int, str]:
    """Start redis-server from ``svc["argv"]``, wait for PING, check the answering PID; returns (pid, version)."""
    proc = _spawn(svc["argv"], svc["log_file"], svc["cwd"])
    svc["pid"] = proc.pid
    info: dict[str, Any] = {}

    def probe() -> bool:
        answer = _redis_info(svc["port"])
        if answer:
            info.update(answer)
        return bool(answer)

    try:
        _wait_until(f"redis-server on port {svc['port']}", probe, proc, svc["log_file"], abort)
        if int(info.get("process_id", -1)) != proc.pid:
            raise SetupError(
                f"port {svc['port']} is answered by redis pid {info.get('process_id')}, not by ours ({proc.pid})"
            )
    except BaseException:
        _terminate(proc.pid, svc["match"], "redis-server")
        svc["pid"] = None
        raise
    return proc.pid, str(info.get("redis_version", "?"))


# --------------------------------------------------------------------------- postgres


def _pg_pid(svc: dict[str, Any]) -> int | None:
    try:
        first = (Path(svc["data_dir"]) / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    pid = int(first) if first.strip().isdigit() else None
    return pid if pid and _alive(pid) else None


def _run_tool(argv: list[str], what: str, cwd: str, log_file: str | None = None, timeout: float = 90.0) -> str:
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"{what} timed out after {timeout:.0f} s: {shlex.join(argv)}{_tail(log_file)}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise SetupError(f"{what} failed (exit {result.returncode}): {shlex.join(argv)}\n{output}{_tail(log_file)}")
    return result.stdout


def _pg_start(svc: dict[str, Any]) -> int:
    """``pg_ctl start -w`` with the recorded argv; returns the postmaster's pid."""
    running = _pg_pid(svc)
    if running:
        return running
    _run_tool(svc["argv"], "pg_ctl start", svc["socket_dir"], svc["log_file"])
    pid = _pg_pid(svc)
    if pid is None:
        raise SetupError(f"pg_ctl start succeeded but no postmaster is running{_tail(svc['log_file'])}")
    svc["pid"] = pid
    return pid


def _pg_stop(svc: dict[str, Any]) -> None:
    """``pg_ctl stop -m fast``; if that fails, SIGQUIT/SIGKILL the postmaster of *our* data directory."""
    if not (Path(svc["data_dir"]) / "postmaster.pid").exists():
        svc["pid"] = None
        return
    argv = [*svc["runuser"], svc["pg_ctl"], "-D", svc["data_dir"], "-m", "fast", "-w", "-t", "60", "stop"]
    try:
        _run_tool(argv, "pg_ctl stop", svc["socket_dir"], svc["log_file"])
    except SetupError as exc:
        pid = _pg_pid(svc)
        if pid is None:
            raise
        log(f"{exc}; sending SIGQUIT to the postmaster (pid {pid})")
        match = ["postgres", svc["data_dir"]]
        if _is_ours(pid, match):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            if not _wait_dead(pid, STOP_TIMEOUT):
                _terminate(pid, match, "postgres")
    svc["pid"] = None


# --------------------------------------------------------------------------- helpers for the tests

RESTARTABLE = ("redis", "postgres")


def _service(state: State, name: str) -> dict[str, Any]:
    if name not in RESTARTABLE:
        raise ValueError(f"can only stop/start {' or '.join(RESTARTABLE)}, not {name!r}")
    svc: dict[str, Any] = state["services"][name]
    return svc


def stop_service(name: str, state: State | None = None) -> None:
    """Stop "redis" or "postgres" (by its recorded PID / pg_ctl stop -m fast) and record it as stopped."""
    state = load_state() if state is None else state
    svc = _service(state, name)
    if name == "postgres":
        _pg_stop(svc)
    else:
        _terminate(svc.get("pid"), svc["match"], "redis-server")
        svc["pid"] = None
    _save_state(state)


def start_service(name: str, state: State | None = None) -> int:
    """Start "redis" or "postgres" again on its recorded port, wait until it answers; returns the new pid.

    A service that is already running is left as is and its pid returned.
    """
    state = load_state() if state is None else state
    svc = _service(state, name)
    if name == "postgres":
        pid = _pg_start(svc)
    else:
        current = svc.get("pid")
        if current and _alive(current) and _is_ours(current, svc["match"]):
            return int(current)
        pid, _ = _redis_start(svc)
    svc["pid"] = pid
    _save_state(state)
    return pid


# --------------------------------------------------------------------------- run


def _become_subreaper() -> None:
    """Adopt our orphaned descendants (the postmaster once pg_ctl exits, a Redis the tests restarted once they
    exit) so that their exit status comes back here and no zombie outlives ``run``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (Linux)


def _reap_exited() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _make_tmpdir() -> Path:
    base = tempfile.gettempdir()
    # Unix socket paths must fit in 107 bytes, and the postgres user must be able to traverse every parent.
    if len(base) > 50 or (os.geteuid() == 0 and not _world_traversable(Path(base))):
        base = "/tmp"
    tmp = Path(tempfile.mkdtemp(prefix="chatapp-testenv-", dir=base))
    tmp.chmod(0o755)
    return tmp


def _world_traversable(path: Path) -> bool:
    return all(part.stat().st_mode & 0o001 for part in [path, *path.parents])


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Session:
    """The servers of one ``run``: started concurrently, recorded in the state file, stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state: State = {"state_file": str(tmp / "state.json"), "tmpdir": str(tmp), "services": {}}
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.env: dict[str, str] = {}

    def _register(self, name: str, svc: dict[str, Any]) -> None:
        with self.lock:
            self.state["services"][name] = svc

    def _export(self, **variables: str) -> None:
        with self.lock:
            self.env.update(variables)

    # --- postgres
    def start_postgres(self) -> None:
        base = self.tmp / "postgres"
        base.mkdir()
        runuser: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise SetupError("running as root but there is no `postgres` user (postgresql-15 broken?)") from None
            os.chown(base, account.pw_uid, account.pw_gid)
            runuser = ["runuser", "-u", "postgres", "--"]
        data, log_file = base / "data", base / "postgres.log"
        pg_ctl = str(PG_BIN / "pg_ctl")
        initdb = [*runuser, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
        _run_tool([*initdb, "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"], "initdb", str(base))
        for attempt in range(3):
            port = free_port()
            options = f"-p {port} -k {base} -c listen_addresses={HOST} {PG_SETTINGS}"
            svc: dict[str, Any] = {
                "pid": None,
                "port": port,
                "host": HOST,
                "argv": [*runuser, pg_ctl, "-D", str(data), "-o", options, "-l", str(log_file), *PG_START],
                "pg_ctl": pg_ctl,
                "data_dir": str(data),
                "socket_dir": str(base),
                "log_file": str(log_file),
                "runuser": runuser,
                "options": options,
            }
            self._register("postgres", svc)
            try:
                pid = _pg_start(svc)
                break
            except SetupError:
                if attempt == 2 or not _port_taken(str(log_file)) or self.abort.is_set():
                    raise
        if self.abort.is_set():
            raise SetupError("postgres: start-up aborted")
        psql = [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(port)]
        version = _run_tool(
            [
                *psql,
                *("-U", "postgres", "-d", "postgres", "-tA"),
                *("-c", f"CREATE ROLE {DB_USER} LOGIN SUPERUSER PASSWORD '{DB_PASSWORD}'"),
                *("-c", f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}"),
                *("-c", "SHOW server_version"),
            ],
            "creating the chatapp role and database",
            str(base),
            str(log_file),
        ).strip()
        svc["version"] = version
        log(f"PostgreSQL {version} on {HOST}:{port} pid {pid}")
        self._export(DATABASE_URL=f"postgres://{DB_USER}:{DB_PASSWORD}@{HOST}:{port}/{DB_NAME}")

    # --- redis
    def start_redis(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        for attempt in range(3):
            port = free_port()
            svc: dict[str, Any] = {
                "pid": None,
                "port": port,
                "host": HOST,
                "argv": [
                    *(binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"),
                    *("--daemonize", "no", "--dir", str(self.tmp)),
                ],
                "cwd": str(self.tmp),
                "log_file": str(self.tmp / f"redis-{port}.log"),
                "match": ["redis-server", str(port)],  # its title becomes "redis-server 127.0.0.1:PORT"
            }
            self._register("redis", svc)
            try:
                pid, version = _redis_start(svc, self.abort)
                break
            except SetupError:
                if attempt == 2 or not _port_taken(svc["log_file"]) or self.abort.is_set():
                    raise
        log(f"Redis {version} on {HOST}:{port} pid {pid}")
        self._export(REDIS_URL=f"redis://{HOST}:{port}/0")

    # --- s3
    def start_s3(self) -> None:
        env = {key: value for key, value in os.environ.items() if key != "MOTO_PORT"}  # moto prefers it over -p
        for attempt in range(3):
            port = free_port()
            log_file = str(self.tmp / f"moto-{port}.log")
            argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
            proc = _spawn(argv, log_file, str(self.tmp), env)
            svc: dict[str, Any] = {
                "pid": proc.pid,
                "port": port,
                "host": HOST,
                "argv": argv,
                "log_file": log_file,
                "endpoint_url": f"http://{HOST}:{port}",
                "bucket": BUCKET,
                "match": ["moto.server", str(port)],
            }
            self._register("s3", svc)
            try:
                probe = functools.partial(_http_answers, port)
                _wait_until(f"moto S3 on port {port}", probe, proc, log_file, self.abort)
                break
            except SetupError:
                if attempt == 2 or not _port_taken(log_file) or self.abort.is_set():
                    raise
        import boto3  # from the virtualenv

        client = boto3.client(
            "s3",
            endpoint_url=svc["endpoint_url"],
            region_name=AWS_REGION,
            aws_access_key_id=AWS_KEY,
            aws_secret_access_key=AWS_SECRET,
        )
        client.create_bucket(Bucket=BUCKET)
        if proc.poll() is not None:  # the answer came from someone else on that port
            raise SetupError(f"moto exited with status {proc.returncode}{_tail(log_file)}")
        version = importlib.metadata.version("moto")
        log(f"S3 (moto {version}) on {svc['endpoint_url']} pid {proc.pid}, bucket {BUCKET}")
        self._export(
            AWS_STORAGE_BUCKET_NAME=BUCKET,
            AWS_S3_ENDPOINT_URL=svc["endpoint_url"],
            AWS_S3_REGION_NAME=AWS_REGION,
            AWS_ACCESS_KEY_ID=AWS_KEY,
            AWS_SECRET_ACCESS_KEY=AWS_SECRET,
        )

    # --- clamd
    def start_clamd(self) -> None:
        eicar = bytes.fromhex(EICAR_HEX)
        if hashlib.sha256(eicar).hexdigest() != EICAR_SHA256:
            raise SetupError("EICAR_HEX is not the EICAR test string (SHA-256 mismatch); fix the constant")
        base = self.tmp / "clamav"
        (base / "db").mkdir(parents=True)
        (base / "tmp").mkdir()
        (base / "db" / "eicar.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR_HEX}\n")
        sock, conf, log_file = base / "clamd.sock", base / "clamd.conf", base / "clamd.log"
        conf.write_text(
            "\n".join(
                [
                    f"DatabaseDirectory {base / 'db'}",
                    f"LocalSocket {sock}",
                    f"TemporaryDirectory {base / 'tmp'}",
                    f"LogFile {log_file}",
                    "LogTime yes",
                    "Foreground yes",
                    "SelfCheck 0",  # never re-check the (static) database
                    "",
                ]
            )
        )
        argv = [str(CLAMD), "-c", str(conf)]
        proc = _spawn(argv, str(base / "clamd.out"), str(self.tmp))
        svc: dict[str, Any] = {
            "pid": proc.pid,
            "port": None,
            "argv": argv,
            "socket": str(sock),
            "config": str(conf),
            "log_file": str(log_file),
            "match": ["clamd", str(conf)],
        }
        self._register("clamd", svc)
        _wait_until("clamd", lambda: _clamd(str(sock), b"zPING\0") == "PONG", proc, str(log_file), self.abort)
        verdict = _clamd_scan(str(sock), eicar)
        if not verdict.endswith(" FOUND") or EICAR_SIGNATURE not in verdict:
            raise SetupError(f"clamd did not detect the EICAR test string (answer {verdict!r}){_tail(log_file)}")
        clean = _clamd_scan(str(sock), b"just some harmless text\n")
        if clean != "stream: OK":
            raise SetupError(f"clamd did not pass a harmless stream (answer {clean!r}){_tail(log_file)}")
        version = _clamd(str(sock), b"zVERSION\0").split("/", 1)[0]
        log(f"{version} (clamd) on {sock} pid {proc.pid}, EICAR detected")
        self._export(CHATAPP_CLAMD_SOCKET=str(sock))

    # --- all
    def start_all(self) -> None:
        starters = [self.start_postgres, self.start_redis, self.start_s3, self.start_clamd]
        pool = ThreadPoolExecutor(max_workers=len(starters), thread_name_prefix="testenv")
        futures: list[Future[None]] = [pool.submit(starter) for starter in starters]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # re-raise the first failure
            for future in futures:
                future.result()
        finally:
            if not all(future.done() and future.exception() is None for future in futures):
                self.abort.set()  # the others give up at their next check
            pool.shutdown(wait=True)
        _save_state(self.state)

    def stop_all(self) -> None:
        try:  # the tests may have restarted a service: its current pid is in the file
            services: dict[str, dict[str, Any]] = load_state(self.state["state_file"])["services"]
        except (OSError, ValueError, KeyError):
            services = {}
        for name in ("clamd", "s3", "redis", "postgres"):
            for svc in (services.get(name), self.state["services"].get(name)):
                if not svc:
                    continue
                try:
                    if name == "postgres":
                        _pg_stop(svc)
                    else:
                        _terminate(svc.get("pid"), svc["match"], name)
                except (SetupError, OSError) as exc:
                    log(f"warning: could not stop {name}: {exc}")
        for pid, proc in list(_CHILDREN.items()):  # anything we spawned and still running (normally none)
            if proc.poll() is None:
                log(f"warning: pid {pid} ({proc.args!r}) still running; killing it")
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.tmp.exists():
            log(f"warning: could not remove {self.tmp}")


def _http_answers(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _clamd(sock_path: str, request: bytes, payload: bytes | None = None) -> str:
    """One clamd command over its unix socket; returns the NUL-terminated answer ("" if unreachable)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(sock_path)
            sock.sendall(request)
            if payload is not None:
                sock.sendall(struct.pack("!I", len(payload)) + payload + struct.pack("!I", 0))
            answer = b""
            while not answer.endswith(b"\0"):
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
    except OSError:
        return ""
    return answer.rstrip(b"\0").decode(errors="replace").strip()


def _clamd_scan(sock_path: str, payload: bytes) -> str:
    return _clamd(sock_path, b"zINSTREAM\0", payload)


def _sent_by_terminal(signum: int) -> bool:
    """Ctrl-C (SIGINT) and a hang-up (SIGHUP) go to the terminal's whole foreground process group, the command
    included: forwarding them too would deliver them twice (pytest takes a second Ctrl-C as "abort the clean-up")."""
    if signum not in (signal.SIGINT, signal.SIGHUP):
        return False
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal: the signal was sent to us alone
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def run(command: list[str]) -> int:
    ensure()
    chromium = shutil.which("chromium")
    if not chromium:
        raise SetupError("chromium is not on PATH")

    received: list[int] = []
    phase = ["start"]
    child: list[subprocess.Popen[bytes]] = []

    tmp = _make_tmpdir()
    session = Session(tmp)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if phase[0] == "start" and not session.abort.is_set():
            session.abort.set()  # the starters give up; a second signal does not interrupt the unwinding
            raise _Interrupted(signum)
        if phase[0] == "command" and child and child[0].poll() is None and not _sent_by_terminal(signum):
            with contextlib.suppress(ProcessLookupError):
                child[0].send_signal(signum)
        # during clean-up: noted, and clean-up goes on

    _become_subreaper()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    started = time.monotonic()
    try:
        try:
            session.start_all()
        except _Interrupted as exc:
            log(f"interrupted by {exc} during start-up")
            return 128 + exc.signum
        log(f"Chromium at {chromium}")
        session.env.update(CHATAPP_CHROMIUM=chromium, CHATAPP_TESTENV_STATE=session.state["state_file"])
        log(f"all up in {time.monotonic() - started:.1f} s; state in {session.state['state_file']}")
        phase[0] = "command"
        try:
            child.append(subprocess.Popen(command, env={**os.environ, **session.env}))
        except OSError as exc:
            log(f"error: cannot run {shlex.join(command)}: {exc}")
            return 127
        signalled_at: float | None = None
        while True:
            try:
                returncode = child[0].wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                if received and signalled_at is None:
                    signalled_at = time.monotonic()
                if signalled_at is not None and time.monotonic() - signalled_at > COMMAND_GRACE:
                    log(f"the command ignored the forwarded signal for {COMMAND_GRACE:.0f} s; killing it")
                    child[0].kill()
        return 128 - returncode if returncode < 0 else returncode
    finally:
        phase[0] = "stop"
        session.abort.set()
        session.stop_all()
        _reap_exited()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


USAGE = """usage: testenv.py ensure
       testenv.py run -- COMMAND [ARGS...]"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print((__doc__ or "").strip() + "\n\n" + USAGE)
        return 0 if argv else 2
    action, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        if action == "ensure" and not rest:
            ensure()
            return 0
        if action == "run" and rest:
            return run(rest)
    except SetupError as exc:
        log(f"error: {exc}")
        return 1
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
