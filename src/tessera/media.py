"""Images in, pixels and bytes out: one canonical form for every kind of image a user holds.

A path, a PIL image, a numpy array (HW / HWC, uint8 or float in [0, 1]) and a torch tensor (CHW)
all become one canonical uint8 (or uint16) array. Its *pixel digest* — BLAKE3 over a small header
(shape, dtype) and the pixels — is what lets ``Image(np.asarray(PIL.Image.open(path)))`` resolve
to the stored original file: the dataset recorded the same digest when it decoded that file.
Encoding is lossless and deterministic (PNG), so identical arrays give identical blobs.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import blake3
import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from tessera.errors import TesseraError
from tessera.files import read_small

# Decompression bombs: refuse images over ~180 megapixels (Pillow raises above 2x its limit).
PILImage.MAX_IMAGE_PIXELS = 90_000_000
_PIXEL_HEADER = b"tessera-pixels-v1\0"


class ImageError(TesseraError, ValueError):
    """An image input that cannot be read or understood."""


@dataclass(frozen=True)
class Pixels:
    """Canonical pixels: uint8 HW / HWC (C = 3 or 4), or uint16 HW; and how they were made."""

    array: np.ndarray
    scaled: tuple[float, float] | None = None  # (min, max) if a float array was min-max scaled

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 2 else int(self.array.shape[2])

    def digest(self) -> str:
        return pixel_digest(self.array)

    def encode_png(self) -> bytes:
        """Lossless, deterministic PNG bytes (no timestamps or other metadata)."""
        buffer = io.BytesIO()
        image = PILImage.fromarray(self.array)
        image.save(buffer, format="PNG", compress_level=6)
        return buffer.getvalue()

    def media(self, fmt: str = "png") -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": "image",
            "format": fmt,
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
            "pixels": self.digest(),
        }
        if self.array.dtype != np.uint8:
            info["dtype"] = str(self.array.dtype)
        if self.scaled is not None:
            info["scaled"] = list(self.scaled)
        return info


def pixel_digest(array: np.ndarray) -> str:
    return _pixel_digest(array.shape, array.dtype.str, np.ascontiguousarray(array).data)


def _pixel_digest(shape: tuple[int, ...], dtype: str, data: bytes | memoryview) -> str:
    """The digest of C-ordered pixels ``data`` of this shape and NumPy dtype string."""
    hasher = blake3.blake3(_PIXEL_HEADER)
    hasher.update(f"{'x'.join(map(str, shape))}:{dtype}\0".encode())
    hasher.update(data)
    return hasher.hexdigest()


def is_path_like(value: object) -> bool:
    return isinstance(value, str | os.PathLike)


def canonical_pixels(value: Any, *, chw: bool | None = None) -> Pixels:
    """The canonical pixels of a PIL image, numpy array or torch tensor.

    ``chw``: whether a 3-D array is channels-first. Default: True for torch tensors (their
    convention), False for numpy arrays.
    """
    if isinstance(value, PILImage.Image):
        return _from_array(np.asarray(value), chw=False)
    module = type(value).__module__
    if module.startswith("torch"):
        array = value.detach().cpu().numpy()
        return _from_array(array, chw=True if chw is None else chw)
    if isinstance(value, np.ndarray):
        return _from_array(value, chw=bool(chw))
    raise ImageError(
        f"cannot use a {type(value).__name__} as an image; pass a file path, a PIL image, "
        "a numpy array (HW or HWC) or a torch tensor (CHW)"
    )


def _from_array(array: np.ndarray, chw: bool) -> Pixels:
    if array.ndim == 3 and chw:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"an image array must be HW, HWC with 1, 3 or 4 channels (or CHW for tensors); "
            f"got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"an image needs at least one pixel; got shape {tuple(array.shape)}")
    scaled = None
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("an image array contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            # Exact for arrays made as uint8 / 255 (e.g. torchvision's ToTensor).
            array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
        else:  # normalised data: stretch to the full 8-bit range, and remember how
            span = high - low or 1.0
            array = np.rint((array.astype(np.float64) - low) * (255.0 / span)).astype(np.uint8)
            scaled = (low, high)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            array = array.astype(np.uint8)
        elif low >= 0 and high <= 65535 and array.ndim == 2:
            array = array.astype(np.uint16)
        else:
            span = (high - low) or 1
            array = np.rint((array.astype(np.float64) - low) * (255.0 / span)).astype(np.uint8)
            scaled = (float(low), float(high))
    else:
        raise ImageError(f"cannot make an image of dtype {array.dtype}")
    return Pixels(np.ascontiguousarray(array), scaled)


@dataclass(frozen=True)
class FileImage:
    """What decoding an image file tells: its size, format and pixel digest, and the digest of
    the file's bytes (BLAKE3, the store's blob name), taken before they were decoded."""

    width: int
    height: int
    channels: int
    format: str
    pixels: str
    file_digest: str

    def media(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
            "pixels": self.pixels,
        }


def open_image(source: str | os.PathLike[str] | bytes, name: str | None = None) -> PILImage.Image:
    """Open and fully decode an image, with errors that name the file (``name``, for bytes
    read from one)."""
    name = name or ("image bytes" if isinstance(source, bytes) else str(source))
    try:
        image = PILImage.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return image
    except FileNotFoundError:
        raise ImageError(f"no image file at {name}") from None
    except PILImage.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode safely ({e})") from None
    except UnidentifiedImageError:  # its message names the BytesIO object, not the file
        raise ImageError(
            f"{name} is not a readable image (Pillow cannot identify it: empty, damaged or in an "
            "unknown format)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is not a readable image ({e})") from None


def probe_file(path: str | os.PathLike[str] | bytes) -> FileImage:
    """Decode an image file (or its bytes) once: size, format, the pixel digest of
    ``np.asarray(image)``, and the digest of the file's bytes."""
    return probe_file_bytes(path)[0]


def probe_file_bytes(path: str | os.PathLike[str] | bytes) -> tuple[FileImage, bytes | None]:
    """``probe_file``, and the bytes it hashed and decoded. None instead of bytes for a file too
    large to read whole (hashed mapped and decoded from its path), and for one whose size
    changed while it was read or that could not be read at first (decoded from its path).

    Storing exactly these bytes makes the sample's pixel digest, size and format describe what
    is stored, whatever happens to the file afterwards; without them, ``store_dataset`` reads
    the file again and refuses it if it no longer hashes to ``file_digest``."""
    data = path if isinstance(path, bytes) else None
    file_digest = None
    with suppress(OSError):  # if unreadable, Pillow says why below
        if data is None:
            data = read_small(path, _WHOLE_FILE_MAX_BYTES)
        file_digest = _streamed_digest(path) if data is None else blake3.blake3(data).hexdigest()
    plain = _plain_png(data) if data is not None else None
    if plain is not None and file_digest is not None:
        # Already canonical (8-bit L, RGB or RGBA): np.asarray(plain) would be these bytes in
        # this shape, so hash them without NumPy (a fifth of a thumbnail's probe).
        (width, height), channels = plain.size, len(plain.mode)
        shape = (height, width) if channels == 1 else (height, width, channels)
        pixels = _pixel_digest(shape, "|u1", plain.tobytes())
        return FileImage(width, height, channels, "png", pixels, file_digest), data
    # Anything else is decoded by Pillow: from the bytes just hashed when there are some (so the
    # pixels are those of the hashed bytes), else from the path.
    name = None if isinstance(path, bytes) else os.fsdecode(path)
    image = open_image(data if data is not None else path, name)
    canonical = canonical_pixels(image)
    fmt = image.format
    if not fmt:  # the file name's suffix, looked at only when needed (a Path costs 4 µs)
        fmt = "" if name is None else Path(name).suffix.lstrip(".")
    fmt = (fmt or "unknown").lower()
    if file_digest is None:  # unreadable a moment ago, yet Pillow read it
        file_digest = _streamed_digest(cast(str, path))
    info = FileImage(
        canonical.width, canonical.height, canonical.channels, fmt, canonical.digest(), file_digest
    )
    return info, data


def _streamed_digest(path: str | os.PathLike[str]) -> str:
    """The BLAKE3 digest of a file too large to read whole (mapped, one thread: the probe may
    run in a forked child, where BLAKE3's threads would hang; see store/hashing.py)."""
    hasher = blake3.blake3()
    hasher.update_mmap(path)
    return hasher.hexdigest()


# The PNGs that _plain_png decodes: 8 bits per sample, grey, RGB or RGBA (IHDR bit depth and
# colour type -> Pillow mode), not interlaced, and no chunk that changes what the pixels mean.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Image files larger than this are hashed mapped and decoded by Pillow from their path, not read
# whole first.
_WHOLE_FILE_MAX_BYTES = 64 * 1024 * 1024
_PLAIN_PNG_MODES = {(8, 0): "L", (8, 2): "RGB", (8, 6): "RGBA"}
_PIXEL_NEUTRAL_CHUNKS = {
    b"gAMA",
    b"sRGB",
    b"cHRM",
    b"iCCP",
    b"pHYs",
    b"tIME",
    b"tEXt",
    b"zTXt",
    b"iTXt",
}
_CHUNK = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")


def _plain_png(data: bytes) -> PILImage.Image | None:
    """A common PNG decoded with Pillow's own zlib/filter decoder, without its PNG plugin's
    Python: 20 µs instead of 36 for a 28x28 thumbnail, most of a dataset probe. The same
    pixels as ``PIL.Image.open(path).load()`` gives (tests compare them over many kinds of
    PNG); None for anything else — another format or PNG flavour, a bad CRC, a short file, a
    decoding error, more pixels than ``MAX_IMAGE_PIXELS`` — which then goes to Pillow, whose
    answer (or error message) is the one that counts."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    position, size, idat, idat_ended = len(_PNG_SIGNATURE), None, [], False
    while True:
        if position + 12 > len(data):
            return None  # no IEND
        length, kind = _CHUNK.unpack_from(data, position)
        end = position + 12 + length
        if end > len(data):
            return None
        body = data[position + 8 : end - 4]
        if zlib.crc32(body, zlib.crc32(kind)) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        if kind == b"IHDR" and size is None and length == _IHDR.size:
            width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(body)
            mode = _PLAIN_PNG_MODES.get((depth, colour))
            if mode is None or compression or filtering or interlace:
                return None
            size = (width, height)
        elif kind == b"IDAT" and size is not None and not idat_ended:
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind in _PIXEL_NEUTRAL_CHUNKS:
            idat_ended = bool(idat)  # IDAT chunks must be consecutive
        else:
            return None
        position = end
    limit = PILImage.MAX_IMAGE_PIXELS
    if size is None or not idat or 0 in size or (limit and size[0] * size[1] > limit):
        return None
    try:
        image = PILImage.frombytes(mode, size, b"".join(idat), "zip", mode)
    except (ValueError, OSError, MemoryError):
        return None
    image.format = "PNG"
    return image


def file_extension(fmt: str) -> str:
    return {
        "jpeg": ".jpg",
        "png": ".png",
        "gif": ".gif",
        "webp": ".webp",
        "bmp": ".bmp",
        "tiff": ".tif",
    }.get(fmt, f".{fmt}")
