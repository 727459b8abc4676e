"""DICOM dates moved by a whole number of days: the date shift of
de-identification and its inverse, with one set of rules.

De-identification moves every date of a patient by the same number of days
(the vault's ``date_shift_days``, negative: into the past), so intervals
between studies survive; re-identification moves them back. Both directions
and every place that moves a date (de-identification, re-identification,
prior search, the dates printed in a re-rendered PDF) use these functions:

* **DA** (``YYYYMMDD``; the legacy ``YYYY.MM.DD`` of ACR-NEMA is read too and
  written as ``YYYYMMDD``): the calendar date moves by ``days``.
* **DT** (``YYYYMMDD[HH[MM[SS[.F{1-6}]]]][&ZZXX]``): the date part moves by
  ``days``, the time part is kept as written, a UTC offset (``&ZZXX``) is
  dropped: it tells where the patient was scanned, and the shifted side never
  carries one.
* A **partial** date (``YYYY``, ``YYYYMM``, a DT with no full date) and
  anything that is not a date cannot be moved by days: the functions return
  ``None`` and the caller decides (de-identification removes the value,
  re-identification and the reports keep what they have).

Round trip: ``unshift_da(shift_da(v, d), d) == v`` for every full DA value
in ``YYYYMMDD`` form, and ``unshift_dt(shift_dt(v, d), d) == v`` for every DT
value without a UTC offset (with one, the result lacks the offset).
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["parse_da", "shift_da", "unshift_da", "shift_dt", "unshift_dt", "shift_value", "unshift_value"]

_DT = re.compile(r"(?P<date>\d{8})(?P<time>\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?(?P<offset>[+-]\d{4})?")


def _da_text(value: object) -> str | None:
    """``YYYYMMDD`` from a DA value (str, or a date when pydicom's datetime
    conversion is on); None when it is not a full date in either spelling."""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d")
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    text = str(value if value is not None else "").strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text.replace(".", "")
    return text if len(text) == 8 and text.isdigit() else None


def parse_da(value: object) -> dt.date | None:
    """The calendar date of a DA value (``YYYYMMDD`` or ``YYYY.MM.DD``); None
    when it is empty, partial or not a valid date."""
    text = _da_text(value)
    if text is None:
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def shift_da(value: object, days: int) -> str | None:
    """DA ``value`` moved by ``days`` (``YYYYMMDD``); None when it is not a
    full valid date or the result leaves years 1-9999."""
    date = parse_da(value)
    if date is None:
        return None
    try:
        moved = date + dt.timedelta(days=int(days))
    except OverflowError:
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


def unshift_da(value: object, days: int) -> str | None:
    """The inverse of :func:`shift_da` with the same ``days``."""
    return shift_da(value, -int(days))


def shift_dt(value: object, days: int) -> str | None:
    """DT ``value`` with its date part moved by ``days``, its time part kept
    and a UTC offset dropped; None without a full valid date."""
    if isinstance(value, dt.datetime):
        value = value.strftime("%Y%m%d%H%M%S.%f")
    match = _DT.fullmatch(str(value if value is not None else "").strip())
    if not match:
        return None
    date = shift_da(match.group("date"), days)
    return None if date is None else date + (match.group("time") or "")


def unshift_dt(value: object, days: int) -> str | None:
    """The inverse of :func:`shift_dt` with the same ``days``."""
    return shift_dt(value, -int(days))


def shift_value(value: object, vr: str, days: int) -> str | None:
    """:func:`shift_da` or :func:`shift_dt` by the value representation ``vr``
    ("DA" or "DT"; ValueError for another VR)."""
    if vr == "DA":
        return shift_da(value, days)
    if vr == "DT":
        return shift_dt(value, days)
    raise ValueError(f"only DA and DT values can be date-shifted, not {vr}")


def unshift_value(value: object, vr: str, days: int) -> str | None:
    """The inverse of :func:`shift_value` with the same ``days``."""
    return shift_value(value, vr, -int(days))
