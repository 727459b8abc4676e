"""Where the test suite finds its real data: one place for the path.

The real MRI cases (TCGA-DU-7294 with five reference segmentations,
BraTS-GLI-00001-000, and the 12 BraTS 2018 cases of ``brats18/``, each
NIfTI volumes in LPS/RAS world coordinates as distributed) live in the
``shared/data`` folder next to the repository (``../shared/data``; see its
README). Every test and test helper takes the paths from here; a test whose
data is missing is skipped with :func:`missing_message` (the pytest header
says where the suite looked).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pytest is imported when a test asks; bench/ scripts import the paths too
    import pytest

REPO = Path(__file__).resolve().parents[1]
#: The shared data folder: ../shared/data, else shared/data inside the repository.
DATA = next((p for p in (REPO.parent / "shared" / "data", REPO / "shared" / "data") if p.is_dir()),
            REPO.parent / "shared" / "data").resolve()
TCGA = DATA / "tcga-du-7294"             # TCGA-LGG case: t1, t1c, t2, flair + segmentations/
BRATS = DATA / "brats-gli-00001-000"     # BraTS 2023 glioma case (t1n, t1c, t2w, t2f names)
BRATS18 = DATA / "brats18"               # 12 BraTS 2018 cases with expert labels


def missing_message(path: Path | str) -> str:
    """Why a test is skipped: the missing path and where the data comes from."""
    return (f"shared data missing: {path} does not exist (the real MRI cases are expected in {DATA}, "
            "the shared/data folder next to the repository; see its README)")


def needs_data(*paths: Path | str) -> pytest.MarkDecorator:
    """A ``skipif`` marker for tests that read ``paths`` (default: the TCGA case)."""
    import pytest

    missing = [p for p in (paths or (TCGA,)) if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing), reason=missing_message(missing[0]) if missing else "")


def require(path: Path | str) -> Path:
    """``path``, or skip the running test (or fixture) naming it."""
    import pytest

    if not Path(path).exists():
        pytest.skip(missing_message(path))
    return Path(path)
