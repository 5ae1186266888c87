#!/usr/bin/env python3
"""JPEG fixtures for the differential test of vsft-data's JPEG decoder against
libjpeg-turbo as Pillow uses it (crates/vsft-data/tests/jpeg_differential.rs), and seed
images of the other formats for its mutation test.

Writes tests/fixtures/jpeg/*.jpg (every kind of JPEG Pillow writes: baseline, progressive,
restart intervals, 4:4:4 / 4:2:2 / 4:2:0 / 4:4:0 sampling, grayscale, CMYK, quality levels,
optimized Huffman tables, 16-bit quantization tables; odd sizes) plus PNG / WebP / GIF seeds,
and manifest.json: per file its kind, Pillow's size and the SHA-256 of
`Image.open(f).convert("RGB").tobytes()`.

Pillow cannot write 4:4:0 (its `subsampling` takes 4:4:4, 4:2:2, 4:2:0): those files are a
square 4:2:2 file whose SOF luma sampling is patched from 2x1 to 1x2. A square image has as
many 8x16 MCUs as 16x8 ones and each MCU holds the same blocks (2 Y, Cb, Cr), so the
entropy-coded data stays valid; Pillow's decoding of the patched file is the reference.

Usage: python3 scripts/make_jpeg_fixtures.py  (Pillow pinned in scripts/requirements.txt)
"""
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "jpeg"
SIZES = [(1, 1), (7, 13), (17, 9), (33, 31), (64, 48)]


def photo():
    """A natural image: a crop of scikit-image's astronaut, else gradients and noise."""
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()[40:160, 150:310])
    except ImportError:
        return synthetic(160, 120, 7)


def synthetic(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)], -1)
    noise = rng.integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def sof(data):
    """Offset of the SOF0..SOF2 segment's payload."""
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, "marker expected"
        m, n = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if m in (0xC0, 0xC1, 0xC2):
            return i + 4
        i += 2 + n
    raise ValueError("no SOF")


def patch_440(data):
    """4:2:2 (Y 2x1) -> 4:4:0 (Y 1x2), see the module doc."""
    p = sof(data)
    assert data[p + 5] == 3 and data[p + 7] == 0x21, "a 4:2:2 three-component file expected"
    b = bytearray(data)
    b[p + 7] = 0x12
    return bytes(b)


def jpeg(img, **kw):
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def other(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*"):
        if old.suffix in (".jpg", ".png", ".webp", ".gif", ".json"):
            old.unlink()
    files = {}  # name -> (kind, bytes)
    imgs = {f"{w}x{h}": synthetic(w, h, w * 31 + h) for (w, h) in SIZES}
    imgs["photo"] = photo()
    for name, img in imgs.items():
        files[f"baseline_{name}.jpg"] = ("baseline", jpeg(img, quality=85))
        files[f"progressive_{name}.jpg"] = ("progressive", jpeg(img, quality=85, progressive=True))
        files[f"gray_{name}.jpg"] = ("grayscale", jpeg(img.convert("L"), quality=85))
        for s in ("4:4:4", "4:2:2", "4:2:0"):
            files[f"s{s.replace(':', '')}_{name}.jpg"] = (f"subsampling {s}", jpeg(img, quality=90, subsampling=s))
    photo_img = imgs["photo"]
    for name in ("64x48", "photo"):
        img = imgs[name]
        files[f"gray_progressive_{name}.jpg"] = ("grayscale progressive", jpeg(img.convert("L"), progressive=True))
        files[f"cmyk_{name}.jpg"] = ("CMYK", jpeg(img.convert("CMYK"), quality=90))
        files[f"cmyk_progressive_{name}.jpg"] = ("CMYK progressive", jpeg(img.convert("CMYK"), progressive=True))
        files[f"optimized_{name}.jpg"] = ("optimized Huffman tables", jpeg(img, optimize=True))
        files[f"restart_blocks_{name}.jpg"] = ("restart interval (blocks)", jpeg(img, restart_marker_blocks=3))
        files[f"restart_rows_{name}.jpg"] = ("restart interval (rows)", jpeg(img, restart_marker_rows=1))
        files[f"progressive_restart_{name}.jpg"] = (
            "progressive restart interval",
            jpeg(img, progressive=True, restart_marker_blocks=2, subsampling="4:4:4"),
        )
        files[f"progressive_422_{name}.jpg"] = ("progressive 4:2:2", jpeg(img, progressive=True, subsampling="4:2:2"))
        for q in (1, 10, 50, 100):
            files[f"q{q}_{name}.jpg"] = (f"quality {q}", jpeg(img, quality=q))
    # 16-bit quantization tables (values above 255): an extended-sequential frame (SOF1)
    big_q = [[min(32767, 300 + 37 * k) for k in range(64)], [min(32767, 500 + 41 * k) for k in range(64)]]
    files["qtables16_photo.jpg"] = ("16-bit quantization tables", jpeg(photo_img, qtables=big_q))
    # 4:4:0 from square 4:2:2 files
    for side in (16, 33, 48):
        img = synthetic(side, side, side)
        files[f"s440_{side}x{side}.jpg"] = ("subsampling 4:4:0", patch_440(jpeg(img, quality=90, subsampling="4:2:2")))
    sq = photo_img.crop((0, 0, 112, 112))
    files["s440_photo.jpg"] = ("subsampling 4:4:0", patch_440(jpeg(sq, quality=90, subsampling="4:2:2")))
    # seeds of the other formats (mutation test only)
    small = imgs["33x31"]
    rgba = small.copy()
    rgba.putalpha(Image.fromarray((np.arange(33 * 31).reshape(31, 33) % 256).astype(np.uint8)))
    files["seed_rgb.png"] = ("seed", other(small, "PNG"))
    files["seed_rgba.png"] = ("seed", other(rgba, "PNG"))
    files["seed_palette.png"] = ("seed", other(small.convert("P"), "PNG"))
    files["seed_lossy.webp"] = ("seed", other(small, "WEBP", quality=80))
    files["seed_lossless.webp"] = ("seed", other(rgba, "WEBP", lossless=True))
    files["seed.gif"] = ("seed", other(small.convert("P"), "GIF"))

    manifest = []
    for name, (kind, data) in sorted(files.items()):
        (OUT / name).write_bytes(data)
        entry = {"file": name, "kind": kind}
        if name.endswith(".jpg"):
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
                entry.update(mode=im.mode, width=rgb.width, height=rgb.height, sha256=hashlib.sha256(rgb.tobytes()).hexdigest())
        manifest.append(entry)
    import PIL

    doc = {"pillow": PIL.__version__, "files": manifest}
    (OUT / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(len(d) for _, d in files.values())
    print(f"{len(files)} files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
