"""No NumPy view of a temporary SimpleITK image anywhere in the sources.

``sitk.GetArrayViewFromImage`` returns a view of the image's pixel buffer that
holds no reference to the image: once the image object is gone the view reads
freed memory, which the next image allocated may reuse. Taken of a temporary
(``GetArrayViewFromImage(f(x))``) the image dies when the call returns. That is
how tests/test_corpus.py's slab-profile test once read the point-sampled image's
pixels in CI (std 28.98, the point sample's exact figure) and passed locally.
Use ``GetArrayFromImage`` (a copy) or keep the image in a variable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("pipelines", "models", "service", "tests", "bench", "scripts", "config")


def views_of_temporaries(source: str) -> list[int]:
    """Line numbers where ``GetArrayViewFromImage`` is called on a call's result."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "GetArrayViewFromImage" and isinstance(node.args[0], ast.Call):
            lines.append(node.lineno)
    return lines


def test_the_check_finds_a_view_of_a_temporary():
    assert views_of_temporaries("a = sitk.GetArrayViewFromImage(sitk.ReadImage(p))\n") == [1]
    assert views_of_temporaries("img = sitk.ReadImage(p)\na = sitk.GetArrayViewFromImage(img)\n") == []
    assert views_of_temporaries("a = GetArrayViewFromImage(make())\n") == [1]


def test_a_kept_image_or_a_copy_holds_its_own_pixels():
    """The two safe forms: a view of an image kept alive, a copy of a temporary one."""
    def image(value: float) -> sitk.Image:
        return sitk.GetImageFromArray(np.full((40, 40, 40), value, np.float32))

    kept = image(1.0)
    view = sitk.GetArrayViewFromImage(kept)
    image(2.0)
    assert float(view.mean()) == 1.0  # the image is alive: the view is its pixels
    copy = sitk.GetArrayFromImage(image(3.0))
    image(4.0)
    assert float(copy.mean()) == 3.0


def test_no_view_of_a_temporary_image_in_the_sources():
    found = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{line}" for line in views_of_temporaries(path.read_text())]
    assert not found, f"GetArrayViewFromImage of a temporary image (use GetArrayFromImage): {found}"
