"""Class names that a reader can see whole and tell apart.

A class name travels into prompts, reports, the registry and the serving output. A name holding a character
that shows as nothing (a zero-width space, a byte-order mark), that reorders the text around it (a bidi
override), that breaks the line, or that is written in a decomposed form, looks like another name, or like
none; and two names equal after Unicode compatibility normalisation and case folding ("cat" and full-width
"ｃａｔ", "fish" and "ﬁsh") are the same name to a reader. Both are refused with one line that shows the name
with its hidden characters escaped (``'cat\\u200b'``).
"""

from __future__ import annotations

import unicodedata

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt): characters that render as nothing. Most are
# format characters (category Cf), refused as such; the others are letters, marks or symbols that show no glyph
# (the Hangul fillers, variation selectors, the combining grapheme joiner).
_IGNORABLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# Explicit directional formatting: embeddings and overrides, isolates, and the marks.
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_LINE_BREAKS = {"\n", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"}


def _ignorable(ch: str) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in _IGNORABLE)


def _hidden(ch: str) -> str | None:
    """What kind of character a reader cannot see as itself, or None for a visible one."""
    if ord(ch) in _BIDI:
        return "a bidirectional-text control character"
    if ch in _LINE_BREAKS:
        return "a line break"
    category = unicodedata.category(ch)
    if category == "Cc":
        return "a control character"
    if category == "Cs":
        return "a lone surrogate (not a character)"
    if category == "Cf" or _ignorable(ch):
        return "an invisible character"
    return None


def shown(name: str) -> str:
    """``name`` quoted, every character a reader could not see written as an escape: ``'cat\\u200b'``. In a name
    that is not in NFC form the combining marks are escaped too, so that ``'cafe\\u0301'`` shows how it differs."""
    decomposed = not unicodedata.is_normalized("NFC", name)
    out = []
    for ch in name:
        if ch in "\\'":
            out.append("\\" + ch)
        elif not ch.isprintable() or _hidden(ch) or (decomposed and unicodedata.combining(ch)):
            out.append(ascii(ch)[1:-1])  # \n, \x85, \u200b, \U000e0041
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class name as written (one line), or None."""
    for ch in name:
        kind = _hidden(ch)
        if kind:
            what = unicodedata.name(ch, "")
            return (
                f"class name {shown(name)} contains {kind} (U+{ord(ch):04X}{' ' + what if what else ''}); "
                "class names must be visible text on one line"
            )
    if not unicodedata.is_normalized("NFC", name):
        return (
            f"class name {shown(name)} is not in Unicode NFC form (it is written decomposed); "
            f"write it composed, as {unicodedata.normalize('NFC', name)!r}"
        )
    return None


def confusable_key(name: str) -> str:
    """What two class names may not share: the name after NFKC normalisation, case folding and removal of the
    characters :func:`name_problem` refuses, with whitespace and underscores collapsed as in class identity."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if not _hidden(ch))
    text = unicodedata.normalize("NFKC", text.casefold())  # case folding can undo NFKC ("ǰ"): normalise again
    return " ".join(text.replace("_", " ").split())


SAME_NAME = "the same name after NFKC normalisation, case folding and removing invisible characters"
