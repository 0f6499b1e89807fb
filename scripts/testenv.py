#!/usr/bin/env python3
"""Throwaway real servers for the test suite: PostgreSQL 15, Redis, S3 (moto) and ClamAV.

Usage (with the project's virtualenv python, which has moto and boto3):

    .venv/bin/python scripts/testenv.py ensure           # install missing system packages (apt, as root)
    .venv/bin/python scripts/testenv.py run -- CMD ARGS  # start the servers, run CMD against them, stop them

``run`` picks free ports on 127.0.0.1, works inside one temporary directory, exports DATABASE_URL,
REDIS_URL, the AWS_* storage settings, CHATAPP_CLAMD_SOCKET, CHATAPP_CHROMIUM and CHATAPP_TESTENV_STATE
to CMD, exits with CMD's status and always stops what it started, by PID.

Tests can stop and restart a service on the same port by importing this file with importlib:

    state = testenv.load_state()              # reads $CHATAPP_TESTENV_STATE
    testenv.stop_service(state, "redis")
    pid = testenv.start_service(state, "redis")   # same argv and port; returns the new pid

Service names: "postgres", "redis", "s3", "clamd".
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import importlib.util
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
from typing import Any, BinaryIO, NamedTuple

State = dict[str, Any]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
CLAMD = "/usr/sbin/clamd"
SERVICES = ("postgres", "redis", "s3", "clamd")
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
PORT_ATTEMPTS = 3

DB_USER = DB_NAME = "chatapp"
DB_PASSWORD = "chatapp"  # noqa: S105 - throwaway local test server
BUCKET = "chatapp-test"
AWS_REGION = "us-east-1"
AWS_KEY = "testing"
AWS_SECRET = "testing"  # noqa: S105 - moto accepts any dummy credentials

# Kept as hex so that this file itself is never flagged by a virus scanner.
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e444152442d"
    "414e544956495255532d544553542d46494c452124482b482a"
)
EICAR_SIGNATURE = "Eicar-Test-Signature"

# Unix socket paths are limited to 108 bytes (sun_path) including the terminating NUL.
MAX_SOCKET_PATH = 107


class TestEnvError(Exception):
    """A service could not be installed, started, verified or stopped."""


class PortBusy(TestEnvError):
    """Another process bound the port between our probe and the server's own bind."""


class _Aborted(TestEnvError):
    """Start-up gave up because another service failed or we were interrupted."""


class _NotReady(Exception):
    """The server answered, but not yet with what we wait for."""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Child:
    """A server we spawned (no Popen: a server started by a test helper outlives the test process on purpose)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # already reaped
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Requirement(NamedTuple):
    label: str
    executables: tuple[str, ...]
    packages: tuple[str, ...]


REQUIREMENTS = (
    Requirement(
        "PostgreSQL 15 server",
        tuple(str(PG_BIN / name) for name in ("postgres", "initdb", "pg_ctl", "psql")),
        ("postgresql-15",),
    ),
    Requirement("Redis server", ("redis-server",), ("redis-server",)),
    Requirement("Chromium", ("chromium",), ("chromium",)),
    Requirement("ClamAV daemon", (CLAMD,), ("clamav-daemon", "clamav")),
)

# Process names a package install could start as system-wide daemons; we only report them, never touch them.
_SYSTEM_DAEMONS = frozenset({"postgres", "redis-server", "clamd", "freshclam"})

_LOCK = threading.RLock()
_ABORT = threading.Event()
_CHILDREN: dict[int, _Child] = {}
_USED_PORTS: set[int] = set()


def log(message: str) -> None:
    print(f"testenv: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- ensure


def _find(executable: str) -> str | None:
    if "/" in executable:
        return executable if os.access(executable, os.X_OK) else None
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(executable, path=path)


def _missing() -> list[Requirement]:
    return [req for req in REQUIREMENTS if not all(_find(exe) for exe in req.executables)]


def _describe(reqs: list[Requirement]) -> str:
    return "; ".join(f"{req.label} ({', '.join(exe for exe in req.executables if not _find(exe))})" for req in reqs)


def _running_daemons() -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                name = (entry / "comm").read_text().strip()
                if name in _SYSTEM_DAEMONS:
                    found.add((int(entry.name), name))
    return found


def ensure() -> None:
    """Install the missing server packages with apt-get; raise TestEnvError if that is impossible."""
    missing = _missing()
    if not missing:
        return
    packages = [pkg for req in missing for pkg in req.packages]
    install = f"apt-get update && apt-get install -y {' '.join(packages)}"
    if os.geteuid() != 0:
        raise TestEnvError(f"missing {_describe(missing)}; as root run: {install}")
    if not shutil.which("apt-get"):
        raise TestEnvError(f"missing {_describe(missing)} and apt-get is not available to install {packages}")
    log(f"installing {' '.join(packages)} (missing: {_describe(missing)})")
    before = _running_daemons()
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            raise TestEnvError(f"`{shlex.join(argv)}` failed with exit code {result.returncode}")
    for pid, name in sorted(_running_daemons() - before):
        log(f"note: the package install started a system-wide {name} (pid {pid}); leaving it alone")
    still = _missing()
    if still:
        raise TestEnvError(f"still missing after apt-get install: {_describe(still)}")


# --------------------------------------------------------------------------- processes


def _proc_starttime(pid: int | None) -> int | None:
    """The kernel start time of a live (non-zombie) process, which tells it apart from a reused PID."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int | None, starttime: int | None) -> bool:
    current = _proc_starttime(pid)
    return current is not None and current == starttime


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _wait_gone(pid: int, starttime: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not _alive(pid, starttime):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _terminate(pid: int | None, starttime: int | None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL, the process identified by (pid, starttime); anything else is left alone."""
    if not pid:
        return
    _reap(pid)
    if not _alive(pid, starttime):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, starttime, timeout):
        return
    log(f"pid {pid} ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, starttime, 5.0):
        raise TestEnvError(f"pid {pid} survived SIGKILL")


def _spawn(argv: list[str], logfile: str) -> _Child:
    """Start a server in its own session (terminal Ctrl-C does not reach it), output appended to logfile."""
    pid = os.posix_spawn(
        argv[0],
        argv,
        os.environ,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
        setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # ignored by the Python interpreter, not by servers
    )
    child = _Child(pid)
    _CHILDREN[pid] = child
    return child


def _log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _log_since(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _port_busy(text: str) -> bool:
    lowered = text.lower()
    return "address already in use" in lowered or "is in use by another program" in lowered


def _check_child(name: str, svc: State, proc: _Child, log_offset: int) -> None:
    code = proc.poll()
    if code is None:
        return
    _CHILDREN.pop(proc.pid, None)
    output = _log_since(svc["log"], log_offset)
    message = f"{name} exited with code {code} during start-up (log {svc['log']}):\n{_tail(output)}"
    if _port_busy(output):
        raise PortBusy(message)
    raise TestEnvError(message)


def _wait_until(what: str, check: Callable[[], bool], timeout: float, poll: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if _ABORT.is_set():
            raise _Aborted(f"aborted while waiting for {what}")
        poll()
        with contextlib.suppress(OSError, http.client.HTTPException, _NotReady):
            if check():
                return
        if time.monotonic() > deadline:
            raise TestEnvError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it; never handed out twice by us)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        with _LOCK:
            if port not in _USED_PORTS:
                _USED_PORTS.add(port)
                return port


# --------------------------------------------------------------------------- state file


def load_state(path: str | os.PathLike[str] | None = None) -> State:
    """Read the state file (default: $CHATAPP_TESTENV_STATE)."""
    location = path or os.environ.get("CHATAPP_TESTENV_STATE")
    if not location:
        raise TestEnvError("CHATAPP_TESTENV_STATE is not set: run under `scripts/testenv.py run -- ...`")
    state: State = json.loads(Path(location).read_text())
    return state


def save_state(state: State) -> None:
    """Write the state atomically to state["state_file"]."""
    with _LOCK:
        data = json.dumps(state, indent=2, sort_keys=True)
        target = Path(state["state_file"])
        scratch = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        scratch.write_text(data + "\n")
        os.replace(scratch, target)


def _update(svc: State, **fields: Any) -> None:
    with _LOCK:
        svc.update(fields)


# --------------------------------------------------------------------------- redis


def _resp_reply(f: BinaryIO) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise _NotReady(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        return None if size < 0 else f.read(size + 2)[:-2].decode()
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_resp_reply(f) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line!r}")


def redis_call(port: int, *args: str, timeout: float = 2.0) -> Any:
    """One command to the Redis server on 127.0.0.1:port over a raw socket (RESP2)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        with sock.makefile("rb") as f:
            return _resp_reply(f)


def _redis_spec(tmp: Path, port: int) -> State:
    workdir = tmp / "redis"
    workdir.mkdir(exist_ok=True)
    redis = _find("redis-server")
    argv = [str(redis), "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    argv += ["--daemonize", "no", "--dir", str(workdir)]
    return {
        "pid": None,
        "starttime": None,
        "port": port,
        "argv": argv,
        "log": str(workdir / "redis.log"),
        "url": f"redis://{HOST}:{port}/0",
    }


def _ready_redis(svc: State, proc: _Child, timeout: float, log_offset: int) -> None:
    port = svc["port"]
    _wait_until(
        f"Redis on {HOST}:{port}",
        lambda: redis_call(port, "PING") == "PONG",
        timeout,
        lambda: _check_child("redis", svc, proc, log_offset),
    )
    info = dict(line.split(":", 1) for line in str(redis_call(port, "INFO", "server")).splitlines() if ":" in line)
    answering = int(info.get("process_id", "-1"))
    if answering != proc.pid:
        raise PortBusy(f"Redis on {HOST}:{port} answers as pid {answering}, not as our redis-server pid {proc.pid}")
    _update(svc, version=info.get("redis_version", "?"))


# --------------------------------------------------------------------------- s3 (moto)


def _s3_spec(tmp: Path, port: int) -> State:
    workdir = tmp / "s3"
    workdir.mkdir(exist_ok=True)
    return {
        "pid": None,
        "starttime": None,
        "port": port,
        "argv": [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        "log": str(workdir / "moto.log"),
        "url": f"http://{HOST}:{port}",
        "bucket": BUCKET,
    }


def _http_answers(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    finally:
        conn.close()


def _ready_s3(svc: State, proc: _Child, timeout: float, log_offset: int) -> None:
    port = svc["port"]
    _wait_until(
        f"moto S3 on {HOST}:{port}",
        lambda: _http_answers(port),
        timeout,
        lambda: _check_child("s3", svc, proc, log_offset),
    )
    _check_child("s3", svc, proc, log_offset)  # the answer came from our server, not a squatter
    import boto3  # only in the virtualenv; imported here so the helpers stay stdlib-only

    session = boto3.session.Session(aws_access_key_id=AWS_KEY, aws_secret_access_key=AWS_SECRET, region_name=AWS_REGION)
    client = session.client("s3", endpoint_url=svc["url"])
    client.create_bucket(Bucket=svc["bucket"])
    client.head_bucket(Bucket=svc["bucket"])
    _update(svc, version=importlib.metadata.version("moto"))


# --------------------------------------------------------------------------- clamd


def clamd_call(socket_path: str, payload: bytes, timeout: float = 10.0) -> str:
    """Send one z-command to clamd and return its NUL-terminated answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(payload)
        answer = b""
        while not answer.endswith(b"\0"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.rstrip(b"\0").decode(errors="replace")


def clamd_scan(socket_path: str, data: bytes) -> str:
    """zINSTREAM scan of data; clamd answers 'stream: OK' or 'stream: <name> FOUND'."""
    payload = b"zINSTREAM\0" + struct.pack("!I", len(data)) + data + struct.pack("!I", 0)
    return clamd_call(socket_path, payload)


def _clamd_spec(tmp: Path) -> State:
    workdir = tmp / "clamd"
    database = workdir / "db"
    scratch = workdir / "tmp"
    for directory in (workdir, database, scratch):
        directory.mkdir(exist_ok=True)
    (database / "eicar.ndb").write_text(f"{EICAR_SIGNATURE}:0:0:{EICAR.hex()}\n")
    sock = workdir / "clamd.sock"
    logfile = workdir / "clamd.log"
    config = workdir / "clamd.conf"
    config.write_text(
        "\n".join(
            [
                f"DatabaseDirectory {database}",
                f"LocalSocket {sock}",
                "FixStaleSocket yes",
                "Foreground yes",
                f"TemporaryDirectory {scratch}",
                f"LogFile {logfile}",
                "LogTime yes",
                "SelfCheck 0",
                "Bytecode no",
                "",
            ]
        )
    )
    return {
        "pid": None,
        "starttime": None,
        "port": None,
        "argv": [CLAMD, "-c", str(config)],
        "log": str(logfile),
        "socket": str(sock),
        "config": str(config),
        "database": str(database),
    }


def _ready_clamd(svc: State, proc: _Child, timeout: float, log_offset: int) -> None:
    sock = svc["socket"]
    _wait_until(
        f"clamd on {sock}",
        lambda: clamd_call(sock, b"zPING\0", timeout=2) == "PONG",
        timeout,
        lambda: _check_child("clamd", svc, proc, log_offset),
    )
    infected = clamd_scan(sock, EICAR)
    if EICAR_SIGNATURE not in infected or not infected.endswith("FOUND"):
        raise TestEnvError(f"clamd did not flag the EICAR test file (answer {infected!r}); check {svc['database']}")
    clean = clamd_scan(sock, b"hello, clean world\n")
    if clean != "stream: OK":
        raise TestEnvError(f"clamd flagged a clean stream: {clean!r}")
    _update(svc, version=clamd_call(sock, b"zVERSION\0").split("/", 1)[0], eicar_answer=infected)


# --------------------------------------------------------------------------- postgres


def _pg_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run_quiet(argv: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=_pg_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _postgres_prefix() -> list[str]:
    """How to run PostgreSQL binaries: as the postgres OS user when we are root, directly otherwise."""
    if os.geteuid() != 0:
        return []
    runuser = _find("runuser")
    if runuser is None:
        raise TestEnvError("running as root but `runuser` is missing; PostgreSQL refuses to run as root")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise TestEnvError("running as root but there is no `postgres` OS user to run PostgreSQL as") from None
    return [runuser, "-u", "postgres", "--"]


def _postgres_spec(base: State, port: int) -> State:
    options = " ".join(
        [
            f"-p {port}",
            f"-k {shlex.quote(base['socket_dir'])}",
            f"-c listen_addresses={HOST}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=300",
        ]
    )
    argv = [*base["run_as"], base["pg_ctl"], "-D", base["data_dir"], "-l", base["log"], "-o", options]
    argv += ["-w", "-t", str(int(STARTUP_TIMEOUT)), "start"]
    url = f"postgres://{DB_USER}:{DB_PASSWORD}@{HOST}:{port}/{DB_NAME}"
    return base | {"pid": None, "starttime": None, "port": port, "options": options, "argv": argv, "url": url}


def _start_postgres(svc: State, timeout: float) -> int:
    offset = _log_size(svc["log"])
    try:
        result = _run_quiet(svc["argv"], svc["cwd"], timeout + 10)
    except subprocess.TimeoutExpired:
        raise TestEnvError(f"pg_ctl start did not return within {timeout + 10:.0f}s (log {svc['log']})") from None
    if result.returncode != 0:
        output = _log_since(svc["log"], offset) + result.stdout + result.stderr
        message = f"pg_ctl start failed with exit code {result.returncode} (log {svc['log']}):\n{_tail(output)}"
        raise PortBusy(message) if _port_busy(output) else TestEnvError(message)
    pid = int((Path(svc["data_dir"]) / "postmaster.pid").read_text().split()[0])
    _update(svc, pid=pid, starttime=_proc_starttime(pid))
    return pid


def _stop_postgres(svc: State, timeout: float = STOP_TIMEOUT) -> None:
    if not (Path(svc["data_dir"]) / "PG_VERSION").exists():
        return
    pg_ctl = [*svc["run_as"], svc["pg_ctl"], "-D", svc["data_dir"]]
    if _run_quiet([*pg_ctl, "status"], svc["cwd"], 30).returncode == 3:  # 3: no server running
        return
    for mode in ("fast", "immediate"):
        argv = [*pg_ctl, "-m", mode, "-w", "-t", str(int(timeout)), "stop"]
        try:
            result = _run_quiet(argv, svc["cwd"], timeout + 10)
        except subprocess.TimeoutExpired:
            continue
        if result.returncode == 0:
            return
        log(f"`pg_ctl stop -m {mode}` failed: {(result.stdout + result.stderr).strip()}")
    raise TestEnvError(f"could not stop PostgreSQL in {svc['data_dir']}")


def _psql(svc: State, *sql: str) -> str:
    argv = [str(PG_BIN / "psql"), "-h", HOST, "-p", str(svc["port"]), "-U", "postgres", "-d", "postgres"]
    argv += ["-v", "ON_ERROR_STOP=1", "-Atq", "-X"]
    for statement in sql:
        argv += ["-c", statement]
    result = _run_quiet(argv, svc["cwd"], 60)
    if result.returncode != 0:
        raise TestEnvError(f"psql failed: {(result.stdout + result.stderr).strip()}")
    return result.stdout.strip()


def _launch_postgres(state: State) -> None:
    tmp = Path(state["tmpdir"])
    run_as = _postgres_prefix()
    workdir = tmp / "postgres"
    workdir.mkdir()
    if run_as:
        account = pwd.getpwnam("postgres")
        os.chown(workdir, account.pw_uid, account.pw_gid)
        if _run_quiet([*run_as, "test", "-w", str(workdir)], str(workdir), 30).returncode != 0:
            raise TestEnvError(f"the postgres OS user cannot write {workdir}; point TMPDIR at a traversable directory")
    socket_dir = str(workdir)
    if len(f"{socket_dir}/.s.PGSQL.65535") > MAX_SOCKET_PATH:
        raise TestEnvError(f"socket directory {socket_dir} is too long for a Unix socket; use a shorter TMPDIR")
    base: State = {
        "pg_ctl": str(PG_BIN / "pg_ctl"),
        "data_dir": str(workdir / "data"),
        "socket_dir": socket_dir,
        "run_as": run_as,
        "cwd": str(workdir),
        "log": str(workdir / "postgres.log"),
    }
    initdb = [*run_as, str(PG_BIN / "initdb"), "-D", base["data_dir"], "-U", "postgres", "-A", "trust"]
    initdb += ["-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"]
    result = _run_quiet(initdb, base["cwd"], 120)
    if result.returncode != 0:
        raise TestEnvError(f"initdb failed:\n{_tail(result.stdout + result.stderr)}")
    _with_free_port(state, "postgres", lambda port: _postgres_spec(base, port))
    svc = state["services"]["postgres"]
    version = _psql(
        svc,
        f"CREATE ROLE {DB_USER} LOGIN SUPERUSER PASSWORD '{DB_PASSWORD}'",
        f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}",
        "SHOW server_version",
    )
    _update(svc, version=version)


# --------------------------------------------------------------------------- service helpers

_READY: dict[str, Callable[[State, _Child, float, int], None]] = {
    "redis": _ready_redis,
    "s3": _ready_s3,
    "clamd": _ready_clamd,
}


def service_running(state: State, name: str) -> bool:
    """Whether the process recorded for the service is still the one we started."""
    svc = state["services"][name]
    return _alive(svc.get("pid"), svc.get("starttime"))


def start_service(state: State, name: str, timeout: float = STARTUP_TIMEOUT) -> int:
    """Start a stopped service again with its recorded argv (same port/socket), wait until it is ready,
    record the new pid in the state file and return it. Redis and moto come back empty; the S3 bucket
    is re-created; PostgreSQL keeps its data directory."""
    svc = state["services"][name]
    if service_running(state, name):
        raise TestEnvError(f"{name} is already running (pid {svc['pid']})")
    if name == "postgres":
        pid = _start_postgres(svc, timeout)
    else:
        offset = _log_size(svc["log"])
        proc = _spawn(svc["argv"], svc["log"])
        _update(svc, pid=proc.pid, starttime=_proc_starttime(proc.pid))
        try:
            _READY[name](svc, proc, timeout, offset)
        except BaseException:
            _terminate(proc.pid, svc["starttime"])
            _update(svc, pid=None, starttime=None)
            raise
        pid = proc.pid
    save_state(state)
    return pid


def stop_service(state: State, name: str, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the service we started (by its recorded pid; PostgreSQL with `pg_ctl stop -m fast`)."""
    svc = state["services"][name]
    if name == "postgres":
        _stop_postgres(svc, timeout)
    else:
        _terminate(svc.get("pid"), svc.get("starttime"), timeout)
    _update(svc, pid=None, starttime=None)
    save_state(state)


def restart_service(state: State, name: str) -> int:
    stop_service(state, name)
    return start_service(state, name)


def _with_free_port(state: State, name: str, make_spec: Callable[[int], State]) -> None:
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        with _LOCK:
            state["services"][name] = make_spec(port)
        try:
            start_service(state, name)
            return
        except PortBusy as exc:
            if attempt == PORT_ATTEMPTS:
                raise
            log(f"{name}: port {port} was taken before the server bound it; retrying ({exc})")


def _launch_redis(state: State) -> None:
    _with_free_port(state, "redis", lambda port: _redis_spec(Path(state["tmpdir"]), port))


def _launch_s3(state: State) -> None:
    _with_free_port(state, "s3", lambda port: _s3_spec(Path(state["tmpdir"]), port))


def _launch_clamd(state: State) -> None:
    spec = _clamd_spec(Path(state["tmpdir"]))
    if len(spec["socket"]) > MAX_SOCKET_PATH:
        raise TestEnvError(f"clamd socket path {spec['socket']} is too long; use a shorter TMPDIR")
    with _LOCK:
        state["services"]["clamd"] = spec
    start_service(state, "clamd")


_LAUNCHERS: dict[str, Callable[[State], None]] = {
    "postgres": _launch_postgres,
    "redis": _launch_redis,
    "s3": _launch_s3,
    "clamd": _launch_clamd,
}


def _stop_all(state: State) -> list[str]:
    """Stop every service recorded in memory or in the state file (tests may have restarted some)."""
    views = [state]
    with contextlib.suppress(OSError, ValueError, TestEnvError):
        views.append(load_state(state["state_file"]))
    problems: list[str] = []
    for name in reversed(SERVICES):
        entries = [view.get("services", {}).get(name) for view in views]
        svcs = [svc for svc in entries if isinstance(svc, dict)]
        try:
            if name == "postgres":
                if svcs:
                    _stop_postgres(svcs[0])
                continue
            for ident in {(svc.get("pid"), svc.get("starttime")) for svc in svcs}:
                _terminate(*ident)
        except (OSError, subprocess.SubprocessError, TestEnvError) as exc:
            problems.append(f"{name}: {exc}")
    return problems


def exports(state: State) -> dict[str, str]:
    services = state["services"]
    return {
        "DATABASE_URL": services["postgres"]["url"],
        "REDIS_URL": services["redis"]["url"],
        "AWS_STORAGE_BUCKET_NAME": services["s3"]["bucket"],
        "AWS_S3_ENDPOINT_URL": services["s3"]["url"],
        "AWS_S3_REGION_NAME": AWS_REGION,
        "AWS_ACCESS_KEY_ID": AWS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "CHATAPP_CLAMD_SOCKET": services["clamd"]["socket"],
        "CHATAPP_CHROMIUM": state["chromium"],
        "CHATAPP_TESTENV_STATE": state["state_file"],
    }


# --------------------------------------------------------------------------- run


class _SignalRelay:
    """SIGINT/SIGTERM/SIGHUP: before the command runs, abort start-up; while it runs, forward the signal
    to it (we keep waiting and clean up once it exits); during clean-up, ignore."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.launching = False
        self.cleaning = False
        self.pending: list[int] = []

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.cleaning:
            log(f"got {signal.Signals(signum).name} while stopping the services; finishing the clean-up first")
            return
        if self.launching:
            self.pending.append(signum)
            return
        if self.child is None:
            raise _Interrupted(signum)
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        if signum == signal.SIGINT and self._terminal_sent_it_too(child.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)

    @staticmethod
    def _terminal_sent_it_too(pid: int) -> bool:
        """Ctrl-C reaches the whole foreground process group; forwarding it again would deliver it twice."""
        try:
            same_group = os.getpgid(pid) == os.getpgrp()
        except OSError:
            return False
        for stream in (sys.stdin, sys.stderr, sys.stdout):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return same_group and os.tcgetpgrp(stream.fileno()) == os.getpgrp()
        return False

    def run(self, cmd: list[str], env: dict[str, str]) -> int:
        self.launching = True
        try:
            try:
                self.child = subprocess.Popen(cmd, env=env)
            except OSError as exc:
                log(f"error: cannot run {cmd[0]!r}: {exc}")
                return 127 if isinstance(exc, FileNotFoundError) else 126
        finally:
            self.launching = False
            pending, self.pending = self.pending, []
        for signum in pending:
            if self.child is None:
                raise _Interrupted(signum)
            self._forward(signum)
        code = self.child.wait()
        return 128 - code if code < 0 else code


def _remove_tree(path: Path) -> list[str]:
    problems: list[str] = []

    def onerror(func: Callable[..., Any], failed: str, exc_info: Any) -> None:
        problems.append(f"could not remove {failed}: {exc_info[1]}")

    shutil.rmtree(path, onerror=onerror)
    return problems


def _banner(state: State, elapsed: float) -> None:
    services = state["services"]
    pg, redis, s3, clamd = (services[name] for name in SERVICES)
    log(f"PostgreSQL {pg['version']} on {HOST}:{pg['port']} pid {pg['pid']} (data {pg['data_dir']})")
    log(f"Redis {redis['version']} on {HOST}:{redis['port']} pid {redis['pid']}")
    log(f"S3 (moto {s3['version']}) on {s3['url']} pid {s3['pid']}, bucket {s3['bucket']}")
    log(f"{clamd['version']} (clamd) on {clamd['socket']} pid {clamd['pid']}, EICAR test signature only")
    log(f"Chromium at {state['chromium']} (launched by the tests through Playwright)")
    log(f"services up in {elapsed:.1f}s; state in {state['state_file']}")


def run(cmd: list[str]) -> int:
    ensure()
    for module in ("moto", "boto3"):
        if importlib.util.find_spec(module) is None:
            raise TestEnvError(f"python module {module!r} is missing: run this script with the virtualenv's python")
    chromium = _find("chromium")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="chatapp-testenv-"))
    tmp.chmod(0o755)
    state: State = {
        "version": 1,
        "tmpdir": str(tmp),
        "state_file": str(tmp / "state.json"),
        "chromium": chromium,
        "services": {},
    }
    relay = _SignalRelay()
    relay.install()
    executor = ThreadPoolExecutor(max_workers=len(_LAUNCHERS), thread_name_prefix="testenv")
    code = 1
    try:
        futures: dict[str, Future[None]] = {name: executor.submit(fn, state) for name, fn in _LAUNCHERS.items()}
        _, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        if pending:  # one launcher failed: make the others give up quickly
            _ABORT.set()
            wait(pending)
        failed = {name: fut.exception() for name, fut in futures.items() if fut.exception() is not None}
        causes = {name: exc for name, exc in failed.items() if not isinstance(exc, _Aborted)} or failed
        errors = [f"{name}: {exc}" for name, exc in causes.items()]
        if errors:
            raise TestEnvError("could not start the test services:\n  " + "\n  ".join(errors))
        save_state(state)
        _banner(state, time.monotonic() - started)
        code = relay.run(cmd, os.environ | exports(state))
    except TestEnvError as exc:
        log(f"error: {exc}")
        code = 1
    except _Interrupted as exc:
        log(f"interrupted by {exc}; stopping the services")
        code = 128 + exc.signum
    finally:
        relay.cleaning = True
        _ABORT.set()
        executor.shutdown(wait=True, cancel_futures=True)
        problems = _stop_all(state) + _remove_tree(tmp)
        for problem in problems:
            log(f"clean-up problem: {problem}")
        if problems and code == 0:
            code = 1
    return code


USAGE = "usage: testenv.py ensure | testenv.py run -- COMMAND [ARGS...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    action, rest = argv[0], argv[1:]
    try:
        if action == "ensure" and not rest:
            ensure()
            return 0
        if action == "run":
            cmd = rest[1:] if rest[:1] == ["--"] else rest
            if cmd:
                return run(cmd)
    except TestEnvError as exc:
        log(f"error: {exc}")
        return 1
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
