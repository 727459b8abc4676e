"""pipelines/jsonable.py: the one JSON rule of the stage results (registration
and skull stripping once had two, with different infinity handling)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brainline.pipelines.jsonable import jsonable
from brainline.pipelines.registration import RegistrationResult
from brainline.pipelines.skull_strip import SkullStripResult


def test_numpy_values_become_python_values():
    out = jsonable({1: np.float32(0.5), "n": np.int64(7), "b": np.bool_(True), "a": np.arange(3),
                    "t": (np.float64(1.25), [np.uint8(2)]), "p": Path("/x/y.nii.gz")})
    assert out == {"1": 0.5, "n": 7, "b": True, "a": [0, 1, 2], "t": [1.25, [2]], "p": "/x/y.nii.gz"}
    assert type(out["n"]) is int and type(out["b"]) is bool and type(out["1"]) is float
    assert [type(v) for v in out["a"]] == [int, int, int]


def test_non_finite_numbers_become_null_and_the_result_is_strict_json():
    values = {"inf": float("inf"), "ninf": -np.inf, "nan": np.float32("nan"), "ok": 2.5,
              "nested": [{"x": math.inf}], "array": np.array([1.0, np.nan])}
    out = jsonable(values)
    assert out == {"inf": None, "ninf": None, "nan": None, "ok": 2.5, "nested": [{"x": None}], "array": [1.0, None]}
    json.dumps(out, allow_nan=False)          # raises on NaN/Infinity


def test_bools_stay_bools_and_strings_pass():
    assert jsonable([True, False, np.bool_(False), "inf", None, 3]) == [True, False, False, "inf", None, 3]
    assert jsonable(True) is True


def test_input_is_not_changed():
    data = {"a": [np.float64(np.inf)]}
    jsonable(data)
    assert math.isinf(data["a"][0])


def test_registration_and_skull_strip_write_infinity_the_same_way():
    reg = RegistrationResult(transform=sitk.Euler3DTransform(), transform_type="rigid", final_metric=float("nan"),
                             iterations=3, stop_reason="test", converged=True, parameters={"t": np.zeros(3)},
                             quality={"nmi": np.float32(np.inf), "dice": np.float64(0.9)})
    mask = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    strip = SkullStripResult(mask=mask, backend="test", backend_version="1", already_stripped=True,
                             brain_volume_ml=1234.5, elapsed_s=0.1,
                             evidence={"rim_to_core": float("inf"), "n": np.int32(4), "ok": np.bool_(True)})
    r, s = reg.to_dict(), strip.to_dict()
    assert r["final_metric"] is None and r["quality"] == {"nmi": None, "dice": 0.9}
    assert r["parameters"]["t"] == [0.0] * 3
    assert s["evidence"] == {"rim_to_core": None, "n": 4, "ok": True}
    json.dumps(r, allow_nan=False)
    json.dumps(s, allow_nan=False)
