"""The character set the result objects declare.

Every result object copies the source images' Specific Character Set with
their patient and study text. Scanners write values highdicom refuses although
the standard allows them (PS3.3 C.12.1.1.2): Japanese studies declare
``\\ISO 2022 IR 87`` (an empty first value stands for ISO 2022 IR 6), Korean
ones ``\\ISO 2022 IR 149`` (missing from highdicom's table), Chinese ones
``\\ISO 2022 IR 58``; others misspell a term. Building the SEG of such a study
failed ("'' is not a valid SpecificCharacterSetValues"), so no result reached
the PACS.

:func:`declare_usable_character_set` decodes a source dataset's text with
what it declares (pydicom does, including its corrections of misspelled
terms) and then declares an equivalent set highdicom accepts: the empty first
value spelled ``ISO 2022 IR 6``, a lone code-extension term as its plain
single-byte term, the default repertoire as no attribute, and Unicode
(``ISO_IR 192``, which encodes every decoded character) for anything else. The
decoded text is unchanged, so the re-identified results name the patient
exactly as the scanner did.
"""

from __future__ import annotations

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

try:  # highdicom's own check is what decides; without it only the rules below apply
    from highdicom.valuerep import _check_specific_character_set
except ImportError:  # pragma: no cover - depends on the highdicom release
    _check_specific_character_set = None

__all__ = ["UNICODE", "usable_character_set", "declare_usable_character_set"]

UNICODE = "ISO_IR 192"
_DEFAULT = ("", "ISO_IR 6", "ISO 2022 IR 6")


def _terms(value) -> list[str]:
    if value is None:
        return []
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip() for v in values]


def usable_character_set(value) -> str | list[str] | None:
    """The Specific Character Set (one term, several, or None for the default
    repertoire) that means what ``value`` means and that highdicom accepts;
    :data:`UNICODE` when no such spelling exists."""
    terms = _terms(value)
    if len(terms) > 1 and terms[0] == "":
        terms[0] = "ISO 2022 IR 6"
    if len(terms) == 1:
        (term,) = terms
        if term in _DEFAULT:
            return None
        plain = term.replace("ISO 2022 IR ", "ISO_IR ")
        if term.startswith("ISO 2022 IR ") and plain in python_encoding:
            terms = [plain]
    if not terms or all(t in _DEFAULT for t in terms):
        return None
    if not all(t in python_encoding for t in terms):
        return UNICODE
    candidate: str | list[str] = terms[0] if len(terms) == 1 else terms
    if _check_specific_character_set is not None:
        try:
            _check_specific_character_set(candidate)
        except (ValueError, TypeError):
            return UNICODE
    return candidate


def declare_usable_character_set(ds: Dataset) -> None:
    """Give ``ds`` (in memory) a Specific Character Set the result builders
    accept, after decoding its text with the one it declared (module
    docstring). A dataset whose declaration is already usable is left as it is."""
    if "SpecificCharacterSet" not in ds:
        return
    declared = ds.SpecificCharacterSet
    usable = usable_character_set(declared)
    if _terms(usable) == _terms(declared):
        return
    ds.decode()
    if usable is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = usable
