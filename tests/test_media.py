"""media.py: the fast PNG decoder gives exactly what Pillow gives, or steps aside."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tessera.media import (
    FileImage,
    ImageError,
    _plain_png,
    canonical_pixels,
    open_image,
    probe_file,
)


def pillow_probe(source: Path | bytes) -> FileImage:
    """probe_file as it was before the fast path: Pillow's PNG plugin decodes."""
    image = open_image(source)
    pixels = canonical_pixels(image)
    data = source if isinstance(source, bytes) else source.read_bytes()
    return FileImage(
        pixels.width,
        pixels.height,
        pixels.channels,
        image.format.lower(),
        pixels.digest(),
        blake3.blake3(data).hexdigest(),
    )


def outcome(probe: Callable[[Path | bytes], FileImage], source: Path | bytes) -> FileImage | str:
    """What ``probe`` makes of ``source``: its FileImage, or its ImageError's message."""
    try:
        return probe(source)
    except ImageError as e:
        return str(e)


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    # Smooth gradients plus noise: every PNG filter type gets chosen somewhere.
    base = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) * 3
    if channels > 1:
        base = base[:, :, None] + np.arange(channels) * 40
    array = (base + rng.integers(0, 24, shape)).astype(np.uint8)
    return Image.fromarray(array, mode if mode != "L" else None)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, position = [], 8
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        out.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return out


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in parts
    )
    return b"\x89PNG\r\n\x1a\n" + body


PLAIN = {
    "grey-28": lambda: png_bytes(noise("L", (28, 28))),
    "rgb-odd": lambda: png_bytes(noise("RGB", (17, 9), 1)),
    "rgba": lambda: png_bytes(noise("RGBA", (33, 5), 2)),
    "optimized": lambda: png_bytes(noise("RGB", (40, 30), 3), optimize=True),
    "stored": lambda: png_bytes(noise("L", (12, 12), 4), compress_level=0),
    "one-pixel": lambda: png_bytes(noise("L", (1, 1), 5)),
    "wide": lambda: png_bytes(noise("RGB", (3000, 2), 6)),
    "dpi-and-text": lambda: png_bytes(noise("RGB", (8, 8), 7), dpi=(300, 300), pnginfo=_text()),
    "icc": lambda: png_bytes(noise("RGB", (8, 8), 8), icc_profile=b"\0" * 64),
    "split-idat": lambda: _split_idat(png_bytes(noise("RGBA", (64, 64), 9)), 7),
    "after-iend": lambda: png_bytes(noise("L", (9, 9), 10)) + b"trailing bytes",
}

OTHER = {  # decoded by Pillow's PNG plugin, as before
    "palette": lambda: png_bytes(noise("L", (16, 16)).convert("P")),
    "grey-alpha": lambda: png_bytes(noise("RGBA", (8, 8)).convert("LA")),
    "one-bit": lambda: png_bytes(noise("L", (8, 8)).convert("1")),
    "sixteen-bit": lambda: png_bytes(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8))),
    "transparency": lambda: png_bytes(noise("RGB", (8, 8)), transparency=(1, 2, 3)),
    "text-between-idat": lambda: _text_between_idat(png_bytes(noise("L", (64, 64)))),
}


def _text() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("author", "tessera")
    info.add_text("big", "x" * 2000, zip=True)
    info.add_itxt("unicode", "café")
    return info


def _split_idat(data: bytes, pieces: int) -> bytes:
    parts = chunks(data)
    idat = b"".join(d for k, d in parts if k == b"IDAT")
    step = -(-len(idat) // pieces)
    split = [(b"IDAT", idat[i : i + step]) for i in range(0, len(idat), step)]
    first = next(i for i, (k, _) in enumerate(parts) if k == b"IDAT")
    rest = [p for p in parts if p[0] != b"IDAT"]
    return assemble(rest[:first] + split + rest[first:])


def _text_between_idat(data: bytes) -> bytes:
    split = chunks(_split_idat(data, 2))
    at = next(i for i, (k, _) in enumerate(split) if k == b"IDAT") + 1
    return assemble([*split[:at], (b"tEXt", b"a\x00b"), *split[at:]])


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_pngs_decode_fast_to_exactly_what_pillow_gives(tmp_path, name):
    data = PLAIN[name]()
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    assert _plain_png(path.read_bytes()) is not None and _plain_png(data) is not None
    assert probe_file(path) == pillow_probe(path) == probe_file(data)
    assert np.array_equal(np.asarray(_plain_png(path.read_bytes())), np.asarray(Image.open(path)))


@pytest.mark.parametrize("name", sorted(OTHER))
def test_other_pngs_go_to_pillow_with_the_same_outcome(tmp_path, name):
    data = OTHER[name]()
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    assert _plain_png(path.read_bytes()) is None
    assert outcome(probe_file, path) == outcome(pillow_probe, path)


def test_damaged_pngs_get_pillow_s_answer(tmp_path):
    """Every truncation, bad CRC and flipped byte of a plain PNG: the fast path either decodes
    exactly what Pillow decodes or steps aside, so the error (or image) is Pillow's."""
    good = png_bytes(noise("RGB", (12, 10), 11))
    rng = random.Random(5)
    cases = [good[:cut] for cut in range(0, len(good), 7)]
    for _ in range(150):
        damaged = bytearray(good)
        damaged[rng.randrange(8, len(good))] ^= 1 << rng.randrange(8)
        cases.append(bytes(damaged))
    idat = next(d for k, d in chunks(good) if k == b"IDAT")
    for _ in range(60):  # damaged compressed pixels under a correct CRC: the decoder decides
        data = bytearray(idat)
        data[rng.randrange(2, len(data))] ^= 1 << rng.randrange(8)
        cases.append(assemble([(k, bytes(data) if k == b"IDAT" else d) for k, d in chunks(good)]))
    path = tmp_path / "damaged.png"
    outcomes = set()
    for data in cases:
        path.write_bytes(data)
        expected = outcome(pillow_probe, path)
        assert outcome(probe_file, path) == expected, data
        outcomes.add(isinstance(expected, str))
    assert outcomes == {True, False}  # both refusals and readable damage were tried


def test_the_pixel_limit_is_pillow_s_to_enforce(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(noise("L", (40, 40))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1,600 > 2 x 700: a bomb
    assert _plain_png(path.read_bytes()) is None
    with pytest.raises(ImageError, match="too large to decode safely"):
        probe_file(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over the limit, under twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe_file(path) == pillow_probe(path)
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)


def test_a_missing_or_misnamed_file_is_not_the_fast_path_s(tmp_path):
    with pytest.raises(ImageError, match="no image file at"):
        probe_file(tmp_path / "gone.png")
    jpeg = tmp_path / "photo.png"  # a JPEG under a .png name
    noise("RGB", (8, 8)).save(jpeg, format="JPEG")
    assert _plain_png(jpeg.read_bytes()) is None
    assert probe_file(jpeg).format == "jpeg"


def test_truncated_pngs_load_as_pillow_loads_them_when_the_user_allows_it(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = png_bytes(noise("RGB", (30, 20), 12))
    path = tmp_path / "cut.png"
    loaded = 0
    for cut in range(60, len(good), 11):
        path.write_bytes(good[:cut])
        expected = outcome(pillow_probe, path)
        assert outcome(probe_file, path) == expected
        loaded += isinstance(expected, FileImage)
    assert loaded  # Pillow did load some of them; so did probe_file, identically
