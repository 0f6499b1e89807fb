"""``python -m bench.images``: what checking an uploaded image costs in memory (docs/benchmarks.md, *Images*).

Each case runs ``attachments.validation.image_process`` on its files as that many concurrent
uploads would (one thread each), in a fresh process with the default settings: no database or
other service is needed. That process reports

- its resident memory after Django's setup and after the images (what it keeps),
- its own peak (``VmHWM``: ``ru_maxrss`` would include this driver's memory, which Linux carries
  over ``exec``),
- the peak of the image workers it started: their own ``VmHWM`` as each reports it, and
  ``RUSAGE_CHILDREN`` (which includes what the measured process held when it started them).

``--tree PATH`` measures another checkout with the same files, e.g. the code before a change
(``git worktree add /tmp/before <commit>``). A few minutes on two cores; timings are printed for
information only. Results: printed as a table, and written to ``bench/results/images-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

_MEASURE = """
import json, resource, sys, tempfile, threading, time
from pathlib import Path

import django


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field))


django.setup()
from attachments import validation
from chatapp.errors import ServiceError

worker_peaks = []
if hasattr(validation, "_run_worker"):  # record what each worker reports of itself
    run_worker = validation._run_worker

    def recording(job):
        outcome = run_worker(job)
        worker_peaks.append(outcome.get("peak_rss_kb", 0) // 1024)
        return outcome

    validation._run_worker = recording
outcomes = []


def check(path):
    with tempfile.TemporaryDirectory() as workdir:
        try:
            validation.image_process(path, validation.sniff(path), workdir=Path(workdir))
            outcomes.append("accepted")
        except ServiceError as exc:
            outcomes.append(exc.as_dict().get("reason", exc.code))


before = status("VmRSS:")
started = time.monotonic()
threads = [threading.Thread(target=check, args=(Path(p),)) for p in sys.argv[1:]]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({
    "outcomes": outcomes,
    "seconds": round(time.monotonic() - started, 1),
    "rss_before_mb": before,
    "rss_after_mb": status("VmRSS:"),
    "peak_mb": status("VmHWM:"),
    "worker_peak_mb": max(worker_peaks, default=None),
    "children_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
}))
"""


def _encoded(image: Any, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def gif_bomb(width: int = 6300, height: int = 6300, frames: int = 4) -> bytes:
    """A 1x1 canvas in the header, then ``frames`` frames of width x height (each under the
    per-frame cap) whose LZW data is a few KB: Pillow grows the canvas to hold them."""
    from PIL import Image

    encoded = _encoded(Image.new("P", (width, height), 0), "GIF", palette=b"\0\0\0\xff\xff\xff")
    big = b"!\xf9\x04\x00\x00\x00\x00\x00" + encoded[encoded.index(b",\x00\x00\x00\x00") : -1]
    tiny = _encoded(Image.new("P", (1, 1), 0), "GIF", palette=b"\0\0\0\xff\xff\xff")
    one = b"!\xf9\x04\x00\x00\x00\x00\x00" + tiny[tiny.index(b",\x00\x00\x00\x00") : -1]
    head = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    head += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    return head + one + big * frames + b";"


def files(directory: Path) -> dict[str, Path]:
    from PIL import Image, ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    made = {
        "gif-bomb.gif": gif_bomb(),
        # The largest animation the default budget takes: 2 frames of 20 megapixels.
        "animation-2x20mp.gif": _encoded(
            Image.new("RGB", (4472, 4472), "red"),
            "GIF",
            save_all=True,
            append_images=[Image.new("RGB", (4472, 4472), "blue")],
        ),
        "photo-12mp.jpg": _encoded(Image.new("RGB", (4032, 3024), (180, 90, 60)), "JPEG", icc_profile=srgb),
        "photo-40mp.jpg": _encoded(Image.new("RGB", (7300, 5470), (180, 90, 60)), "JPEG", icc_profile=srgb),
        # The costliest still under the default caps: libwebp decodes and encodes through copies.
        "alpha-40mp.webp": _encoded(Image.new("RGBA", (7300, 5470), (180, 90, 60, 128)), "WEBP", lossless=True),
    }
    paths = {}
    for name, data in made.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    return paths


CASES = [
    ("the GIF bomb (121 KB: 4 frames of 6300x6300 behind a 1x1 header)", ["gif-bomb.gif"]),
    ("three GIF bombs at once", ["gif-bomb.gif"] * 3),
    ("largest default animation (GIF, 2 frames of 20 MP)", ["animation-2x20mp.gif"]),
    ("12 MP JPEG photo", ["photo-12mp.jpg"]),
    ("three 12 MP JPEG photos at once", ["photo-12mp.jpg"] * 3),
    ("40 MP JPEG photo", ["photo-40mp.jpg"]),
    ("40 MP WebP with alpha", ["alpha-40mp.webp"]),
]


def measure(tree: Path, paths: list[Path]) -> dict[str, Any]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatapp.settings", "CHATAPP_TESTING": "1"}
    for name in ("DATABASE_URL", "REDIS_URL", "AWS_STORAGE_BUCKET_NAME"):
        env.pop(name, None)  # the defaults: nothing here needs a service
    with tempfile.TemporaryDirectory(prefix="bench-images-data-") as data_dir:
        env["CHATAPP_DATA_DIR"] = data_dir
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, *map(str, paths)], capture_output=True, cwd=tree, env=env, check=False
        )
    if done.returncode != 0:
        return {"error": done.stderr.decode(errors="replace")[-500:]}
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """Memory in MB, time in seconds."""
    lines = [
        "| case | outcome | process peak | RSS before → after | worker peak | children's ru_maxrss | s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row["result"]
        if "error" in r:
            lines.append(f"| {row['case']} | error: {r['error'][-120:]!r} | | | | | |")
            continue
        outcome = ", ".join(sorted(set(r["outcomes"])))
        worker = "-" if r["worker_peak_mb"] is None else r["worker_peak_mb"]
        lines.append(
            f"| {row['case']} | {outcome} | {r['peak_mb']} | {r['rss_before_mb']} → {r['rss_after_mb']} "
            f"| {worker} | {r['children_peak_mb']} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose code is measured")
    parser.add_argument("--only", action="append", help="cases whose name contains this (repeatable)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-images-") as directory:
        paths = files(Path(directory))
        for case, names in CASES:
            if args.only and not any(word in case for word in args.only):
                continue
            result = measure(args.tree.resolve(), [paths[name] for name in names])
            rows.append({"case": case, "files": names, "result": result})
            print(f"{case}: {result}", flush=True)
    print()
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"images-{stamp}.json"
    out.write_text(json.dumps({"tree": str(args.tree.resolve()), "rows": rows}, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
