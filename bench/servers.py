"""Server subprocesses on sockets bound here to port 0 and handed over by file descriptor (no port race).

Used by the benchmark and by the end-to-end socket tests (tests/live.py).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class CpuBudget:
    """A cgroup that holds the processes put in it to ``cpus`` CPUs in all (a CFS quota, as a
    container's CPU limit does), so that one server's share of the machine is fixed however busy the
    rest of it is. cgroup v1 (``cpu`` controller) or v2 (``cpu.max``); raises ``OSError`` where
    neither can be written (not root, or no CPU controller).

    The period is short (10 ms) so a process that spends its quota early waits milliseconds, not a
    tenth of a second, before it runs again.
    """

    PERIOD_US = 10_000

    def __init__(self, name: str, cpus: float) -> None:
        quota = max(1000, int(cpus * self.PERIOD_US))
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            v2 = Path("/sys/fs/cgroup")
            if "cpu" not in (v2 / "cgroup.controllers").read_text().split():
                raise OSError("no cgroup CPU controller on this machine")
            (v2 / "cgroup.subtree_control").write_text("+cpu")
            self.path = v2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Delete the cgroup (its processes must have exited)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


class ServerProcess:
    """A server in its own process group, listening on an inherited socket.

    ``argv`` may contain ``{fd}``, replaced by the socket's file descriptor. ``stop()`` sends
    SIGTERM and waits; ``kill()`` sends SIGKILL. Output goes to a temporary log file.
    """

    def __init__(self, argv: Iterable[str], *, env: Mapping[str, str] | None = None, name: str = "server") -> None:
        self.sock = listening_socket()
        self.port = int(self.sock.getsockname()[1])
        self.argv = [part.replace("{fd}", str(self.sock.fileno())) for part in argv]
        self.env = dict(env or {})
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-{self.port}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self.budget: CpuBudget | None = None

    @classmethod
    def daphne(cls, app: str = "chatapp.asgi:application", *, env: Mapping[str, str] | None = None) -> ServerProcess:
        argv = [str(BIN / "daphne"), "--fd", "{fd}", "-v", "1", "--access-log", os.devnull, app]
        return cls(argv, env=env, name="daphne")

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def limit_cpu(self, cpus: float) -> ServerProcess:
        """Hold this server to ``cpus`` CPUs (a cgroup of its own), from its start; see ``CpuBudget``."""
        self.budget = CpuBudget(f"chatapp-bench-{os.getpid()}-{self.port}", cpus)
        return self

    def start(self, extra_env: Mapping[str, str] | None = None) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(extra_env or {})}
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            pass_fds=(self.sock.fileno(),),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.budget is not None:
            self.budget.add(self.proc.pid)  # before Python has started a thread: they all inherit it
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the server answers an HTTP request (any status) on its socket."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"server on {self.port} exited:\n{self.output()}")
            try:
                probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                probe.request("GET", "/ready-probe", headers={"Host": "127.0.0.1"})
                probe.getresponse().read()
                probe.close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server on {self.port} did not answer in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self.budget is not None:
            self.budget.remove()
        self.sock.close()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def start_all(servers: list[ServerProcess], extra_env: Mapping[str, str] | None = None) -> list[ServerProcess]:
    """Start servers in parallel and wait for all of them; on failure, close them all."""
    for server in servers:
        server.start(extra_env)
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers
