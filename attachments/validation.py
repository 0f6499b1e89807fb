"""What an upload is, decided by its bytes (never its name or claimed type), and making images safe.

``sniff`` maps the magic bytes (the ``filetype`` library, then a small text classifier) onto the
allowlist below, or refuses. ``image_process`` hands an image to ``attachments.imaging`` in a
memory-limited worker process, a bounded number at once: it is sized from its headers before
anything is decoded, re-encoded to only its pixels (colours converted to sRGB; EXIF, XMP, ICC
profiles, comments, text chunks and anything appended to the file are gone) and thumbnailed.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filetype
from django.conf import settings

from attachments.models import AttachmentKind
from chatapp.errors import InvalidInput, ServiceError, TooLarge

logger = logging.getLogger(__name__)

SNIFF_BYTES = 8192


@dataclass(frozen=True)
class FileType:
    mime: str
    kind: str
    extension: str
    # Served with ``Content-Disposition: inline`` (shown in the page); everything else is a download.
    inline: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def extensions(self) -> tuple[str, ...]:
        return (self.extension, *self.aliases)


_OOXML = "application/vnd.openxmlformats-officedocument"
_TYPES = [
    FileType("image/png", AttachmentKind.IMAGE, "png", inline=True),
    FileType("image/jpeg", AttachmentKind.IMAGE, "jpg", inline=True, aliases=("jpeg", "jpe", "jfif")),
    FileType("image/gif", AttachmentKind.IMAGE, "gif", inline=True),
    FileType("image/webp", AttachmentKind.IMAGE, "webp", inline=True),
    FileType("video/mp4", AttachmentKind.VIDEO, "mp4", inline=True, aliases=("m4v",)),
    FileType("video/webm", AttachmentKind.VIDEO, "webm", inline=True),
    FileType("video/quicktime", AttachmentKind.VIDEO, "mov", aliases=("qt",)),
    FileType("application/pdf", AttachmentKind.DOCUMENT, "pdf"),
    FileType("application/zip", AttachmentKind.DOCUMENT, "zip"),
    FileType(f"{_OOXML}.wordprocessingml.document", AttachmentKind.DOCUMENT, "docx"),
    FileType(f"{_OOXML}.spreadsheetml.sheet", AttachmentKind.DOCUMENT, "xlsx"),
    FileType(f"{_OOXML}.presentationml.presentation", AttachmentKind.DOCUMENT, "pptx"),
    FileType("application/vnd.oasis.opendocument.text", AttachmentKind.DOCUMENT, "odt"),
    FileType("application/vnd.oasis.opendocument.spreadsheet", AttachmentKind.DOCUMENT, "ods"),
    FileType("application/vnd.oasis.opendocument.presentation", AttachmentKind.DOCUMENT, "odp"),
    FileType("text/plain", AttachmentKind.DOCUMENT, "txt"),
    FileType("application/xml", AttachmentKind.DOCUMENT, "xml"),
    FileType("image/svg+xml", AttachmentKind.DOCUMENT, "svg"),
]
ALLOWED: dict[str, FileType] = {t.mime: t for t in _TYPES}
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}


class Refused(InvalidInput):
    """The file is not acceptable; ``reason`` says why (unsupported_type, html, scripted_svg, image_invalid...)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


# Names a browser or desktop would open as active content; a text file saved under one gets ".txt".
_ACTIVE_EXTENSIONS = frozenset(
    {"htm", "html", "xhtml", "xht", "shtml", "mht", "mhtml", "hta", "svg", "svgz", "xml", "xsl", "xslt", "js", "mjs"}
)


def download_name(name: str, mime: str) -> str:
    """The file name to serve: the uploader's, with the sniffed type's extension added when it lies.

    ``evil.html`` that sniffed as plain text downloads as ``evil.html.txt``, a PNG named
    ``report.pdf`` as ``report.pdf.png``: the saved file opens as what it is.
    """
    ftype = ALLOWED.get(mime)
    if ftype is None:
        return name
    _, dot, ext = name.rpartition(".")
    ext = ext.lower() if dot else ""
    if ftype.mime == "text/plain":
        return f"{name}.txt" if ext in _ACTIVE_EXTENSIONS else name
    return name if ext in ftype.extensions else f"{name}.{ftype.extension}"


def kind_limits() -> dict[str, int]:
    return {
        AttachmentKind.IMAGE: settings.ATTACHMENT_MAX_IMAGE_BYTES,
        AttachmentKind.VIDEO: settings.ATTACHMENT_MAX_VIDEO_BYTES,
        AttachmentKind.DOCUMENT: settings.ATTACHMENT_MAX_DOCUMENT_BYTES,
    }


def max_upload_bytes() -> int:
    """The largest cap of any kind: what an upload may be before its bytes say what it is."""
    return max(kind_limits().values())


def check_upload_size(size: int) -> None:
    """TooLarge (413) over every kind's cap: refused before anything looks at the bytes."""
    limit = max_upload_bytes()
    if size > limit:
        raise TooLarge(f"Uploads are limited to {_mb(limit)}.", limit=limit)


def declared_kind(content_type: str) -> str:
    """The kind a client's claimed type suggests; only used to refuse an oversize request early."""
    major = content_type.split("/", 1)[0].strip().lower()
    return {"image": AttachmentKind.IMAGE, "video": AttachmentKind.VIDEO}.get(major, AttachmentKind.DOCUMENT)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


def check_size(*, kind: str, size: int) -> None:
    """TooLarge (413) over the kind's cap."""
    limit = kind_limits()[kind]
    if size > limit:
        raise TooLarge(f"{AttachmentKind(kind).label}s are limited to {_mb(limit)}.", limit=limit, kind=kind)


# --------------------------------------------------------------------------- sniffing

# The WHATWG MIME sniffing rules: what a browser would treat as HTML when it sees these first.
_HTML_START = re.compile(
    rb"^(?:<!doctype\s+html|<html|<head|<script|<iframe|<h1|<div|<font|<table|<a|<style|<title|<b|<body|<br|<p"
    rb"|<!--)(?:[\s>]|$)"
)
_XML_PROLOG = re.compile(rb"^(?:<\?xml[^>]*\?>|<!--.*?-->|<!doctype[^>\[]*(?:\[.*?\])?\s*>|\s+)", re.DOTALL)
_ROOT = re.compile(rb"^<([a-z_][\w.:-]*)")
# Active content in SVG or XML. Coarse on purpose: such files are always served as downloads
# in a sandbox anyway; this keeps them from running when someone opens the saved file locally.
_ACTIVE_MARKUP = re.compile(
    rb"<script|<foreignobject|<iframe|<embed|<object|<handler|<!entity|javascript:|vbscript:|data:text/html"
    rb"|\bon[a-z]+\s*=|href\s*=\s*[\"'][^\"']*&#|http://www\.w3\.org/1999/xhtml"
)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def _is_utf8_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        # Incremental: the head may end inside a multi-byte character.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _contains(path: Path, pattern: re.Pattern[bytes], *, chunk: int = 64 * 1024, overlap: int = 256) -> bool:
    """Search the whole file, lowercased, in chunks (never the whole file in memory)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            window = tail + block.lower()
            if pattern.search(window):
                return True
            tail = window[-overlap:]
    return False


def _classify_text(path: Path, head: bytes) -> FileType:
    text = head.removeprefix(codecs.BOM_UTF8).lstrip().lower()
    if _HTML_START.match(text):
        raise Refused("HTML files are not accepted.", reason="html")
    if not text.startswith(b"<"):
        return ALLOWED["text/plain"]
    rest = text
    while (prolog := _XML_PROLOG.match(rest)) and prolog.end() > 0:
        rest = rest[prolog.end() :]
    root = _ROOT.match(rest)
    if root is None:
        return ALLOWED["text/plain"]
    name = root.group(1).rsplit(b":", 1)[-1]
    if name == b"html":
        raise Refused("HTML files are not accepted.", reason="html")
    active = _contains(path, _ACTIVE_MARKUP)
    if name == b"svg":
        if active:
            raise Refused(
                "SVG files with scripts, event handlers or embedded HTML are not accepted.", reason="scripted_svg"
            )
        return ALLOWED["image/svg+xml"]
    if active:
        raise Refused("XML files with scripts or embedded HTML are not accepted.", reason="html")
    return ALLOWED["application/xml"]


def sniff(path: Path) -> FileType:
    """The file's type from its bytes, on the allowlist, or Refused."""
    head = _read_head(path)
    if not head:
        raise Refused("The file is empty.", reason="empty")
    guess = filetype.guess(head)
    if guess is not None:
        found = ALLOWED.get(guess.mime)
        if found is None or found.mime in ("text/plain", "application/xml", "image/svg+xml"):
            raise Refused(f"Files of type {guess.mime} are not accepted.", reason="unsupported_type")
        return found
    if _is_utf8_text(head):
        return _classify_text(path, head)
    raise Refused("This type of file is not accepted.", reason="unsupported_type")


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ProcessedImage:
    path: Path  # the re-encoded image (a temporary file the caller removes)
    width: int
    height: int
    thumbnail: bytes  # WebP


class ImagesBusy(ServiceError):
    """No image worker could take the upload in time; nothing was accepted (503, try again)."""

    status = 503
    code = "images_busy"
    default_message = "Too many images are being processed; try again shortly."


# At most ATTACHMENT_IMAGE_WORKERS images are processed at once per server process. Rebuilt when
# the setting changes (tests); a slot taken from the old one is returned to the old one.
_slots_lock = threading.Lock()
_slots: tuple[int, threading.BoundedSemaphore] | None = None


def _image_slots() -> threading.BoundedSemaphore:
    global _slots
    size = max(1, int(settings.ATTACHMENT_IMAGE_WORKERS))
    with _slots_lock:
        if _slots is None or _slots[0] != size:
            _slots = (size, threading.BoundedSemaphore(size))
        return _slots[1]


@contextmanager
def image_slot() -> Iterator[None]:
    """Hold one of the process's image slots; ImagesBusy if none frees up within the timeout."""
    slots = _image_slots()
    if not slots.acquire(timeout=settings.ATTACHMENT_IMAGE_TIMEOUT):
        raise ImagesBusy()
    try:
        yield
    finally:
        slots.release()


# What the worker's environment keeps: enough to start Python, none of the server's secrets.
_WORKER_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "PYTHONPATH", "TMPDIR")


def _run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run attachments.imaging on one job in a fresh process under the memory limit; killed at the timeout."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "attachments.imaging"],
            input=json.dumps(job).encode(),
            capture_output=True,
            cwd=settings.BASE_DIR,
            env={name: os.environ[name] for name in _WORKER_ENVIRONMENT if name in os.environ},
            timeout=settings.ATTACHMENT_IMAGE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TooLarge("The image took too long to process.", reason="too_complex") from None
    except OSError as exc:
        logger.error("image worker could not start: %s", exc)
        raise ImagesBusy("Images cannot be processed right now; try again shortly.") from None
    try:
        outcome: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        outcome = {}
    if done.returncode != 0 or not isinstance(outcome, dict) or not outcome:
        # Killed (the memory limit hit outside Python's reach) or crashed in a decoder.
        logger.warning(
            "image worker failed (exit %s): %s", done.returncode, done.stderr.decode(errors="replace")[-2000:]
        )
        raise _refuse_image()
    return outcome


def _temporary_file(workdir: Path, *, suffix: str) -> Path:
    """A new empty file's path; the descriptor ``mkstemp`` opens is closed (the worker writes it)."""
    descriptor, name = tempfile.mkstemp(dir=workdir, suffix=suffix)
    os.close(descriptor)
    return Path(name)


def image_process(path: Path, ftype: FileType, *, workdir: Path) -> ProcessedImage:
    """Re-encode an allowed image to only its pixels and make its thumbnail, in a worker process.

    Refused (400) for anything that is not a decodable image of the sniffed format; TooLarge
    (413) past ``ATTACHMENT_MAX_IMAGE_PIXELS`` per frame, ``ATTACHMENT_MAX_ANIMATION_PIXELS`` or
    ``ATTACHMENT_MAX_ANIMATION_FRAMES`` per animation (decided from the headers before
    decoding), or past the worker's memory or time limit; ImagesBusy (503) when every image
    slot stays taken for the timeout.
    """
    dest = _temporary_file(workdir, suffix=f".{ftype.extension}")
    thumbnail = _temporary_file(workdir, suffix=".webp")
    job = {
        "source": str(path),
        "format": PIL_FORMATS[ftype.mime],
        "dest": str(dest),
        "thumbnail": str(thumbnail),
        "max_pixels": settings.ATTACHMENT_MAX_IMAGE_PIXELS,
        "max_animation_pixels": settings.ATTACHMENT_MAX_ANIMATION_PIXELS,
        "max_frames": settings.ATTACHMENT_MAX_ANIMATION_FRAMES,
        "thumbnail_px": settings.ATTACHMENT_THUMBNAIL_PX,
        "memory_mb": settings.ATTACHMENT_IMAGE_MEMORY_MB,
    }
    try:
        with image_slot():
            outcome = _run_worker(job)
        if "refused" in outcome:
            message, reason = str(outcome.get("message", "")), str(outcome["refused"])
            if outcome.get("too_large"):
                raise TooLarge(message, reason=reason)
            raise Refused(message or "The image could not be read.", reason=reason)
        return ProcessedImage(
            path=dest, width=int(outcome["width"]), height=int(outcome["height"]), thumbnail=thumbnail.read_bytes()
        )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        thumbnail.unlink(missing_ok=True)


def _refuse_image(detail: str = "The image could not be read.") -> Refused:
    return Refused(detail, reason="image_invalid")
