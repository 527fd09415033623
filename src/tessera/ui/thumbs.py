"""Thumbnails made on the server, cached by digest and size.

A thumbnail is a pure function of the image bytes (named by their digest) and the size, so it
never changes: it is made once with Pillow, stored under ``<store>/cache/thumbs/<size>/ab/
<digest>.webp`` and served with ``Cache-Control: immutable`` and an ETag. They live under
``cache/`` and not ``blobs/``: they are not content the catalog references, so gc would delete
them there, and a cache may be removed at any time (it is rebuilt on demand).
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageOps

from tessera.media import ImageError, open_image
from tessera.store.hashing import check_digest

SIZES = (64, 128, 256)
QUALITY = 82
# Formats a browser shows as they are; anything else is converted to PNG for full-size views.
BROWSER_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def sniff(head: bytes) -> str | None:
    """The browser-safe image format of some leading bytes, or None."""
    for magic, fmt in MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


class Thumbnails:
    def __init__(self, root: Path):
        self.root = root / "cache" / "thumbs"

    def path(self, digest: str, size: int | str) -> Path:
        check_digest(digest)
        suffix = ".png" if size == "full" else ".webp"
        return self.root / str(size) / digest[:2] / f"{digest}{suffix}"

    def thumbnail(self, digest: str, size: int, source: Path | bytes) -> Path:
        """The cached thumbnail file, made from ``source`` (the blob's file, or its bytes) if
        missing."""
        if size not in SIZES:
            raise ValueError(f"thumbnail size must be one of {SIZES}")
        target = self.path(digest, size)
        if target.exists():
            return target
        image = _load(source, draft=size)
        image = ImageOps.exif_transpose(image) or image
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.thumbnail((size, size), PILImage.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=QUALITY, method=4)
        _write_atomic(target, buffer.getvalue())
        return target

    def browser_image(self, digest: str, source: Path | bytes) -> tuple[Path | bytes, str]:
        """The full-size image as a browser can show it: the blob itself for JPEG, PNG, GIF
        and WebP; a cached PNG conversion for other formats (TIFF, BMP, …)."""
        if isinstance(source, bytes):
            fmt = sniff(source[:16])
        else:
            with open(source, "rb") as f:
                fmt = sniff(f.read(16))
        if fmt is not None:
            return source, BROWSER_FORMATS[fmt]
        target = self.path(digest, "full")
        if not target.exists():
            image = _load(source)
            if image.mode not in ("RGB", "RGBA", "L", "LA", "I;16"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            _write_atomic(target, buffer.getvalue())
        return target, "image/png"


def _load(source: Path | bytes, draft: int | None = None) -> PILImage.Image:
    """Decode an image (the decompression-bomb limit of tessera.media applies); for a
    thumbnail of a JPEG, let the decoder scale down while decoding."""
    if draft is None:
        return open_image(source)
    try:
        image = PILImage.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        image.load()
        return image
    except PILImage.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a readable image ({e})") from None


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, target)
