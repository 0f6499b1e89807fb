"""What an upload is, decided by its bytes (never its name or claimed type), and making images safe.

``sniff`` maps the magic bytes (the ``filetype`` library, then a small text classifier) onto the
allowlist below, or refuses. ``image_process`` opens images with Pillow restricted to the four
allowed formats, refuses decompression bombs from the header alone, re-encodes the pixels (so
EXIF/XMP/comments and anything appended to the file are gone) and makes a WebP thumbnail.
"""

from __future__ import annotations

import codecs
import io
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filetype
from django.conf import settings
from PIL import Image, ImageOps, UnidentifiedImageError

from attachments.models import AttachmentKind
from chatapp.errors import InvalidInput, TooLarge

# Pillow warns from half its limit (set to half our cap in _check_pixels); our caps decide, not that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

SNIFF_BYTES = 8192
# Animated images may decode to at most this many times the per-frame pixel cap in total.
ANIMATION_PIXEL_FACTOR = 4


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
# Image metadata that survives re-encoding: how frames play and how colours render, nothing about the author.
_KEPT_IMAGE_INFO = {"transparency", "duration", "loop", "background", "disposal", "blend", "icc_profile"}


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


def _refuse_image(detail: str = "The image could not be read.") -> Refused:
    return Refused(detail, reason="image_invalid")


def _check_pixels(im: Image.Image) -> None:
    """Refuse what would take too many pixels to decode, before decoding it.

    The header's size is not enough for an animation: a frame may be larger than the canvas the
    header declares (Pillow grows the canvas when it reaches that frame). So every frame is visited
    and its size checked, stopping as soon as a frame, or all frames so far, pass the caps; what
    visiting decodes is bounded by the frames already checked. Pillow's own limit is set to the
    same cap meanwhile (:func:`image_process`), so a frame it sizes while decoding fails there too.
    """
    cap = settings.ATTACHMENT_MAX_IMAGE_PIXELS
    frames = int(getattr(im, "n_frames", 1))
    total = 0
    for index in range(frames):
        if index:
            im.seek(index)
        width, height = im.size
        if width < 1 or height < 1:
            raise _refuse_image()
        if width * height > cap:
            raise TooLarge(
                f"The image is {width}x{height} pixels; images are limited to {cap:,} pixels.",
                reason="too_many_pixels",
            )
        total += width * height
        if total > cap * ANIMATION_PIXEL_FACTOR:
            raise TooLarge(f"The animation has too many frames ({frames}) for its size.", reason="too_many_pixels")
    if frames > 1:
        im.seek(0)


def _save_clean(im: Image.Image, fmt: str, dest: Path) -> None:
    animated = int(getattr(im, "n_frames", 1)) > 1 and fmt in ("GIF", "WEBP")
    options: dict[str, Any] = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    # Encoders take the colour profile only as an option, not from ``info``.
    icc_profile = im.info.get("icc_profile")
    if animated:
        # Frames are re-read from the source while saving; only the playback metadata stays.
        im.info = {k: v for k, v in im.info.items() if k in _KEPT_IMAGE_INFO}
        im.save(dest, format=fmt, save_all=True, **options, **({"icc_profile": icc_profile} if icc_profile else {}))
        return
    clean = ImageOps.exif_transpose(im)  # keep the orientation the EXIF tag asked for, then drop the tag
    if fmt == "JPEG" and clean.mode not in ("RGB", "L"):
        clean = clean.convert("RGB")
        icc_profile = None  # a CMYK profile does not describe the converted pixels
    clean.info = {k: v for k, v in im.info.items() if k in _KEPT_IMAGE_INFO and k not in ("duration", "icc_profile")}
    if icc_profile:
        options["icc_profile"] = icc_profile
    clean.save(dest, format=fmt, **options)


def _thumbnail(im: Image.Image) -> bytes:
    im.seek(0)
    thumb = ImageOps.exif_transpose(im.copy())
    thumb = thumb.convert("RGBA" if thumb.mode in ("RGBA", "LA", "P", "PA") else "RGB")
    size = settings.ATTACHMENT_THUMBNAIL_PX
    thumb.thumbnail((size, size))
    out = io.BytesIO()
    thumb.save(out, format="WEBP", quality=80)
    return out.getvalue()


def image_process(path: Path, ftype: FileType, *, workdir: Path) -> ProcessedImage:
    """Re-encode an allowed image without its metadata and make its thumbnail.

    Refused for anything Pillow cannot decode as the sniffed format; TooLarge (413) for a
    pixel count over ``ATTACHMENT_MAX_IMAGE_PIXELS``, decided from the header before decoding.
    """
    fmt = PIL_FORMATS[ftype.mime]
    dest = Path(tempfile.mkstemp(dir=workdir, suffix=f".{ftype.extension}")[1])
    pillow_limit = Image.MAX_IMAGE_PIXELS
    # Pillow raises DecompressionBombError past twice this: past our cap, wherever it sizes an image.
    Image.MAX_IMAGE_PIXELS = max(1, (settings.ATTACHMENT_MAX_IMAGE_PIXELS + 1) // 2)
    try:
        with Image.open(path, formats=[fmt]) as im:
            if im.format != fmt:
                raise _refuse_image()
            _check_pixels(im)
            im.load()
            thumbnail = _thumbnail(im)
            im.seek(0)
            _save_clean(im, fmt, dest)
        with Image.open(dest) as stored:
            width, height = stored.size
    except Image.DecompressionBombError:
        dest.unlink(missing_ok=True)
        raise TooLarge("The image has too many pixels.", reason="too_many_pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError):
        dest.unlink(missing_ok=True)
        raise _refuse_image() from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    return ProcessedImage(path=dest, width=width, height=height, thumbnail=thumbnail)
