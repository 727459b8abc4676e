"""pipelines/dicom_dates.py: the date shift of de-identification and its
inverse, one set of rules for DA, DT and partial dates, and the round trip."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from brainline.pipelines.dicom_dates import (
    parse_da,
    shift_da,
    shift_dt,
    shift_value,
    unshift_da,
    unshift_dt,
    unshift_value,
)


def test_da_moves_by_calendar_days():
    assert shift_da("20240115", -91) == "20231016"
    assert shift_da("20240301", -1) == "20240229"          # leap year
    assert shift_da("20231231", 1) == "20240101"
    assert shift_da("20240115", 0) == "20240115"
    assert shift_da(" 20240115 ", 3) == "20240118"          # DA padding
    assert shift_da("2024.01.15", 3) == "20240118"          # legacy ACR-NEMA spelling, written as DA
    assert shift_da(dt.date(2024, 1, 15), -15) == "20231231"


@pytest.mark.parametrize("value", ["", None, "2024", "202401", "2024011", "20240230", "2024-01-15", "abcdefgh",
                                   "20240115120000"])
def test_partial_or_invalid_da_cannot_be_shifted(value):
    assert shift_da(value, 10) is None
    assert unshift_da(value, 10) is None
    assert parse_da(value) is None


def test_da_out_of_range_years_is_none():
    assert shift_da("99991231", 1) is None
    assert shift_da("00010101", -1) is None


def test_dt_keeps_the_time_and_drops_the_offset():
    assert shift_dt("20240115123045.123456", -15) == "20231231123045.123456"
    assert shift_dt("20240115", 1) == "20240116"
    assert shift_dt("2024011512", 1) == "2024011612"
    assert shift_dt("20240115123045+0100", 1) == "20240116123045"
    assert shift_dt(dt.datetime(2024, 1, 15, 12, 30, 45, 7), 1) == "20240116123045.000007"


@pytest.mark.parametrize("value", ["2024", "202401", "2024011", "20240230101010", "20240115 1230", "x", ""])
def test_partial_or_invalid_dt_cannot_be_shifted(value):
    assert shift_dt(value, 5) is None


def test_round_trip_da_and_dt():
    rng = random.Random(20240115)
    for _ in range(2000):
        date = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(0, 200 * 365))
        days = rng.randrange(-36500, 36501)
        da = date.strftime("%Y%m%d")
        shifted = shift_da(da, days)
        if shifted is None:          # left years 1-9999
            continue
        assert shifted != da or days == 0
        assert unshift_da(shifted, days) == da
        time = rng.choice(["", "12", "1230", "123045", "123045.5", "123045.123456"])
        assert unshift_dt(shift_dt(da + time, days), days) == da + time


def test_interval_between_two_dates_survives_the_shift():
    a, b = "20230601", "20240115"
    sa, sb = shift_da(a, -1234), shift_da(b, -1234)
    assert (parse_da(sb) - parse_da(sa)).days == (parse_da(b) - parse_da(a)).days


def test_shift_value_by_vr():
    assert shift_value("20240115", "DA", 1) == "20240116"
    assert shift_value("20240115101010", "DT", 1) == "20240116101010"
    assert unshift_value(shift_value("20240115101010", "DT", 40), "DT", 40) == "20240115101010"
    with pytest.raises(ValueError, match="only DA and DT"):
        shift_value("101010", "TM", 1)
