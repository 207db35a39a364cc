"""Glyph images: Unicode characters drawn from the fonts that ship with matplotlib, in varied styles.

The raw material of the proving ground (``components/scenarios/glyph_bench.py``): thousands of classes with real
structure, offline and deterministic. A class is one character; its text is its lower-cased Unicode name
("latin small letter e with caron"), which is compositional, so a model pretrained on some classes can
recognise others by name. Characters that render alike (Latin A, Greek Alpha, Cyrillic A) are one
picture with several names: only the first of each look-alike group is kept (``candidates``).

A rendering (``render``) is a function of the character and a :class:`Style` only, and a style is drawn
from a seeded generator (``draw_style``), so the same seed gives the same bytes on any machine with the
same fonts (matplotlib's packaged copies) and Pillow.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDE = 32
FONT_FILES = ("DejaVuSans.ttf", "STIXGeneral.ttf", "DejaVuSerif.ttf")
COLOURS = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "red": (210, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 60, 210),
    "yellow": (235, 205, 30),
    "orange": (240, 130, 20),
    "purple": (130, 40, 170),
    "pink": (240, 120, 180),
    "brown": (120, 70, 30),
    "grey": (128, 128, 128),
    "cyan": (30, 200, 220),
}
BACKGROUNDS = ("plain", "striped", "noisy", "gradient", "checkered")
# Pretraining sees the first four domains only; the continual tasks bring the others (never seen).
PRETRAIN_DOMAINS = ("filled", "outlined", "blurred", "faded")
NEW_DOMAINS = ("inverted", "pixelated", "sketched", "grainy", "dotted", "shadowed")
DOMAINS = PRETRAIN_DOMAINS + NEW_DOMAINS
# A family per class, by the first rule its Unicode name matches (in order); else by its category.
FAMILY_RULES = (
    ("mathematical", "mathematical alphanumerics"),
    ("braille", "braille"),
    ("box drawings", "box drawing"),
    ("arrow", "arrows"),
    ("latin", "latin"),
    ("greek", "greek"),
    ("cyrillic", "cyrillic"),
    ("hebrew", "hebrew"),
    ("arabic", "arabic"),
    ("circled", "enclosed"),
    ("parenthesized", "enclosed"),
    ("block", "block elements"),
    ("shade", "block elements"),
    ("superscript", "scripts"),
    ("subscript", "scripts"),
)
CATEGORY_FAMILIES = {"N": "numbers", "P": "punctuation", "Sm": "mathematical operators"}


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _coverage(font_file: str) -> frozenset[int]:
    from matplotlib import ft2font

    return frozenset(ft2font.FT2Font(str(font_dir() / font_file)).get_charmap())


@functools.lru_cache(maxsize=512)
def _font(font_file: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / font_file), size)


def family_of(char: str) -> str:
    name = unicodedata.name(char).lower()
    for word, family in FAMILY_RULES:
        if word in name:
            return family
    category = unicodedata.category(char)
    return CATEGORY_FAMILIES.get(category, CATEGORY_FAMILIES.get(category[0], "symbols"))


@dataclass(frozen=True)
class Glyph:
    char: str
    name: str  # the class text: the lower-cased Unicode name
    family: str
    fonts: tuple[str, ...]  # the packaged fonts that cover it (a rendering picks one)


def _mask(char: str, font_file: str, size: int, dx: float = 0.0, dy: float = 0.0, angle: float = 0.0):
    """The glyph's coverage (L image, 0..255), centred, offset by (dx, dy) and rotated by ``angle``."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (SIDE, SIDE), 0)
    ImageDraw.Draw(mask).text((SIDE / 2 + dx, SIDE / 2 + dy), char, font=_font(font_file, size), fill=255, anchor="mm")
    if angle:
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR)
    return mask


def _shape_key(char: str, font_file: str) -> bytes | None:
    """A coarse binary picture of the glyph (16x16), or None when it draws (almost) nothing."""
    mask = np.asarray(_mask(char, font_file, 24), dtype=np.float32) / 255.0
    if (mask > 0.5).sum() < 6:
        return None
    coarse = mask.reshape(SIDE // 2, 2, SIDE // 2, 2).mean(axis=(1, 3)) > 0.35
    return np.packbits(coarse).tobytes()


@functools.lru_cache(maxsize=1)
def candidates() -> tuple[Glyph, ...]:
    """Every character of the packaged fonts that draws a shape of its own, in code point order.

    Kept: named letters, digits, symbols and punctuation (no marks, spaces or controls) that draw some
    ink; of a group of characters with the same coarse picture, only the first (lowest code point).
    """
    covered: dict[int, list[str]] = {}
    for font_file in FONT_FILES:
        for code in _coverage(font_file):
            covered.setdefault(code, []).append(font_file)
    kept: list[Glyph] = []
    seen: set[bytes] = set()
    for code in sorted(covered):
        char = chr(code)
        if unicodedata.category(char)[0] not in "LNSP" or not unicodedata.name(char, ""):
            continue
        key = _shape_key(char, covered[code][0])
        if key is None or key in seen:
            continue
        seen.add(key)
        kept.append(Glyph(char, unicodedata.name(char).lower(), family_of(char), tuple(covered[code])))
    return tuple(kept)


@dataclass(frozen=True)
class Style:
    font: str
    size: int
    dx: float
    dy: float
    angle: float  # degrees, small: an arrow's direction is its class
    colour: str
    background: str
    domain: str
    seed: int  # for the background's and the domain's own noise


def draw_style(rng: np.random.Generator, glyph: Glyph, domains: tuple[str, ...]) -> Style:
    return Style(
        font=glyph.fonts[int(rng.integers(len(glyph.fonts)))],
        size=int(rng.integers(16, 27)),
        dx=float(rng.uniform(-3.5, 3.5)),
        dy=float(rng.uniform(-3.5, 3.5)),
        angle=float(rng.uniform(-12, 12)),
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        domain=domains[int(rng.integers(len(domains)))],
        seed=int(rng.integers(2**31)),
    )


def _luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _background(kind: str, ink: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """HxWx3 float background whose tones contrast with the ink (light behind dark ink, dark behind light)."""
    light = _luminance(ink) < 128
    lo, hi = (170, 255) if light else (0, 90)
    a, b = rng.uniform(lo, hi, 3), rng.uniform(lo, hi, 3)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    if kind == "plain":
        weight = np.zeros((SIDE, SIDE))
    elif kind == "striped":
        period = int(rng.integers(3, 7))
        weight = (((x + y) if rng.random() < 0.5 else x) // period % 2).astype(float)
    elif kind == "noisy":
        weight = rng.random((SIDE, SIDE))
    elif kind == "gradient":
        weight = (x if rng.random() < 0.5 else y) / (SIDE - 1)
    elif kind == "checkered":
        cell = int(rng.integers(3, 9))
        weight = ((x // cell + y // cell) % 2).astype(float)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return a * (1 - weight[..., None]) + b * weight[..., None]


def _alpha(mask, domain: str, rng: np.random.Generator) -> np.ndarray:
    """The ink's coverage (HxW, 0..1) for a domain that changes the shape's strokes."""
    from PIL import ImageChops, ImageFilter

    if domain == "outlined":
        mask = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(3)), mask)
    elif domain == "blurred":
        mask = mask.filter(ImageFilter.GaussianBlur(1.1))
    elif domain == "sketched":
        mask = mask.filter(ImageFilter.FIND_EDGES)
    alpha = np.asarray(mask, dtype=np.float64) / 255.0
    if domain == "faded":
        alpha = alpha * 0.45
    elif domain == "sketched":
        alpha = np.clip(alpha * 1.5, 0, 1) * (rng.random(alpha.shape) > 0.3)
    elif domain == "dotted":
        y, x = np.mgrid[0:SIDE, 0:SIDE]
        alpha = alpha * (((x % 2) == 0) & ((y % 2) == 0))
        alpha = np.clip(alpha * 1.6, 0, 1)
    return alpha


def render(glyph: Glyph, style: Style) -> np.ndarray:
    """The glyph in a style: a SIDE x SIDE x 3 uint8 array."""
    from PIL import Image

    rng = np.random.default_rng(style.seed)
    ink = np.array(COLOURS[style.colour], dtype=np.float64)
    background = _background(style.background, COLOURS[style.colour], rng)
    mask = _mask(glyph.char, style.font, style.size, style.dx, style.dy, style.angle)
    alpha = _alpha(mask, style.domain, rng)[..., None]
    if style.domain == "shadowed":
        shadow = np.roll(np.roll(alpha, 2, axis=0), 2, axis=1) * 0.7
        shade = np.full(3, 0.0 if _luminance(ink) >= 128 or style.background != "plain" else 90.0)
        background = background * (1 - shadow) + shade * shadow
    pixels = background * (1 - alpha) + ink * alpha
    if style.domain == "inverted":
        pixels = 255.0 - pixels
    elif style.domain == "grainy":
        pixels = pixels + rng.normal(0, 55, pixels.shape)
    pixels = np.clip(pixels, 0, 255).round().astype(np.uint8)
    if style.domain == "pixelated":
        small = Image.fromarray(pixels).resize((10, 10), Image.Resampling.BOX)
        pixels = np.asarray(small.resize((SIDE, SIDE), Image.Resampling.NEAREST))
    return pixels


def png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def caption(glyph: Glyph, style: Style, rng: np.random.Generator, attribute_rate: float = 0.25) -> str:
    """A pretraining caption: "a glyph of <name>", naming one attribute of the style in ``attribute_rate``
    of them. Rarely: when most captions name colours or backgrounds, a model learns to match those instead."""
    if rng.random() >= attribute_rate:
        return f"a glyph of {glyph.name}"
    which = int(rng.integers(3))
    if which == 0:
        return f"a {style.colour} glyph of {glyph.name}"
    if which == 1:
        return f"a {style.domain} glyph of {glyph.name}"
    return f"a glyph of {glyph.name} on a {style.background} background"


def fingerprint(glyphs: tuple[Glyph, ...]) -> str:
    """What the classes are, in short: changes when the fonts or the filtering change."""
    return hashlib.sha256("\n".join(f"{ord(g.char)}:{g.name}" for g in glyphs).encode()).hexdigest()[:16]
