"""Attachments against the real S3 server (moto over HTTP) and the real clamd: uploads, the
presigned flow, every kind of bad file, permissions, signed URL lifetimes, revocation, cleanup."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image
from rest_framework.test import APIClient

from accounts.models import AuditEntry, User
from attachments import storage
from attachments.models import Attachment, AttachmentKind, ScanStatus
from chatapp.broadcast import thread_group
from chatapp.errors import InvalidInput
from messaging.models import Message
from messaging.services import message_delete, message_send
from tests.conftest import EventCapture, needs
from threads.models import Thread

pytestmark = pytest.mark.django_db

Api = Callable[[User | None], APIClient]

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SECRET = b"SECRETCAMERA"


# --------------------------------------------------------------------------- sample files


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else None).save(out, "PNG")
    return out.getvalue()


def noise_png(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress: about 3 bytes per pixel."""
    out = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(out, "PNG")
    return out.getvalue()


def jpeg_with_exif(size: tuple[int, int] = (640, 480)) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = SECRET.decode()  # Make
    exif[0x0112] = 6  # Orientation: rotate 90 degrees on display
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(out, "JPEG", exif=exif, comment=b"SECRETCOMMENT")
    return out.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def pixel_bomb(width: int = 50000, height: int = 50000) -> bytes:
    """A few hundred bytes declaring a width x height 8-bit greyscale image."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + png_chunk(b"IEND", b"")
    )


HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
SCRIPTED_SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><circle r="4" onload="alert(1)"/></svg>'
CLEAN_SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _text(value: str) -> bytes:
    encoded = value.encode("utf-16-be")
    return b"mluc\0\0\0\0" + struct.pack(">II4sII", 1, 12, b"enUS", len(encoded), 28) + encoded


def icc_profile(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v4 display profile of colour ``space`` (b"RGB " or b"GRAY") with these tags."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = struct.pack(">I4sI4s4s4s", offset + len(data), b"", 0x04300000, b"mntr", space, b"XYZ ")
    header += b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48
    return header + struct.pack(">I", len(tags)) + table + data


def display_p3_profile(description: str = "Display P3") -> bytes:
    """A valid Display P3 profile (Apple's D50 colorants, sRGB-shaped curves), with ``description``
    in its text tag: any text at all can ride in a profile that parses."""
    curve = b"para\0\0\0\0" + struct.pack(">HH", 3, 0)
    curve += b"".join(_s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    return icc_profile(
        b"RGB ",
        [
            (b"desc", _text(description)),
            (b"cprt", _text("No copyright")),
            (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", _xyz(0.51512146, 0.24119568, -0.00105286)),
            (b"gXYZ", _xyz(0.29197693, 0.69222355, 0.04188538)),
            (b"bXYZ", _xyz(0.15710449, 0.06657410, 0.78407288)),
            (b"rTRC", curve),
            (b"gTRC", curve),
            (b"bTRC", curve),
        ],
    )


def grey_profile(gamma: float) -> bytes:
    """A greyscale profile with a pure power curve."""
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))
    return icc_profile(
        b"GRAY", [(b"desc", _text(f"Grey {gamma}")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"kTRC", curve)]
    )


def p3_to_srgb(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """What a Display P3 colour is in sRGB, by the published matrix (not by LittleCMS)."""

    def linear(c: int) -> float:
        v = c / 255
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    def encoded(v: float) -> int:
        v = min(max(v, 0.0), 1.0)
        return round(255 * (12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055))

    r, g, b = (linear(c) for c in colour)
    matrix = ((1.2249401, -0.2249404, 0.0), (-0.0420569, 1.0420571, 0.0), (-0.0196376, -0.0786361, 1.0982735))
    red, green, blue = (encoded(m[0] * r + m[1] * g + m[2] * b) for m in matrix)
    return red, green, blue


def upload(
    client: APIClient, thread: Thread, name: str, data: bytes, content_type: str = "application/octet-stream"
) -> Any:
    return client.post(
        f"/api/v1/threads/{thread.pk}/attachments",
        {"file": SimpleUploadedFile(name, data, content_type=content_type)},
        format="multipart",
    )


def stored_bytes(key: str) -> bytes:
    with storage.get_storage().open(key, "rb") as f:
        return bytes(f.read())


def error(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


@pytest.fixture
def s3_and_clamd() -> None:
    needs("s3")
    needs("clamd")
    assert storage.is_s3()


# --------------------------------------------------------------------------- round trip


def test_upload_send_and_download_round_trip_on_s3(
    s3_and_clamd: None,
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    response = upload(api(bob), thread, "whiteboard.jpg", jpeg_with_exif(), "image/jpeg")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "CLEAN"
    assert (body["kind"], body["content_type"]) == ("IMAGE", "image/jpeg")
    # The EXIF orientation was applied to the pixels before the tag was dropped.
    assert (body["width"], body["height"]) == (480, 640)
    assert body["has_thumbnail"] is True
    attachment = Attachment.objects.get(pk=body["id"])
    assert attachment.scan_detail == "clamav: OK"
    stored = stored_bytes(attachment.storage_key)
    assert SECRET not in stored
    assert b"SECRETCOMMENT" not in stored
    assert Image.open(io.BytesIO(stored)).getexif().get(0x010F) is None

    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        message, created = message_send(
            sender=bob, thread_id=thread.pk, body="", client_msg_id="with-file", attachment_ids=[attachment.pk]
        )
    assert created
    (event,) = capture.receive_all()
    assert event["type"] == "message.created"
    (carried,) = event["data"]["message"]["attachments"]
    assert carried == {
        "id": attachment.pk,
        "name": "whiteboard.jpg",
        "size": attachment.size,
        "kind": "IMAGE",
        "content_type": "image/jpeg",
        "width": 480,
        "height": 640,
        "has_thumbnail": True,
        "url": f"/api/v1/attachments/{attachment.pk}/download",
        "thumbnail_url": f"/api/v1/attachments/{attachment.pk}/thumbnail",
    }

    # Another member follows the event's URLs: a redirect to a presigned S3 URL, fetched over HTTP.
    redirect = api(alice).get(carried["url"])
    assert redirect.status_code == 302
    assert redirect["Cache-Control"] == "private, no-store"
    fetched = requests.get(redirect["Location"], timeout=10)
    assert fetched.status_code == 200
    assert fetched.content == stored
    assert fetched.headers["Content-Type"] == "image/jpeg"
    assert fetched.headers["Content-Disposition"].startswith("inline")
    thumb = requests.get(api(alice).get(carried["thumbnail_url"])["Location"], timeout=10)
    assert thumb.status_code == 200
    assert (thumb.content[:4], thumb.content[8:12]) == (b"RIFF", b"WEBP")
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 320
    assert message.attachments.get().attached_at is not None


def test_presigned_post_flow_on_s3(s3_and_clamd: None, api: Api, alice: User, bob: User, thread: Thread) -> None:
    data = png_bytes((300, 200))
    asked = api(bob).post(
        f"/api/v1/threads/{thread.pk}/attachments/uploads",
        {"name": "chart.png", "size": len(data), "content_type": "image/png"},
        format="json",
    )
    assert asked.status_code == 201, asked.json()
    ticket = asked.json()["upload"]
    attachment_id = asked.json()["attachment"]["id"]
    assert asked.json()["attachment"]["status"] == "PENDING"
    assert asked.json()["attachment"]["url"] is None
    # The POST policy is pinned to one quarantine key and exactly the declared size.
    policy = json.loads(base64.b64decode(ticket["fields"]["policy"]))
    assert ["content-length-range", len(data), len(data)] in policy["conditions"]
    quarantined = ticket["fields"]["key"]
    assert quarantined.startswith("quarantine/")
    assert {"key": quarantined} in policy["conditions"]

    # Quarantined: neither downloadable nor attachable, and "complete" needs the bytes first.
    assert api(bob).get(f"/api/v1/attachments/{attachment_id}/download").status_code == 404
    with pytest.raises(InvalidInput):
        message_send(sender=bob, thread_id=thread.pk, body="x", client_msg_id="early", attachment_ids=[attachment_id])
    early = api(bob).post(f"/api/v1/attachments/{attachment_id}/complete")
    assert early.status_code == 400
    assert error(early)["reason"] == "not_uploaded"

    sent = requests.post(ticket["url"], data=ticket["fields"], files={"file": ("chart.png", data)}, timeout=10)
    assert sent.status_code == 204, sent.text
    completed = api(bob).post(f"/api/v1/attachments/{attachment_id}/complete")
    assert completed.status_code == 200, completed.json()
    assert completed.json()["status"] == "CLEAN"
    assert (completed.json()["width"], completed.json()["height"]) == (300, 200)
    attachment = Attachment.objects.get(pk=attachment_id)
    assert attachment.storage_key.startswith(f"attachments/{thread.pk}/")
    assert storage.object_size(quarantined) is None  # the client-writable copy is gone
    assert Image.open(io.BytesIO(stored_bytes(attachment.storage_key))).size == (300, 200)
    # Idempotent, and the upload is now usable.
    assert api(bob).post(f"/api/v1/attachments/{attachment_id}/complete").json() == completed.json()
    message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="m", attachment_ids=[attachment_id])
    link = api(alice).get(f"/api/v1/attachments/{attachment_id}/download", {"format": "json"})
    assert link.status_code == 200
    assert requests.get(link.json()["url"], timeout=10).content == stored_bytes(attachment.storage_key)


def test_presigned_upload_of_other_size_is_refused_on_complete(
    s3_and_clamd: None, api: Api, bob: User, thread: Thread
) -> None:
    asked = (
        api(bob)
        .post(f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "a.txt", "size": 5}, format="json")
        .json()
    )
    ticket = asked["upload"]
    # moto does not enforce the policy's content-length-range (S3 would answer 400); the server checks again.
    requests.post(ticket["url"], data=ticket["fields"], files={"file": ("a.txt", b"1234567")}, timeout=10)
    refused = api(bob).post(f"/api/v1/attachments/{asked['attachment']['id']}/complete")
    assert refused.status_code == 400
    assert error(refused)["reason"] == "size_mismatch"
    attachment = Attachment.objects.get(pk=asked["attachment"]["id"])
    assert attachment.scan_status == ScanStatus.REJECTED
    assert storage.object_size(ticket["fields"]["key"]) is None


def test_presigned_eicar_is_infected_and_recorded(s3_and_clamd: None, api: Api, bob: User, thread: Thread) -> None:
    asked = (
        api(bob)
        .post(
            f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "notes.txt", "size": len(EICAR)}, format="json"
        )
        .json()
    )
    ticket = asked["upload"]
    requests.post(ticket["url"], data=ticket["fields"], files={"file": ("notes.txt", EICAR)}, timeout=10)
    refused = api(bob).post(f"/api/v1/attachments/{asked['attachment']['id']}/complete")
    assert refused.status_code == 400
    assert error(refused)["reason"] == "infected"
    attachment = Attachment.objects.get(pk=asked["attachment"]["id"])
    assert attachment.scan_status == ScanStatus.INFECTED
    assert "Eicar" in attachment.scan_detail
    assert AuditEntry.objects.filter(action="attachment.infected", target_id=str(attachment.pk)).exists()
    assert storage.object_size(ticket["fields"]["key"]) is None
    # Asking again repeats the verdict.
    assert error(api(bob).post(f"/api/v1/attachments/{attachment.pk}/complete"))["reason"] == "infected"


def test_presigned_request_refuses_oversize_before_any_upload(
    s3_and_clamd: None, api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    settings.ATTACHMENT_MAX_VIDEO_BYTES = 1000
    too_big = api(bob).post(
        f"/api/v1/threads/{thread.pk}/attachments/uploads",
        {"name": "clip.mp4", "size": 1001, "content_type": "video/mp4"},
        format="json",
    )
    assert too_big.status_code == 413
    assert error(too_big)["code"] == "too_large"
    assert not Attachment.objects.exists()


# --------------------------------------------------------------------------- bad files (real clamd)


@pytest.mark.parametrize(
    ("name", "data", "content_type", "status", "reason"),
    [
        ("page.html", HTML, "text/html", 400, "html"),
        ("cat.png", HTML, "image/png", 400, "html"),  # a spoofed Content-Type and name change nothing
        ("  indented.txt", b"\n\n   <html><p>hi</p></html>", "text/plain", 400, "html"),
        ("logo.svg", SCRIPTED_SVG, "image/svg+xml", 400, "scripted_svg"),
        (
            "logo.svg",
            CLEAN_SVG.replace(b"<rect", b'<a href="javascript:alert(1)"><rect'),
            "image/svg+xml",
            400,
            "scripted_svg",
        ),
        ("tool.exe", b"MZ\x90\x00\x03" + b"\x00" * 200, "application/pdf", 400, "unsupported_type"),
        ("blob.bin", bytes(range(256)) * 4, "application/octet-stream", 400, "unsupported_type"),
        ("bomb.png", pixel_bomb(), "image/png", 413, "too_many_pixels"),
        ("broken.png", png_bytes()[:60], "image/png", 400, "image_invalid"),
        ("eicar.txt", EICAR, "text/plain", 400, "infected"),
        ("eicar.png", EICAR, "image/png", 400, "infected"),
    ],
)
def test_bad_files_are_refused_and_recorded(
    s3_and_clamd: None,
    api: Api,
    bob: User,
    thread: Thread,
    name: str,
    data: bytes,
    content_type: str,
    status: int,
    reason: str,
) -> None:
    started = time.monotonic()
    response = upload(api(bob), thread, name, data, content_type)
    # Bounded (a pixel bomb is refused from its header, never decoded), with room for a loaded machine.
    assert time.monotonic() - started < 20
    assert response.status_code == status, response.json()
    assert error(response)["reason"] == reason
    attachment = Attachment.objects.get()
    assert attachment.scan_status == (ScanStatus.INFECTED if reason == "infected" else ScanStatus.REJECTED)
    assert attachment.declared_type == content_type
    assert storage.object_size(attachment.storage_key) is None  # nothing refused is ever stored
    audited = AuditEntry.objects.filter(action="attachment.infected", target_id=str(attachment.pk))
    assert audited.exists() == (reason == "infected")
    if reason == "infected":
        assert audited.get().data["signature"] == attachment.scan_detail
        assert attachment.scan_detail.startswith("Eicar-Test-Signature")  # clamd adds .UNOFFICIAL for local sigs


def test_png_carrying_html_is_stored_as_a_clean_reencoded_image(
    s3_and_clamd: None, api: Api, bob: User, thread: Thread
) -> None:
    polyglot = png_bytes((40, 30)) + b"<html><script>alert(1)</script></html>"
    response = upload(api(bob), thread, "innocent.png", polyglot, "text/html")
    assert response.status_code == 201, response.json()
    assert response.json()["content_type"] == "image/png"
    stored = stored_bytes(Attachment.objects.get().storage_key)
    assert b"<html" not in stored
    assert b"<script" not in stored
    assert stored.endswith(png_chunk(b"IEND", b""))
    assert Image.open(io.BytesIO(stored)).size == (40, 30)


# --------------------------------------------------------------------------- metadata carriers

MARKUP = "<html><body><script>alert(document.domain)</script></body></html>"


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = MARKUP  # Make
    exif[0x0131] = MARKUP  # Software
    return exif


def jpeg_with_junk_profile() -> bytes:
    """An "ICC profile" that is an HTML document: it does not parse."""
    return _encoded(Image.new("RGB", (40, 30), "teal"), "JPEG", icc_profile=MARKUP.encode() * 50)


def jpeg_with_scripted_valid_profile() -> bytes:
    """A profile that parses (Display P3) and carries the script in its description."""
    return _encoded(Image.new("RGB", (40, 30), "teal"), "JPEG", icc_profile=display_p3_profile(MARKUP))


def jpeg_with_every_segment() -> bytes:
    data = _encoded(Image.new("RGB", (40, 30), "teal"), "JPEG", exif=_exif(), xmp=MARKUP.encode(), comment=MARKUP)
    app13 = b"Photoshop 3.0\0" + MARKUP.encode()
    app15 = MARKUP.encode()
    extra = b"\xff\xed" + struct.pack(">H", len(app13) + 2) + app13 + b"\xff\xef" + struct.pack(">H", len(app15) + 2)
    return data[:2] + extra + app15 + data[2:]


def png_with_text_chunks() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKUP)
    info.add_text("Description", MARKUP, zip=True)  # zTXt
    info.add_itxt("XML:com.adobe.xmp", MARKUP, zip=True)  # iTXt
    info.add(b"htMl", MARKUP.encode())  # a private ancillary chunk
    image = Image.new("RGB", (40, 30), "teal")
    return _encoded(image, "PNG", pnginfo=info, exif=_exif(), icc_profile=display_p3_profile(MARKUP))


def gif_with_extensions() -> bytes:
    """An animation with a comment, an XMP and an ICC application extension and a plain-text
    extension before every frame."""
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    data = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0, comment=MARKUP)
    payload = MARKUP.encode()
    sub_block = bytes([len(payload)]) + payload + b"\0"
    extensions = (
        b"!\xfe" + sub_block
        + b"!\xff\x0bXMP DataXMP" + sub_block
        + b"!\xff\x0bICCRGBG1012" + sub_block
        + b"!\x01\x0c" + bytes(12) + sub_block
    )  # fmt: skip
    return data.replace(b"!\xf9", extensions + b"!\xf9")


def webp_with_chunks() -> bytes:
    image = Image.new("RGB", (40, 30), "teal")
    return _encoded(image, "WEBP", exif=_exif(), xmp=MARKUP.encode(), icc_profile=display_p3_profile(MARKUP))


def animated_webp_with_chunks() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green")]
    return _encoded(
        frames[0],
        "WEBP",
        save_all=True,
        append_images=frames[1:],
        exif=_exif(),
        xmp=MARKUP.encode(),
        icc_profile=display_p3_profile(MARKUP),
    )


_METADATA_KEYS = {"icc_profile", "exif", "xmp", "comment", "photoshop", "Comment", "Description"}


@pytest.mark.parametrize(
    "make",
    [
        jpeg_with_junk_profile,
        jpeg_with_scripted_valid_profile,
        jpeg_with_every_segment,
        png_with_text_chunks,
        gif_with_extensions,
        webp_with_chunks,
        animated_webp_with_chunks,
    ],
)
def test_stored_images_are_only_pixels(
    s3_and_clamd: None, api: Api, bob: User, thread: Thread, make: Callable[[], bytes]
) -> None:
    data = make()
    with Image.open(io.BytesIO(data)) as original:
        fmt, frames = str(original.format), getattr(original, "n_frames", 1)
    response = upload(api(bob), thread, f"image.{fmt.lower()}", data)
    assert response.status_code == 201, response.json()
    attachment = Attachment.objects.get()
    # Read back from the bucket: the file served inline and its thumbnail.
    for key in (attachment.storage_key, attachment.thumbnail_key):
        stored = stored_bytes(key)
        for marker in (b"<html", b"<script", b"alert(", MARKUP.encode("utf-16-be")[:20]):
            assert marker not in stored, (key, marker)
        with Image.open(io.BytesIO(stored)) as image:
            assert not _METADATA_KEYS & set(image.info), (key, image.info.keys())
            # A GIF's one application extension is the loop count Pillow writes.
            assert image.info.get("extension", (b"NETSCAPE2.0",))[0] == b"NETSCAPE2.0"
            assert dict(image.getexif()) == {}
            assert getattr(image, "text", {}) == {}
    with Image.open(io.BytesIO(stored_bytes(attachment.storage_key))) as image:
        assert (image.format, getattr(image, "n_frames", 1)) == (fmt, frames)


def test_a_16_mb_junk_colour_profile_is_not_stored(s3_and_clamd: None, api: Api, bob: User, thread: Thread) -> None:
    junk = (b"<script>" + os.urandom(56)) * (16_000_000 // 64)
    data = _encoded(Image.new("RGB", (40, 30), "teal"), "JPEG", icc_profile=junk)
    assert len(data) > 16_000_000
    response = upload(api(bob), thread, "junk.jpg", data, "image/jpeg")
    assert response.status_code == 201, response.json()
    attachment = Attachment.objects.get()
    stored = stored_bytes(attachment.storage_key)
    assert attachment.size == len(stored) < 20_000
    assert b"<script" not in stored
    with Image.open(io.BytesIO(stored)) as image:
        assert "icc_profile" not in image.info
        assert image.getpixel((20, 15)) == pytest.approx((0, 128, 128), abs=3)


def test_type_comes_from_the_bytes_not_the_name(s3_and_clamd: None, api: Api, bob: User, thread: Thread) -> None:
    response = upload(api(bob), thread, "report.pdf", png_bytes(), "application/pdf")
    assert response.status_code == 201
    assert (response.json()["kind"], response.json()["content_type"]) == ("IMAGE", "image/png")
    assert response.json()["name"] == "report.pdf"
    served = requests.get(api(bob).get(response.json()["url"])["Location"], timeout=10)
    assert served.headers["Content-Type"] == "image/png"
    assert served.headers["Content-Disposition"] == 'inline; filename="report.pdf.png"'
    text = upload(api(bob), thread, "photo.jpg", b"just some notes\n", "image/jpeg")
    assert (text.json()["kind"], text.json()["content_type"]) == ("DOCUMENT", "text/plain")


def test_size_caps_per_kind(s3_and_clamd: None, api: Api, bob: User, thread: Thread, settings: Any) -> None:
    settings.ATTACHMENT_MAX_IMAGE_BYTES = 1000
    image = noise_png((40, 40))
    assert len(image) > 1000
    too_big = upload(api(bob), thread, "big.png", image)
    assert too_big.status_code == 413
    assert (error(too_big)["code"], error(too_big)["limit"], error(too_big)["kind"]) == ("too_large", 1000, "IMAGE")
    assert upload(api(bob), thread, "notes.txt", b"x" * 5000).status_code == 201  # documents keep their cap
    settings.ATTACHMENT_MAX_DOCUMENT_BYTES = 1000
    settings.ATTACHMENT_MAX_VIDEO_BYTES = 1000
    # Over every cap: refused from Content-Length before the body is parsed.
    huge = upload(api(bob), thread, "huge.txt", b"y" * (200 * 1024))
    assert huge.status_code == 413
    assert Attachment.objects.filter(original_name="huge.txt").count() == 0


def test_pixel_cap_is_configurable(s3_and_clamd: None, api: Api, bob: User, thread: Thread, settings: Any) -> None:
    settings.ATTACHMENT_MAX_IMAGE_PIXELS = 100
    refused = upload(api(bob), thread, "ten.png", png_bytes((11, 10)))
    assert refused.status_code == 413
    assert error(refused)["reason"] == "too_many_pixels"
    assert upload(api(bob), thread, "ten.png", png_bytes((10, 10))).status_code == 201


def test_clean_svg_is_served_only_as_a_download(s3_and_clamd: None, api: Api, bob: User, thread: Thread) -> None:
    response = upload(api(bob), thread, "logo.svg", CLEAN_SVG, "image/svg+xml")
    assert response.status_code == 201
    assert (response.json()["kind"], response.json()["content_type"]) == ("DOCUMENT", "image/svg+xml")
    assert response.json()["has_thumbnail"] is False
    fetched = requests.get(api(bob).get(response.json()["url"])["Location"], timeout=10)
    assert fetched.content == CLEAN_SVG
    assert fetched.headers["Content-Disposition"].startswith("attachment")


# --------------------------------------------------------------------------- permissions and URLs


def test_non_members_cannot_upload_mint_or_see(
    s3_and_clamd: None, api: Api, alice: User, bob: User, carol: User, thread: Thread
) -> None:
    assert upload(api(carol), thread, "a.png", png_bytes()).status_code == 404
    assert (
        api(carol)
        .post(f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "a", "size": 3}, format="json")
        .status_code
        == 404
    )
    attachment_id = upload(api(bob), thread, "a.png", png_bytes()).json()["id"]
    # Before it is sent, an upload is its uploader's alone, even within the thread.
    for path in ("", "/download", "/thumbnail", "/complete"):
        method = "post" if path == "/complete" else "get"
        assert getattr(api(alice), method)(f"/api/v1/attachments/{attachment_id}{path}").status_code == 404
    message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="m1", attachment_ids=[attachment_id])
    assert api(alice).get(f"/api/v1/attachments/{attachment_id}/download").status_code == 302
    for path in ("", "/download", "/thumbnail"):
        denied = api(carol).get(f"/api/v1/attachments/{attachment_id}{path}")
        assert denied.status_code == 404
        assert error(denied)["code"] == "not_found"
    assert api(None).get(f"/api/v1/attachments/{attachment_id}/download").status_code == 401
    # Someone else's upload cannot ride on my message.
    other = upload(api(alice), thread, "b.png", png_bytes()).json()["id"]
    with pytest.raises(InvalidInput):
        message_send(sender=bob, thread_id=thread.pk, body="x", client_msg_id="m2", attachment_ids=[other])
    assert not Message.objects.filter(client_msg_id="m2").exists()


def test_signed_url_lifetime_follows_the_setting(
    s3_and_clamd: None, api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    attachment_id = upload(api(bob), thread, "a.png", png_bytes()).json()["id"]
    for seconds in (123, 45):
        settings.AWS_QUERYSTRING_EXPIRE = seconds
        link = api(bob).get(f"/api/v1/attachments/{attachment_id}/download", {"format": "json"}).json()
        query = parse_qs(urlparse(link["url"]).query)
        assert query["X-Amz-Expires"] == [str(seconds)]  # moto serves expired URLs, so read the signed lifetime
        assert link["expires_in"] == seconds
        expires_at = datetime.fromisoformat(link["expires_at"])
        assert abs((expires_at - datetime.now(UTC)).total_seconds() - seconds) < 5
        redirect = parse_qs(urlparse(api(bob).get(f"/api/v1/attachments/{attachment_id}/download")["Location"]).query)
        assert redirect["X-Amz-Expires"] == [str(seconds)]


def test_cloudfront_signed_urls_when_configured(
    s3_and_clamd: None, api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    settings.CLOUDFRONT_DOMAIN = "files.example.test"
    settings.CLOUDFRONT_KEY_ID = "K2JCJMDEHXQW5F"
    settings.CLOUDFRONT_PRIVATE_KEY = pem.decode()
    settings.AWS_QUERYSTRING_EXPIRE = 90
    attachment = Attachment.objects.get(pk=upload(api(bob), thread, "a.png", png_bytes()).json()["id"])
    url = api(bob).get(f"/api/v1/attachments/{attachment.pk}/download")["Location"]
    parsed = urlparse(url)
    assert (parsed.scheme, parsed.netloc, parsed.path) == ("https", "files.example.test", f"/{attachment.storage_key}")
    query = parse_qs(parsed.query)
    assert query["Key-Pair-Id"] == ["K2JCJMDEHXQW5F"]
    assert abs(int(query["Expires"][0]) - time.time() - 90) < 5
    # The canned policy CloudFront will check, signed with our key.
    resource = url.split("?", 1)[0]
    policy = json.dumps(
        {
            "Statement": [
                {"Resource": resource, "Condition": {"DateLessThan": {"AWS:EpochTime": int(query["Expires"][0])}}}
            ]
        },
        separators=(",", ":"),
    ).encode()
    signature = base64.b64decode(query["Signature"][0].replace("-", "+").replace("_", "=").replace("~", "/"))
    sha1 = hashes.SHA1()  # noqa: S303 - CloudFront's signature format
    key.public_key().verify(signature, policy, padding.PKCS1v15(), sha1)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, policy + b" ", padding.PKCS1v15(), sha1)


def test_deleting_the_message_revokes_its_files(
    s3_and_clamd: None,
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    attachment = Attachment.objects.get(pk=upload(api(bob), thread, "a.jpg", jpeg_with_exif()).json()["id"])
    message, _ = message_send(
        sender=bob, thread_id=thread.pk, body="", client_msg_id="m", attachment_ids=[attachment.pk]
    )
    old_link = api(alice).get(f"/api/v1/attachments/{attachment.pk}/download")["Location"]
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        message_delete(actor=bob, message_id=message.pk)
    (event,) = capture.receive_all()
    assert event["type"] == "message.deleted"
    assert event["data"]["message"]["attachments"] == []
    attachment.refresh_from_db()
    assert attachment.deleted_at is not None
    for path in ("", "/download", "/thumbnail"):
        assert api(alice).get(f"/api/v1/attachments/{attachment.pk}{path}").status_code == 404
    assert storage.object_size(attachment.storage_key) is None
    assert storage.object_size(attachment.thumbnail_key) is None
    # The object itself is gone (S3 answers 403 rather than 404 to a signed GET of a missing key).
    assert requests.get(old_link, timeout=10).status_code in (403, 404)


@pytest.mark.smoke
def test_schema_documents_the_attachment_endpoints(db: None) -> None:
    from django.urls import include, path
    from drf_spectacular.generators import SchemaGenerator

    import chatapp.api_urls  # noqa: F401 - registers the <id:...> converter

    spec = SchemaGenerator(patterns=[path("api/v1/", include("attachments.urls"))]).get_schema(
        request=None, public=True
    )
    paths = spec["paths"]
    upload_op = paths["/api/v1/threads/{thread_id}/attachments"]["post"]
    assert "multipart/form-data" in upload_op["requestBody"]["content"]
    assert {"201", "400", "404", "413", "503"} <= set(upload_op["responses"])
    assert {"200", "302", "404"} <= set(paths["/api/v1/attachments/{attachment_id}/download"]["get"]["responses"])
    for documented in (
        "/api/v1/threads/{thread_id}/attachments/uploads",
        "/api/v1/attachments/{attachment_id}",
        "/api/v1/attachments/{attachment_id}/upload",
        "/api/v1/attachments/{attachment_id}/complete",
        "/api/v1/attachments/{attachment_id}/thumbnail",
        "/api/v1/attachments/{attachment_id}/file",
    ):
        assert documented in paths


def test_attachment_kinds_in_events_cover_documents(s3_and_clamd: None, api: Api, bob: User, thread: Thread) -> None:
    pdf = b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n"
    body = upload(api(bob), thread, "spec.pdf", pdf, "application/pdf").json()
    assert (body["kind"], body["content_type"], body["has_thumbnail"], body["width"]) == (
        AttachmentKind.DOCUMENT,
        "application/pdf",
        False,
        None,
    )
