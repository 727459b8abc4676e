"""PHI scanning helpers: look for the test patient's identity in files and bytes.

``scan`` looks for exact byte strings (the default needles are long enough
not to occur by chance in binary pixel data).  ``spellings`` / ``find_phi``
also look for the other ways a value can be written into a DICOM file or an
embedded document: UTF-8 / Latin-1, UTF-16 little and big endian (DICOM
private OB payloads, PDF text strings), hexadecimal (PDF ``<FEFF...>`` hex
strings), in any letter case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

# Long enough not to occur by chance in binary pixel data.
BINARY_SAFE = [b"DOE^JANE", b"PID-4711-XYZ", b"ACC-98765", b"19640229", b"St Elsewhere",
               b"HOUSE^GREGORY"]
# For text files (logs, JSON) also the name parts alone.
TEXT_EXTRA = [b"JANE", b"Jane", b"GREGORY"]

ENCODINGS = ("utf-8", "latin-1", "utf-16-le", "utf-16-be")


def spellings(value: str | bytes) -> list[bytes]:
    """Lower-case byte spellings of ``value`` to search lower-cased data for.

    Every encoding of ``ENCODINGS`` the value can be written in, and the
    hexadecimal form of the UTF-8 and UTF-16BE encodings (as in PDF hex
    strings).  Values shorter than 4 characters give nothing (they would
    match by chance).
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) < 4:
        return []
    found: dict[bytes, None] = {}
    for encoding in ENCODINGS:
        try:
            found[text.lower().encode(encoding)] = None
        except UnicodeEncodeError:
            continue
    for encoding in ("utf-8", "utf-16-be"):
        found[text.encode(encoding).hex().encode()] = None  # hex digits: lower case already
    return list(found)


def find_phi(data: bytes, values: Iterable[str | bytes] | Mapping[str, str | bytes]) -> list[str]:
    """Labels (or values) of ``values`` found in ``data`` in any spelling, any case."""
    items = values.items() if isinstance(values, Mapping) else ((v, v) for v in values)
    lowered = data.lower()
    hits = []
    for label, value in items:
        if any(spelling in lowered for spelling in spellings(value)):
            hits.append(label if isinstance(label, str) else label.decode("latin-1"))
    return hits


def scan(paths, needles=BINARY_SAFE, variants: bool = False) -> list[str]:
    """Return 'file: needle' for every needle found in the given files/folders.

    With ``variants`` each needle is also looked for in the spellings of
    :func:`spellings` (UTF-16, hexadecimal, any case).
    """
    hits = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            data = f.read_bytes()
            for needle in needles:
                if needle in data or (variants and find_phi(data, [needle])):
                    hits.append(f"{f}: {needle.decode()}")
    return hits
