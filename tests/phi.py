"""PHI scanning helpers: look for the test patient's identity in files."""

from __future__ import annotations

from pathlib import Path

# Long enough not to occur by chance in binary pixel data.
BINARY_SAFE = [b"DOE^JANE", b"PID-4711-XYZ", b"ACC-98765", b"19640229", b"St Elsewhere",
               b"HOUSE^GREGORY"]
# For text files (logs, JSON) also the name parts alone.
TEXT_EXTRA = [b"JANE", b"Jane", b"GREGORY"]


def scan(paths, needles=BINARY_SAFE) -> list[str]:
    """Return 'file: needle' for every needle found in the given files/folders."""
    hits = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            data = f.read_bytes()
            for needle in needles:
                if needle in data:
                    hits.append(f"{f}: {needle.decode()}")
    return hits
