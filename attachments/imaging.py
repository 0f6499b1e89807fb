"""Making an uploaded image safe: only its pixels are kept, at a memory cost decided before decoding.

This module runs in a worker process of its own (``python -m attachments.imaging``, started per
image by :func:`attachments.validation.image_process`), under an address-space limit: what a
decoder allocates, and whatever a crafted file makes a C library do, stays in that process and
is given back to the system when it exits. It imports Pillow only, never Django: the job (paths
and limits) arrives as JSON on stdin and the outcome leaves as JSON on stdout.

The order of the work:

1. Open with Pillow restricted to the sniffed format.
2. Size every frame from the headers alone (:func:`geometry`): nothing is decoded yet. A frame
   over ``max_pixels``, an animation of more than ``max_frames`` frames, or one whose frames
   composite to more than ``max_animation_pixels`` in total, is refused here.
3. Decode and re-encode: a still image has its EXIF orientation applied to the pixels and its
   colours converted to sRGB through its ICC profile (:func:`to_srgb`); then it is saved without
   any metadata at all (no EXIF, XMP, comments, text chunks or profile). An animation keeps its
   frames and timing only.
4. A WebP thumbnail from the same (converted) pixels.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image, ImageCms, ImageOps

# Our caps decide, not Pillow's warning at half its own limit (which is set from ours below).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# A profile larger than this is not parsed (its pixels are taken as sRGB). Real profiles are
# 0.5-4 KB for displays and cameras and up to ~2 MB for press CMYK; parsing costs grow with size.
MAX_ICC_PROFILE_BYTES = 4 * 1024 * 1024
# Playback metadata an animation keeps: how its frames play, nothing about the author or the tool.
_ANIMATION_INFO = frozenset({"transparency", "duration", "loop", "background", "disposal", "blend"})
# A still image keeps only what its pixels need to be drawn.
_STILL_INFO = frozenset({"transparency"})
_QUALITY = {"JPEG": 90, "WEBP": 90}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass(frozen=True)
class Job:
    source: str
    format: str  # a Pillow format name: PNG, JPEG, GIF, WEBP
    dest: str  # where the re-encoded image goes
    thumbnail: str  # where the WebP thumbnail goes
    max_pixels: int  # decoded pixels per frame
    max_animation_pixels: int  # composited pixels over all frames of an animation
    max_frames: int  # frames of an animation
    thumbnail_px: int


class ImageRefused(Exception):
    """The image is not acceptable. ``too_large`` refusals are 413s, the others 400s."""

    def __init__(self, message: str, *, reason: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.too_large = too_large


def _invalid() -> ImageRefused:
    return ImageRefused("The image could not be read.", reason="image_invalid")


# --------------------------------------------------------------------------- sizes, from headers


def _skip_sub_blocks(fp: IO[bytes]) -> None:
    while (length := fp.read(1)) and length[0]:
        fp.seek(length[0], io.SEEK_CUR)


def gif_geometry(fp: IO[bytes]) -> tuple[int, int, int]:
    """(canvas width, canvas height, frames) of a GIF from its block structure, decoding nothing.

    Written out because no library gives this without decoding: Pillow learns a frame's size
    only by seeking to it, which decodes and composites every frame before it, and it grows
    the canvas when a frame reaches past the one the header declares. This walk follows
    Pillow's own (``GifImageFile._seek``): an unknown byte between blocks is skipped, not an end.
    """
    head = fp.read(13)
    if len(head) < 13 or head[:6] not in (b"GIF87a", b"GIF89a"):
        raise _invalid()
    width, height, flags = struct.unpack("<HHB", head[6:11])
    if flags & 0x80:
        fp.seek(3 << ((flags & 7) + 1), io.SEEK_CUR)
    frames = 0
    while (introducer := fp.read(1)) and introducer != b";":
        if introducer == b"!":
            fp.read(1)  # the extension's label
            _skip_sub_blocks(fp)
        elif introducer == b",":
            descriptor = fp.read(9)
            if len(descriptor) < 9:
                break
            left, top, w, h, local = struct.unpack("<HHHHB", descriptor)
            width, height = max(width, left + w), max(height, top + h)
            frames += 1
            if local & 0x80:
                fp.seek(3 << ((local & 7) + 1), io.SEEK_CUR)
            fp.read(1)  # LZW minimum code size
            _skip_sub_blocks(fp)
    return width, height, frames


def geometry(im: Image.Image, source: str) -> tuple[int, int, int]:
    """(canvas width, canvas height, frames decoded) from the headers alone.

    Every frame of an animation is composited onto the whole canvas, so what decoding and
    re-encoding it costs grows with canvas x frames. PNG keeps only its first frame (APNG
    is stored as a still), and libwebp's demuxer and Pillow's APNG reader refuse frames that
    reach outside the canvas, so their header sizes hold; a GIF's frames are walked.
    """
    if im.format == "GIF":
        with open(source, "rb") as f:
            return gif_geometry(f)
    frames = int(getattr(im, "n_frames", 1)) if im.format == "WEBP" else 1
    return im.size[0], im.size[1], frames


def check_pixels(width: int, height: int, frames: int, job: Job) -> None:
    if width < 1 or height < 1 or frames < 1:
        raise _invalid()
    if width * height > job.max_pixels:
        raise ImageRefused(
            f"The image is {width}x{height} pixels; images are limited to {job.max_pixels:,} pixels.",
            reason="too_many_pixels",
            too_large=True,
        )
    if frames > job.max_frames:
        # Each frame costs its own pass through decoder and encoder, however small it is.
        raise ImageRefused(
            f"The animation has {frames:,} frames; animations are limited to {job.max_frames:,}.",
            reason="too_many_frames",
            too_large=True,
        )
    if frames > 1 and width * height * frames > job.max_animation_pixels:
        raise ImageRefused(
            f"The animation is {frames} frames of {width}x{height} pixels; animations are limited to "
            f"{job.max_animation_pixels:,} pixels over all their frames.",
            reason="too_many_pixels",
            too_large=True,
        )


# --------------------------------------------------------------------------- colour


def _lut_transform(transform: ImageCms.ImageCmsTransform, entries: Image.Image) -> Image.Image:
    return ImageCms.applyTransform(entries, transform) or entries


def to_srgb(im: Image.Image) -> Image.Image:
    """The pixels converted from the image's ICC profile to sRGB; the profile leaves ``info``.

    A profile that is too large, does not parse, or does not fit the image's mode is dropped
    and the pixels are taken as sRGB (what a browser does with a profile it cannot use). Only
    RGB(A) is converted in place; CMYK yields a new RGB image; palette and greyscale images are
    converted through their 256 possible values, so no full-size copy is made.
    """
    data = im.info.pop("icc_profile", None)
    if not data or len(data) > MAX_ICC_PROFILE_BYTES:
        return im
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(data))
        if im.mode in ("RGB", "RGBA"):
            ImageCms.profileToProfile(im, source, _SRGB, outputMode=im.mode, inPlace=True)
            return im
        if im.mode == "CMYK":
            converted = ImageCms.profileToProfile(im, source, _SRGB, outputMode="RGB")
            return converted if converted is not None else im
        if im.mode in ("P", "PA"):
            palette = im.getpalette("RGB") or []
            entries = Image.frombytes("RGB", (len(palette) // 3, 1), bytes(palette))
            transform = ImageCms.buildTransform(source, _SRGB, "RGB", "RGB")
            im.putpalette(_lut_transform(transform, entries).tobytes(), "RGB")
            return im
        if im.mode in ("L", "LA"):
            ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
            transform = ImageCms.buildTransform(source, _SRGB, "L", "RGB")
            grey = list(_lut_transform(transform, ramp).convert("L").getdata())
            return im.point(grey + list(range(256)) if im.mode == "LA" else grey)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        pass
    return im


# --------------------------------------------------------------------------- re-encoding


def _thumbnail(im: Image.Image, dest: str, size: int) -> None:
    """Shrinks ``im`` in place (its last use) and writes it as WebP."""
    if im.mode in ("P", "PA", "1", "I", "I;16", "F"):
        # Palettes cannot be resampled, and WebP takes only 8-bit RGB(A).
        im = im.convert("RGBA" if im.has_transparency_data else "RGB")
    im.thumbnail((size, size))
    im.convert("RGBA" if im.mode in ("RGBA", "LA") else "RGB").save(dest, format="WEBP", quality=80)


def _still(im: Image.Image, job: Job) -> tuple[int, int]:
    im.load()
    ImageOps.exif_transpose(im, in_place=True)  # the orientation EXIF asked for, in the pixels
    clean = to_srgb(im)
    if job.format == "JPEG" and clean.mode not in ("RGB", "L"):
        clean = clean.convert("RGB")
    clean.info = {k: v for k, v in clean.info.items() if k in _STILL_INFO}
    options = {"quality": _QUALITY[job.format]} if job.format in _QUALITY else {}
    clean.save(job.dest, format=job.format, **options)
    size = clean.size
    _thumbnail(clean, job.thumbnail, job.thumbnail_px)
    return size


def _animation(im: Image.Image, job: Job) -> tuple[int, int]:
    """Frames and timing only. The profile is dropped, not converted: an animation's frames are
    re-read from the source while saving, one at a time, and animated GIF/WebP profiles are
    nearly always sRGB anyway."""
    im.info = {k: v for k, v in im.info.items() if k in _ANIMATION_INFO}
    options = {"quality": _QUALITY[job.format]} if job.format in _QUALITY else {}
    im.save(job.dest, format=job.format, save_all=True, **options)
    im.seek(0)
    size = im.size
    _thumbnail(im.copy(), job.thumbnail, job.thumbnail_px)
    return size


def process(job: Job) -> tuple[int, int]:
    """Re-encode ``job.source`` into ``job.dest`` and write its thumbnail; (width, height) stored.

    Raises ImageRefused; any other exception means the file could not be decoded.
    """
    # Pillow refuses past twice this wherever it sizes an image while decoding: past our cap.
    Image.MAX_IMAGE_PIXELS = max(1, (job.max_pixels + 1) // 2)
    try:
        with Image.open(job.source, formats=[job.format]) as im:
            # A JPEG with further pictures (MPF: an Ultra HDR photo's gain map, a stereo pair) opens
            # as MPO; its primary picture is the JPEG, and only that is kept.
            if im.format != job.format and (job.format, im.format) != ("JPEG", "MPO"):
                raise _invalid()
            width, height, frames = geometry(im, job.source)
            check_pixels(width, height, frames, job)
            # Pillow walks a GIF's frames too (without decoding): a frame it would decode that
            # our walk missed is refused. Only now, once the count we found is within the caps.
            if im.format == "GIF" and int(getattr(im, "n_frames", 1)) > frames:
                raise _invalid()
            if frames > 1:
                return _animation(im, job)
            return _still(im, job)
    except Image.DecompressionBombError:
        raise ImageRefused("The image has too many pixels.", reason="too_many_pixels", too_large=True) from None
    except MemoryError:
        raise ImageRefused(
            "The image needs more memory to process than is allowed.", reason="too_complex", too_large=True
        ) from None


# --------------------------------------------------------------------------- the worker


def _limit_memory(megabytes: int) -> None:
    """Cap this process's address space: an allocation past it fails (MemoryError), nothing else
    on the machine is touched. Enforced on Linux; where the system refuses the limit (macOS)
    the header checks alone bound memory."""
    limit = megabytes * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        print("image worker: the address-space limit could not be set", file=sys.stderr)


def peak_rss_kb() -> int:
    """This process's peak resident memory. ``VmHWM`` rather than ``ru_maxrss``: Linux carries the
    latter over ``exec`` from the parent that spawned us."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main() -> int:
    """Read one job from stdin, print its outcome as JSON on stdout: ``{"width", "height"}`` or
    ``{"refused": reason, "message", "too_large"}``, with ``peak_rss_kb``. The exit status is 0
    for both."""
    request: dict[str, Any] = json.loads(sys.stdin.read())
    _limit_memory(int(request.pop("memory_mb")))
    outcome: dict[str, Any]
    try:
        width, height = process(Job(**request))
        outcome = {"width": width, "height": height}
    except ImageRefused as exc:
        outcome = {"refused": exc.reason, "message": exc.message, "too_large": exc.too_large}
    except Exception:  # whatever a decoder raises on a bad file is a refusal, never a crash
        traceback.print_exc(limit=3, file=sys.stderr)
        refused = _invalid()
        outcome = {"refused": refused.reason, "message": refused.message, "too_large": False}
    outcome["peak_rss_kb"] = peak_rss_kb()
    sys.stdout.write(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
