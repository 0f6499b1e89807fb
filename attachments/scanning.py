"""Virus scanning: one small interface, a ClamAV backend (clamd's INSTREAM over its unix socket).

Scans run synchronously inside the upload request (docs/attachments.md). The INSTREAM client is
written out here (~30 lines) rather than taken from the ``clamd`` package: its last release
(2015) sends 1 KB chunks with ``socket.send`` and ignores short writes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from django.conf import settings

from chatapp.errors import ServiceError

CHUNK_BYTES = 64 * 1024


class ScannerUnavailable(ServiceError):
    """The scanner could not give a verdict; the file stays quarantined (503, try again later)."""

    status = 503
    code = "scanner_unavailable"
    default_message = "The virus scanner is unavailable; try again shortly."


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    detail: str  # the signature name when infected, else which scanner passed it


class Scanner(Protocol):
    def scan(self, path: Path) -> ScanResult: ...


class NoScanner:
    """Used when ClamAV is not configured: only the built-in checks (validation.py) apply."""

    def scan(self, path: Path) -> ScanResult:
        return ScanResult(infected=False, detail="not scanned (no antivirus configured)")


class ClamdScanner:
    def __init__(self, socket_path: str, *, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _instream(self, path: Path) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.sendall(b"zINSTREAM\0")
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    sock.sendall(struct.pack("!I", len(chunk)) + chunk)
            sock.sendall(struct.pack("!I", 0))
            answer = b""
            while not answer.endswith(b"\0"):
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
        return answer.rstrip(b"\0").decode(errors="replace").strip()

    def scan(self, path: Path) -> ScanResult:
        try:
            answer = self._instream(path)
        except OSError as exc:
            # A stream over clamd's StreamMaxLength ends with clamd closing the socket mid-send.
            raise ScannerUnavailable(detail=f"clamd: {exc.__class__.__name__}") from exc
        # "stream: OK", "stream: Eicar-Signature FOUND", or "INSTREAM size limit exceeded. ERROR".
        if answer.endswith(" FOUND"):
            signature = answer.removeprefix("stream:").removesuffix(" FOUND").strip()
            return ScanResult(infected=True, detail=signature[:200] or "unknown signature")
        if answer == "stream: OK":
            return ScanResult(infected=False, detail="clamav: OK")
        raise ScannerUnavailable(detail=f"clamd: {answer[:200]}")


def get_scanner() -> Scanner:
    if settings.CLAMAV_ENABLED:
        return ClamdScanner(settings.CLAMD_SOCKET, timeout=settings.CLAMD_TIMEOUT_SECONDS)
    return NoScanner()
