"""tests/shared_data.py: one place for the shared data path, and a clear skip
message naming the missing path when the data is not there."""

from __future__ import annotations

import pytest

from tests import conftest, corpus, segmentation_cases, shared_data


def test_every_helper_uses_the_one_path():
    assert conftest.DATA == corpus.DEFAULT_DATA == segmentation_cases.DATA == shared_data.DATA
    assert shared_data.TCGA.parent == shared_data.BRATS18.parent == shared_data.DATA
    assert shared_data.DATA.is_absolute() and shared_data.DATA.name == "data"


def test_missing_data_is_skipped_with_its_path(tmp_path):
    missing = tmp_path / "no-such-case"
    marker = shared_data.needs_data(tmp_path, missing)
    assert marker.args == (True,) and str(missing) in marker.kwargs["reason"]
    assert "shared data missing" in marker.kwargs["reason"]
    assert shared_data.needs_data(tmp_path).args == (False,)
    with pytest.raises(pytest.skip.Exception, match="no-such-case does not exist"):
        shared_data.require(missing)
    assert shared_data.require(tmp_path) == tmp_path
