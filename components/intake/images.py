"""Image probing: what an image file is, by its content, and whether it decodes to one still picture.

Images are decoded here, in our own code, and never by anything that trusts the file extension:
the format is taken from the magic bytes and only allow-listed formats reach Pillow (restricted to
that one plugin); the pixel count is read from the header and checked before any decoding
(decompression bombs); a full decode with truncation treated as an error catches damaged files.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"BM", "BMP"),
)
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # the file suffix an image of each storable format gets


def sniff_format(data: bytes) -> str | None:
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height from the file header alone (no decoding), or None if the header is unreadable.

    Lets the pixel limit be enforced before any decoder sees the file.
    """
    try:
        if fmt == "PNG":
            if data[12:16] != b"IHDR":
                return None
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if fmt == "JPEG":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                    i += 2
                    continue
                length = int.from_bytes(data[i + 2 : i + 4], "big")
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
                i += 2 + length
            return None
        if fmt == "WEBP":
            kind = data[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if kind == b"VP8 ":
                return (int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF)
    except (IndexError, ValueError):
        return None
    return None


@dataclass
class ImageProbe:
    format: str | None
    width: int | None = None
    height: int | None = None
    error: str | None = None


def probe_image(data: bytes, allowed: list[str], max_pixels: int) -> ImageProbe:
    """Identify, size-check and fully decode an image held in memory. Never raises."""
    from PIL import Image

    fmt = sniff_format(data)
    if fmt not in allowed:
        # Not handed to Pillow at all: a TIFF or EPS named .jpg must not reach its plugin.
        return ImageProbe(fmt or "unknown")
    size = header_size(data, fmt)
    if size is not None and size[0] * size[1] > max_pixels:
        return ImageProbe(fmt, size[0], size[1])  # over the limit: reported by pixel-limit, never decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return ImageProbe(fmt, width, height)  # over the limit: reported by pixel-limit, not decoded
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # which frame is the labelled picture is anyone's guess: refused, not guessed
                    return ImageProbe(
                        fmt,
                        width,
                        height,
                        error=f"is animated ({frames} frames); a training image must be a single still picture",
                    )
                im.load()
    except Image.DecompressionBombError as exc:
        return ImageProbe(fmt, error=f"refused by the decoder's pixel guard ({exc})")
    except Image.DecompressionBombWarning as exc:
        return ImageProbe(fmt, error=f"refused by the decoder's pixel guard ({exc})")
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        text = str(exc) or type(exc).__name__
        return ImageProbe(fmt, error=f"cannot be decoded ({text})")
    return ImageProbe(fmt, width, height)
