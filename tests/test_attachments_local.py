"""Attachments on the embedded default (files on disk, served by an authorised Django view), the
sniffing rules, the scanner, and the cleanup command; most also run in the smoke suite."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from django.core.management import call_command
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from accounts.models import User
from attachments import storage
from attachments.imaging import ImageRefused, gif_geometry
from attachments.models import Attachment, ScanStatus
from attachments.scanning import ClamdScanner, ScannerUnavailable
from attachments.services import attachments_attach, attachments_cleanup
from attachments.validation import ALLOWED, Refused, download_name, image_process, image_slot, sniff
from chatapp.errors import InvalidInput, TooLarge
from messaging.models import Message
from messaging.services import message_send
from tests.conftest import needs
from tests.test_attachments import (
    CLEAN_SVG,
    EICAR,
    HTML,
    display_p3_profile,
    error,
    grey_profile,
    p3_to_srgb,
    png_bytes,
    stored_bytes,
    upload,
)
from threads.models import Thread
from threads.services import thread_leave

pytestmark = pytest.mark.django_db

Api = Callable[[User | None], APIClient]


@pytest.fixture
def local_storage(settings: Any, tmp_path: Path) -> Path:
    """Files on the local file system whatever the environment configures."""
    root = tmp_path / "media"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(root)}},
    }
    assert not storage.is_s3()
    return root


def fetch(link: str) -> Any:
    """Follow a download link as a browser's <img> would: no API credentials."""
    parsed = urlparse(link)
    return APIClient().get(parsed.path, parse_qs(parsed.query))


def content(response: Any) -> bytes:
    return b"".join(response.streaming_content)


@pytest.mark.smoke
def test_local_storage_round_trip_with_safe_headers(
    local_storage: Path, api: Api, alice: User, bob: User, thread: Thread
) -> None:
    created = upload(api(bob), thread, "chart.png", png_bytes((500, 100)), "image/png")
    assert created.status_code == 201, created.json()
    attachment = Attachment.objects.get(pk=created.json()["id"])
    assert (local_storage / attachment.storage_key).is_file()
    sent = api(bob).post(
        f"/api/v1/threads/{thread.pk}/messages",
        {"body": "", "client_msg_id": "m", "attachment_ids": [attachment.pk]},
        format="json",
    )
    assert sent.status_code == 201, sent.json()
    (carried,) = sent.json()["attachments"]
    assert carried["id"] == attachment.pk
    assert carried["thumbnail_url"] == created.json()["thumbnail_url"]

    redirect = api(alice).get(created.json()["url"])
    assert redirect.status_code == 302
    assert redirect["Location"].startswith(f"http://testserver/api/v1/attachments/{attachment.pk}/file?")
    served = fetch(redirect["Location"])
    assert served.status_code == 200
    assert content(served) == (local_storage / attachment.storage_key).read_bytes()
    assert served["Content-Type"] == "image/png"
    assert served["Content-Disposition"] == 'inline; filename="chart.png"'
    assert served["X-Content-Type-Options"] == "nosniff"
    assert served["Content-Security-Policy"] == "sandbox; default-src 'none'"

    thumb = fetch(api(alice).get(created.json()["thumbnail_url"])["Location"])
    assert thumb.status_code == 200
    assert thumb["Content-Type"] == "image/webp"
    assert Image.open(io.BytesIO(content(thumb))).size == (320, 64)

    as_json = api(alice).get(created.json()["url"], {"format": "json"})
    assert as_json.status_code == 200
    assert as_json.json()["url"].startswith("http://testserver/api/v1/attachments/")


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("name", "data", "content_type", "saved"),
    [
        ("notes.txt", b"plain <b>text</b> notes\n", "text/plain; charset=utf-8", "notes.txt"),
        ("logo.svg", CLEAN_SVG, "image/svg+xml", "logo.svg"),
        # Not HTML to a browser (it does not start like HTML), but never saved under an HTML name.
        ("evil.html", b"notes <script>alert(1)</script>", "text/plain; charset=utf-8", "evil.html.txt"),
    ],
)
def test_local_downloads_of_non_inline_types_are_attachments(
    local_storage: Path, api: Api, bob: User, thread: Thread, name: str, data: bytes, content_type: str, saved: str
) -> None:
    created = upload(api(bob), thread, name, data, "text/html").json()
    assert created["name"] == name
    served = fetch(api(bob).get(created["url"])["Location"])
    assert served.status_code == 200
    assert content(served) == data
    assert served["Content-Type"] == content_type
    assert served["Content-Disposition"] == f'attachment; filename="{saved}"'
    assert served["X-Content-Type-Options"] == "nosniff"
    assert served["Content-Security-Policy"] == "sandbox; default-src 'none'"


@pytest.mark.smoke
def test_local_file_links_are_bound_and_rechecked(
    local_storage: Path, api: Api, alice: User, bob: User, carol: User, thread: Thread
) -> None:
    attachment_id = upload(api(bob), thread, "a.png", png_bytes()).json()["id"]
    message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="m", attachment_ids=[attachment_id])
    link = urlparse(api(bob).get(f"/api/v1/attachments/{attachment_id}/download")["Location"])
    query = parse_qs(link.query)
    path = link.path
    assert fetch(f"{path}?variant=file&token={query['token'][0]}").status_code == 200
    for forged in (
        {"variant": "thumbnail", "token": query["token"][0]},  # a file link is not a thumbnail link
        {"variant": "file", "token": query["token"][0][:-2] + "xx"},
        {"variant": "file"},
        {
            "variant": "file",
            "token": storage.local_token(attachment_id=attachment_id + 1, variant="file", user_id=bob.pk),
        },
        {
            "variant": "file",
            "token": storage.local_token(attachment_id=attachment_id, variant="file", user_id=carol.pk),
        },
    ):
        refused = APIClient().get(path, forged)
        assert refused.status_code == 404, forged
        assert error(refused)["code"] == "not_found"
    assert (
        APIClient()
        .get(f"/api/v1/attachments/{attachment_id + 1}/file", {"variant": "file", "token": query["token"][0]})
        .status_code
        == 404
    )
    # The link's user must still be allowed when it is used.
    thread_leave(user=bob, thread_id=thread.pk)
    assert fetch(f"{path}?variant=file&token={query['token'][0]}").status_code == 404
    assert api(carol).get(f"/api/v1/attachments/{attachment_id}/download").status_code == 404


@pytest.mark.smoke
def test_local_presigned_flow_through_the_upload_view(
    local_storage: Path, api: Api, alice: User, bob: User, thread: Thread
) -> None:
    data = png_bytes((30, 20))
    asked = api(bob).post(
        f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "x.png", "size": len(data)}, format="json"
    )
    assert asked.status_code == 201, asked.json()
    ticket, attachment_id = asked.json()["upload"], asked.json()["attachment"]["id"]
    assert ticket["url"] == f"http://testserver/api/v1/attachments/{attachment_id}/upload"
    assert (ticket["method"], ticket["fields"], ticket["max_size"]) == ("POST", {}, len(data))
    target = urlparse(ticket["url"]).path

    def send(client: APIClient, payload: bytes) -> Any:
        return client.post(target, {**ticket["fields"], "file": io.BytesIO(payload)}, format="multipart")

    assert send(api(alice), data).status_code == 404  # only the uploader
    assert send(api(None), data).status_code == 401
    wrong = send(api(bob), data + b"!")
    assert wrong.status_code == 400
    assert error(wrong)["reason"] == "size_mismatch"
    assert send(api(bob), data).status_code == 204
    assert send(api(bob), data).status_code == 204  # a retry overwrites the quarantined copy
    completed = api(bob).post(f"/api/v1/attachments/{attachment_id}/complete")
    assert completed.status_code == 200, completed.json()
    assert completed.json()["status"] == "CLEAN"
    assert not (local_storage / "quarantine").exists() or not any((local_storage / "quarantine").iterdir())
    assert send(api(bob), data).status_code == 409  # nothing more can be written for it


@pytest.mark.smoke
def test_local_upload_window_closes(local_storage: Path, api: Api, bob: User, thread: Thread, settings: Any) -> None:
    asked = (
        api(bob)
        .post(f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "x.txt", "size": 3}, format="json")
        .json()
    )
    Attachment.objects.filter(pk=asked["attachment"]["id"]).update(
        created_at=timezone.now() - timedelta(seconds=settings.ATTACHMENT_UPLOAD_EXPIRE + 1)
    )
    late = api(bob).post(urlparse(asked["upload"]["url"]).path, {"file": io.BytesIO(b"abc")}, format="multipart")
    assert late.status_code == 409
    assert error(late)["reason"] == "upload_expired"


@pytest.mark.smoke
def test_scanner_outage_accepts_nothing_and_complete_can_be_retried(
    local_storage: Path, api: Api, bob: User, thread: Thread, settings: Any, tmp_path: Path
) -> None:
    scanning = (settings.CLAMAV_ENABLED, settings.CLAMD_SOCKET)
    settings.CLAMAV_ENABLED, settings.CLAMD_SOCKET = True, str(tmp_path / "no-clamd.sock")
    refused = upload(api(bob), thread, "a.txt", b"hello\n")
    assert refused.status_code == 503
    assert error(refused)["code"] == "scanner_unavailable"
    assert not Attachment.objects.exists()

    asked = (
        api(bob)
        .post(f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "b.txt", "size": 6}, format="json")
        .json()
    )
    attachment_id = asked["attachment"]["id"]
    api(bob).post(urlparse(asked["upload"]["url"]).path, {"file": io.BytesIO(b"hello\n")}, format="multipart")
    assert api(bob).post(f"/api/v1/attachments/{attachment_id}/complete").status_code == 503
    assert Attachment.objects.get(pk=attachment_id).scan_status == ScanStatus.PENDING
    with pytest.raises(InvalidInput):
        message_send(sender=bob, thread_id=thread.pk, body="x", client_msg_id="q", attachment_ids=[attachment_id])
    settings.CLAMAV_ENABLED, settings.CLAMD_SOCKET = scanning
    assert api(bob).post(f"/api/v1/attachments/{attachment_id}/complete").json()["status"] == "CLEAN"


def test_clamd_scanner_speaks_instream() -> None:
    needs("clamd")
    import os

    scanner = ClamdScanner(os.environ["CHATAPP_CLAMD_SOCKET"], timeout=10)
    with_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"scan-{os.getpid()}"
    try:
        with_tmp.write_bytes(EICAR)
        infected = scanner.scan(with_tmp)
        assert infected.infected
        assert infected.detail.startswith("Eicar-Test-Signature")
        with_tmp.write_bytes(b"a" * (200 * 1024))  # several chunks
        assert scanner.scan(with_tmp).infected is False
    finally:
        with_tmp.unlink(missing_ok=True)
    with pytest.raises(ScannerUnavailable):
        ClamdScanner("/nonexistent/clamd.sock", timeout=1).scan(Path(__file__))


# --------------------------------------------------------------------------- sniffing


def _zip(*names: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in names:
            archive.writestr(name, "x")
    return out.getvalue()


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png_bytes(), "image/png"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64, "video/mp4"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
        (
            _zip("[Content_Types].xml", "word/document.xml"),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (_zip("readme.txt"), "application/zip"),
        ("Grüße, notes\n".encode(), "text/plain"),
        (b"a,b,c\n1,2,3\n", "text/plain"),
        (b'<?xml version="1.0"?><feed><title>t</title></feed>', "application/xml"),
        (b"\xef\xbb\xbf<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        (
            b"<svg><style>rect{fill:red}</style><a href='https://example.test/?a=1&amp;b=2'><rect/></a></svg>",
            "image/svg+xml",
        ),
    ],
)
def test_sniff_accepts_by_content(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "upload"
    path.write_bytes(data)
    assert sniff(path).mime == expected


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (HTML, "html"),
        (b"<!-- a comment --><p>hi", "html"),
        (b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body/></html>', "html"),
        (b'<?xml version="1.0"?><doc><x:p xmlns:x="http://www.w3.org/1999/xhtml">hi</x:p></doc>', "html"),
        (b"<svg><foreignObject><div>hi</div></foreignObject></svg>", "scripted_svg"),
        (b"<svg><script>alert(1)</script></svg>", "scripted_svg"),
        (b"<SVG ONLOAD='alert(1)'/>", "scripted_svg"),
        (b"<svg><a href='&#106;avascript:alert(1)'><rect/></a></svg>", "scripted_svg"),
        (b'<!DOCTYPE svg [<!ENTITY x "y">]><svg>&x;</svg>', "scripted_svg"),
        (b"<svg>" + b" " * 70000 + b"<script>late()</script></svg>", "scripted_svg"),
        (b"\x7fELF\x02\x01\x01" + b"\x00" * 64, "unsupported_type"),
        (b"", "empty"),
        ("notes".encode("utf-16"), "unsupported_type"),
    ],
)
def test_sniff_refuses(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "upload"
    path.write_bytes(data)
    with pytest.raises(Refused) as refused:
        sniff(path)
    assert refused.value.reason == reason


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("name", "mime", "served"),
    [
        ("photo.JPEG", "image/jpeg", "photo.JPEG"),
        ("report.pdf", "image/png", "report.pdf.png"),
        ("clip", "video/mp4", "clip.mp4"),
        ("page.HTM", "text/plain", "page.HTM.txt"),
        ("data.csv", "text/plain", "data.csv"),
        ("Makefile", "text/plain", "Makefile"),
        ("drawing.xml", "image/svg+xml", "drawing.xml.svg"),
    ],
)
def test_download_name_matches_the_sniffed_type(name: str, mime: str, served: str) -> None:
    assert download_name(name, mime) == served


P3_COLOUR = (180, 90, 60)


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("fmt", "mode", "tolerance"), [("JPEG", "RGB", 3), ("PNG", "RGB", 1), ("PNG", "P", 1), ("WEBP", "RGB", 3)]
)
@pytest.mark.parametrize("profile", ["display-p3", "srgb"])
def test_images_lose_their_metadata_and_their_colours_are_converted_to_srgb(
    local_storage: Path, api: Api, bob: User, thread: Thread, fmt: str, mode: str, tolerance: int, profile: str
) -> None:
    """Colours are converted through the profile and the profile is dropped: the stored file has
    nothing left to carry but its pixels, and looks as the original did in a colour-managed viewer."""
    from PIL import ImageCms

    if profile == "srgb":
        icc, expected = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), P3_COLOUR
    else:
        icc, expected = display_p3_profile(), p3_to_srgb(P3_COLOUR)
    exif = Image.Exif()
    exif[0x010F] = "SECRETCAMERA"
    exif[0x0131] = "SECRETSOFTWARE"
    image = Image.new("RGB", (20, 10), P3_COLOUR)
    if mode == "P":
        image = image.quantize(colors=2)
    out = io.BytesIO()
    image.save(out, fmt, exif=exif, icc_profile=icc, **({"quality": 95} if fmt != "PNG" else {}))
    assert b"SECRETCAMERA" in out.getvalue()
    created = upload(api(bob), thread, f"photo.{fmt.lower()}", out.getvalue())
    assert created.status_code == 201, created.json()
    attachment = Attachment.objects.get()
    stored = stored_bytes(attachment.storage_key)
    assert b"SECRETCAMERA" not in stored
    assert b"SECRETSOFTWARE" not in stored
    with Image.open(io.BytesIO(stored)) as image:
        assert (image.format, image.mode) == (fmt, mode)
        assert "icc_profile" not in image.info
        assert dict(image.getexif()) == {}
        assert image.convert("RGB").getpixel((10, 5)) == pytest.approx(expected, abs=tolerance)
    with Image.open(io.BytesIO(stored_bytes(attachment.thumbnail_key))) as thumbnail:
        assert thumbnail.convert("RGB").getpixel((10, 5)) == pytest.approx(expected, abs=4)


@pytest.mark.smoke
@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "L"), ("PNG", "LA"), ("JPEG", "L")])
def test_greyscale_images_are_converted_through_their_grey_profile(
    local_storage: Path, api: Api, bob: User, thread: Thread, fmt: str, mode: str
) -> None:
    image = Image.new(mode, (20, 10), 128 if mode == "L" else (128, 77))
    out = io.BytesIO()
    image.save(out, fmt, icc_profile=grey_profile(1.8))
    created = upload(api(bob), thread, f"scan.{fmt.lower()}", out.getvalue())
    assert created.status_code == 201, created.json()
    linear = (128 / 255) ** 1.8
    expected = round(255 * (1.055 * linear ** (1 / 2.4) - 0.055))  # 1.8 gamma's 128 is sRGB's 147
    with Image.open(io.BytesIO(stored_bytes(Attachment.objects.get().storage_key))) as stored:
        assert (stored.mode, "icc_profile" in stored.info) == (mode, False)
        pixel = stored.getpixel((10, 5))
        assert pixel == (pytest.approx(expected, abs=1) if mode == "L" else (pytest.approx(expected, abs=1), 77))


@pytest.mark.smoke
def test_a_jpeg_with_further_pictures_keeps_only_its_primary_picture(
    local_storage: Path, api: Api, bob: User, thread: Thread
) -> None:
    """Multi-picture JPEGs (MPF: Android's Ultra HDR photos carry their gain map so) are photos."""
    primary = Image.new("RGB", (40, 30), (0, 128, 128))
    secondary = Image.new("RGB", (20, 15), "white")
    out = io.BytesIO()
    primary.save(out, "MPO", save_all=True, append_images=[secondary])
    created = upload(api(bob), thread, "ultra-hdr.jpg", out.getvalue())
    assert created.status_code == 201, created.json()
    assert (created.json()["content_type"], created.json()["width"], created.json()["height"]) == ("image/jpeg", 40, 30)
    with Image.open(io.BytesIO(stored_bytes(Attachment.objects.get().storage_key))) as stored:
        assert (stored.format, getattr(stored, "n_frames", 1), "mp" in stored.info) == ("JPEG", 1, False)
        assert stored.getpixel((20, 15)) == pytest.approx((0, 128, 128), abs=3)


@pytest.mark.smoke
def test_animated_gif_keeps_its_frames_but_not_its_comment(
    local_storage: Path, api: Api, bob: User, thread: Thread
) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0, comment=b"SECRETGIF")
    created = upload(api(bob), thread, "wave.gif", out.getvalue())
    assert created.status_code == 201, created.json()
    stored = stored_bytes(Attachment.objects.get().storage_key)
    assert b"SECRETGIF" not in stored
    with Image.open(io.BytesIO(stored)) as gif:
        assert (gif.format, getattr(gif, "n_frames", 1), gif.info["duration"]) == ("GIF", 3, 80)


def frame_bomb_gif(width: int, height: int, frames: int = 1) -> bytes:
    """A GIF whose header declares a 1x1 canvas, followed by ``frames`` frames of width x height:
    the header alone understates what decoding it takes."""
    import struct

    def frame(w: int, h: int) -> bytes:
        out = io.BytesIO()
        Image.new("P", (w, h), 0).save(out, "GIF", palette=b"\0\0\0\xff\xff\xff")
        data = out.getvalue()
        start = data.index(b",\x00\x00\x00\x00")  # its image descriptor, then the pixels
        return b"!\xf9\x04\x00\x00\x00\x00\x00" + data[start:-1]

    head = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    head += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    return head + frame(1, 1) + frame(width, height) * frames + b";"


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("width", "height", "frames"),
    [
        (400, 300, 1),  # one frame past the cap, behind a 1x1 header
        (200, 200, 12),  # every frame under the cap, too many of them together (13 x 40,000 pixels)
    ],
)
def test_animation_frames_larger_than_their_header_are_refused(
    local_storage: Path, api: Api, bob: User, thread: Thread, settings: Any, width: int, height: int, frames: int
) -> None:
    settings.ATTACHMENT_MAX_IMAGE_PIXELS = 100_000
    settings.ATTACHMENT_MAX_ANIMATION_PIXELS = 400_000
    bomb = frame_bomb_gif(width, height, frames)
    with Image.open(io.BytesIO(bomb)) as header:
        assert header.size == (1, 1)  # what the header says
    refused = upload(api(bob), thread, "wave.gif", bomb)
    assert refused.status_code == 413, refused.json()
    assert error(refused)["reason"] == "too_many_pixels"
    recorded = Attachment.objects.get()  # recorded as refused, nothing stored
    assert recorded.scan_status == ScanStatus.REJECTED
    assert storage.object_size(recorded.storage_key) is None
    # Under the caps, the same shape of file is fine.
    assert upload(api(bob), thread, "ok.gif", frame_bomb_gif(200, 200, 2)).status_code == 201


def _with_junk_between_frames(gif: bytes) -> bytes:
    """Bytes that are no block between two frames: Pillow skips them and reads on."""
    second = gif.index(b"!\xf9", gif.index(b"!\xf9") + 1)
    return gif[:second] + b"\x99\x42\x00" + gif[second:]


def _gif_with_offsets() -> bytes:
    """Frames with local colour tables, placed past the canvas's edge by their offsets."""
    frames = [Image.new("RGB", (20, 10), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], comment=b"x" * 600)
    data = bytearray(out.getvalue())
    last = data.rindex(b",")  # the last frame's descriptor: move it to (30, 25)
    data[last + 1 : last + 5] = b"\x1e\x00\x19\x00"
    return bytes(data)


@pytest.mark.smoke
@pytest.mark.parametrize(
    "gif",
    [
        frame_bomb_gif(40, 30, 3),
        _with_junk_between_frames(frame_bomb_gif(40, 30, 3)),
        _gif_with_offsets(),
        png_bytes(),  # not a GIF at all
    ],
    ids=["larger-than-header", "junk-between-frames", "offsets-and-local-palettes", "not-a-gif"],
)
def test_gif_frames_are_sized_from_their_headers_as_pillow_decodes_them(tmp_path: Path, gif: bytes) -> None:
    path = tmp_path / "a.gif"
    path.write_bytes(gif)
    if not gif.startswith(b"GIF"):
        with open(path, "rb") as f, pytest.raises(ImageRefused):
            gif_geometry(f)
        return
    sizes = []
    with Image.open(path) as im:
        for index in range(getattr(im, "n_frames", 1)):  # decoding every frame: what the geometry must predict
            im.seek(index)
            im.load()
            sizes.append(im.size)
    with open(path, "rb") as f:
        assert gif_geometry(f) == (max(w for w, _ in sizes), max(h for _, h in sizes), len(sizes))


_VALIDATE = """
import json, resource, sys, tempfile, threading
from pathlib import Path

import django

django.setup()
from attachments.validation import image_process, sniff
from chatapp.errors import ServiceError

outcomes = []


def validate(path):
    with tempfile.TemporaryDirectory() as workdir:
        try:
            image_process(path, sniff(path), workdir=Path(workdir))
            outcomes.append("accepted")
        except ServiceError as exc:
            outcomes.append(exc.as_dict().get("reason", exc.code))


threads = [threading.Thread(target=validate, args=(Path(p),)) for p in sys.argv[1:]]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"outcomes": outcomes, "peak_mb": peak // 1024, "workers_peak_mb": children // 1024}))
"""


def validate_in_subprocess(paths: list[Path]) -> dict[str, Any]:
    """Validate ``paths`` at once, as concurrent uploads would, in a fresh server-like process with
    the default settings; with its peak memory and that of any worker it started.

    The process's own peak is its ``VmHWM``: ``ru_maxrss`` would include this test process's
    memory, which Linux carries over ``exec``. The workers' peak (``RUSAGE_CHILDREN``) includes
    what the validating process held when it started them, so it bounds them from above.
    """
    from django.conf import settings

    done = subprocess.run(
        [sys.executable, "-c", _VALIDATE, *map(str, paths)],
        capture_output=True,
        cwd=settings.BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "chatapp.settings"},
        timeout=600,
        check=True,
    )
    measured: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return measured


@pytest.mark.smoke
def test_an_animation_bomb_is_refused_from_its_headers_in_bounded_memory(tmp_path: Path) -> None:
    """121 KB declaring 4 frames of 6300x6300 behind a 1x1 header: every frame under the
    per-frame cap. Composited, that is 5 x 39.7 megapixels (~1 GB of memory each, before);
    three arrive at once."""
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(frame_bomb_gif(6300, 6300, 4))
    assert bomb.stat().st_size < 150_000
    measured = validate_in_subprocess([bomb, bomb, bomb])
    assert measured["outcomes"] == ["too_many_pixels"] * 3, measured
    assert measured["peak_mb"] < 300, measured
    assert measured["workers_peak_mb"] < 300, measured


def many_frames_gif(count: int) -> bytes:
    """``count`` frames of one pixel each, ~23 bytes a frame."""
    import struct

    head = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    head += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frames = [
        b"!\xf9\x04\x04\x02\x00\x00\x00,"
        + struct.pack("<HHHH", 0, 0, 1, 1)
        + b"\x00\x02\x02"
        + bytes([0x44 | (index & 1) << 3, 0x01])  # clear, pixel (black or white), end
        + b"\x00"
        for index in range(count)
    ]
    return head + b"".join(frames) + b";"


@pytest.mark.smoke
def test_an_animation_of_too_many_frames_is_refused_however_small(
    local_storage: Path, api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    """Every frame costs a pass through decoder and encoder: 20 MB of 1x1 frames is ~900,000 of them."""
    assert settings.ATTACHMENT_MAX_ANIMATION_FRAMES == 1000
    refused = upload(api(bob), thread, "flicker.gif", many_frames_gif(1001))
    assert refused.status_code == 413, refused.json()
    assert error(refused)["reason"] == "too_many_frames"
    created = upload(api(bob), thread, "flicker.gif", many_frames_gif(1000))
    assert created.status_code == 201, created.json()
    with Image.open(io.BytesIO(stored_bytes(Attachment.objects.get(pk=created.json()["id"]).storage_key))) as stored:
        assert getattr(stored, "n_frames", 1) == 1000


@pytest.mark.smoke
def test_images_are_processed_a_bounded_number_at_once(
    local_storage: Path, api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    settings.ATTACHMENT_IMAGE_WORKERS = 1
    settings.ATTACHMENT_IMAGE_TIMEOUT = 1
    with image_slot():  # this process's only image slot is taken
        busy = upload(api(bob), thread, "a.png", png_bytes())
        assert busy.status_code == 503
        assert error(busy)["code"] == "images_busy"
        assert not Attachment.objects.exists()  # nothing kept, nothing recorded as refused

        data = png_bytes((30, 20))
        asked = api(bob).post(
            f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "b.png", "size": len(data)}, format="json"
        )
        attachment_id = asked.json()["attachment"]["id"]
        api(bob).post(urlparse(asked.json()["upload"]["url"]).path, {"file": io.BytesIO(data)}, format="multipart")
        assert api(bob).post(f"/api/v1/attachments/{attachment_id}/complete").status_code == 503
        assert Attachment.objects.get(pk=attachment_id).scan_status == ScanStatus.PENDING
    # The slot is free again: the same upload completes.
    assert api(bob).post(f"/api/v1/attachments/{attachment_id}/complete").json()["status"] == "CLEAN"
    settings.ATTACHMENT_IMAGE_WORKERS = 2
    with image_slot():  # one of two taken: an upload takes the other
        assert upload(api(bob), thread, "c.png", png_bytes()).status_code == 201


@pytest.mark.smoke
def test_an_image_needing_more_memory_than_a_worker_may_use_is_refused(
    local_storage: Path, api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    image = png_bytes((4000, 4000))  # 64 MB decoded (Pillow keeps RGB in 4 bytes a pixel)
    settings.ATTACHMENT_IMAGE_MEMORY_MB = 80
    refused = upload(api(bob), thread, "big.png", image)
    assert refused.status_code == 413, refused.json()
    assert error(refused)["reason"] == "too_complex"
    assert Attachment.objects.get().scan_status == ScanStatus.REJECTED
    settings.ATTACHMENT_IMAGE_MEMORY_MB = 1536
    assert upload(api(bob), thread, "big.png", image).status_code == 201


@pytest.mark.smoke
def test_an_image_worker_that_does_not_finish_is_stopped_and_its_slot_freed(tmp_path: Path, settings: Any) -> None:
    """A worker reading a pipe nobody writes never finishes, whatever the machine's speed."""
    settings.ATTACHMENT_IMAGE_WORKERS = 1
    settings.ATTACHMENT_IMAGE_TIMEOUT = 1
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)
    with pytest.raises(TooLarge) as refused:
        image_process(stuck, ALLOWED["image/png"], workdir=tmp_path)
    assert refused.value.as_dict()["reason"] == "too_complex"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stuck.png"]  # no output left behind
    source = tmp_path / "fine.png"
    source.write_bytes(png_bytes((30, 20)))
    processed = image_process(source, ALLOWED["image/png"], workdir=tmp_path)
    assert (processed.width, processed.height) == (30, 20)


@pytest.mark.smoke
def test_image_processing_leaves_no_file_open(tmp_path: Path) -> None:
    """A long-running server must not lose a file descriptor per image (it would run out)."""
    source = tmp_path / "a.png"
    source.write_bytes(png_bytes((30, 20)))
    image_process(source, ALLOWED["image/png"], workdir=tmp_path)  # anything opened once, for good
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        image_process(source, ALLOWED["image/png"], workdir=tmp_path).path.unlink()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.smoke
def test_attach_accepts_only_my_clean_unused_uploads(
    local_storage: Path, api: Api, alice: User, bob: User, thread: Thread
) -> None:
    from threads.services import thread_create

    clean = upload(api(bob), thread, "a.txt", b"a\n").json()["id"]
    pending = Attachment.objects.create(
        uploader=bob,
        thread=thread,
        storage_key="quarantine/pending-test",
        original_name="p",
        scan_status=ScanStatus.PENDING,
    )
    infected = Attachment.objects.create(
        uploader=bob,
        thread=thread,
        storage_key="quarantine/infected-test",
        original_name="i",
        scan_status=ScanStatus.INFECTED,
    )
    other_thread, _ = thread_create(creator=bob, title="Other", participant_ids=[alice.pk])
    for ids in ([pending.pk], [infected.pk], [clean, 10**9]):
        with pytest.raises(InvalidInput) as refused:
            message_send(sender=bob, thread_id=thread.pk, body="x", client_msg_id=f"c{ids[0]}", attachment_ids=ids)
        assert "attachment_ids" in refused.value.fields  # type: ignore[operator]
    with pytest.raises(InvalidInput):
        message_send(sender=bob, thread_id=other_thread.pk, body="x", client_msg_id="elsewhere", attachment_ids=[clean])
    assert not Message.objects.filter(body="x").exists()
    message, _ = message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="ok", attachment_ids=[clean])
    with pytest.raises(InvalidInput):  # used once only
        attachments_attach(uploader=bob, message=message, attachment_ids=[clean])
    over = api(bob).post(
        f"/api/v1/threads/{thread.pk}/messages",
        {"body": "", "client_msg_id": "many", "attachment_ids": list(range(1, 12))},
        format="json",
    )
    assert over.status_code == 400


# --------------------------------------------------------------------------- cleanup


@pytest.mark.smoke
def test_cleanup_removes_exactly_the_orphans(api: Api, alice: User, bob: User, thread: Thread, settings: Any) -> None:
    """On whichever storage is configured: S3 under make test, the file system in the smoke run."""
    settings.ATTACHMENT_ORPHAN_HOURS = 24
    old = timezone.now() - timedelta(hours=25)

    def new(name: str) -> Attachment:
        response = upload(api(bob), thread, name, png_bytes())
        assert response.status_code == 201, response.json()
        return Attachment.objects.get(pk=response.json()["id"])

    sent, fresh, stale, gone = new("sent.png"), new("fresh.png"), new("stale.png"), new("gone.png")
    message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="sent", attachment_ids=[sent.pk])
    old_sent = new("old-sent.png")
    message_send(sender=bob, thread_id=thread.pk, body="", client_msg_id="old", attachment_ids=[old_sent.pk])
    gone_message, _ = message_send(
        sender=bob, thread_id=thread.pk, body="", client_msg_id="gone", attachment_ids=[gone.pk]
    )
    # The message went without its files being revoked (e.g. the delete after commit failed).
    Message.objects.filter(pk=gone_message.pk).update(deleted_at=timezone.now())
    Attachment.objects.filter(pk__in=[stale.pk, old_sent.pk]).update(created_at=old)
    assert upload(api(bob), thread, "page.html", HTML).status_code == 400
    rejected = Attachment.objects.get(scan_status=ScanStatus.REJECTED)
    infected = Attachment.objects.create(
        uploader=bob,
        thread=thread,
        storage_key="quarantine/eicar-record",
        original_name="e",
        scan_status=ScanStatus.INFECTED,
    )
    Attachment.objects.filter(pk__in=[rejected.pk, infected.pk]).update(created_at=old)
    orphan_thumb = f"attachments/{thread.pk}/{storage.new_token()}/thumb.webp"
    orphan_upload = storage.quarantine_key(storage.new_token())
    for key in (orphan_thumb, orphan_upload):
        storage.store(key, io.BytesIO(b"orphan"), content_type="image/webp", content_disposition="attachment")

    def exists(key: str) -> bool:
        return storage.object_size(key) is not None

    out = io.StringIO()
    with_grace = attachments_cleanup(dry_run=True)
    assert orphan_thumb not in with_grace.keys  # too recent for the default grace
    call_command("cleanup_attachments", "--grace-minutes=0", stdout=out)
    assert "Removed 2 unsent upload(s), revoked 1 file(s)" in out.getvalue()

    remaining = set(Attachment.objects.values_list("pk", flat=True))
    assert remaining == {sent.pk, fresh.pk, old_sent.pk, gone.pk, infected.pk}
    gone.refresh_from_db()
    assert gone.deleted_at is not None
    for attachment in (sent, fresh, old_sent):
        assert exists(attachment.storage_key)
        assert exists(attachment.thumbnail_key)
    for key in (
        stale.storage_key,
        stale.thumbnail_key,
        gone.storage_key,
        gone.thumbnail_key,
        orphan_thumb,
        orphan_upload,
    ):
        assert not exists(key), key
    again = attachments_cleanup(object_grace=timedelta(0))
    assert (again.unattached, again.revoked) == (0, 0)
    assert not {sent.storage_key, fresh.storage_key, old_sent.storage_key} & set(again.keys)


@pytest.mark.smoke
def test_admin_lists_infected_uploads_for_staff(
    local_storage: Path, client: Any, make_user: Callable[..., User], bob: User, thread: Thread
) -> None:
    from accounts.models import SystemRole

    infected = Attachment.objects.create(
        uploader=bob,
        thread=thread,
        storage_key="quarantine/admin-test",
        original_name="invoice.txt",
        scan_status=ScanStatus.INFECTED,
        scan_detail="Eicar-Test-Signature",
    )
    client.force_login(make_user("root", role=SystemRole.OWNER))
    listing = client.get("/admin/attachments/attachment/", {"scan_status__exact": "INFECTED", "sent": "no"})
    assert listing.status_code == 200
    assert b"invoice.txt" in listing.content
    assert b"Eicar-Test-Signature" in listing.content
    assert client.get(f"/admin/attachments/attachment/{infected.pk}/change/").status_code == 200
    client.force_login(bob)
    assert client.get("/admin/attachments/attachment/").status_code == 302
