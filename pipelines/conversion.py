"""Conversion: one DICOM series -> one compressed NIfTI plus a BIDS JSON sidecar.

Runs Chris Rorden's ``dcm2niix`` (the PyPI ``dcm2niix`` package installs it
next to the Python interpreter) on exactly the files of one series:

    dcm2niix -z y -b y -ba y -f <name> -o <tmp out> <tmp folder of symlinks>

and moves the result to ``out_dir/<name>.nii.gz`` and ``out_dir/<name>.json``.
The stage is idempotent: a stamp file ``out_dir/<name>.conversion.json``
records a hash of the input file list (paths, sizes, modification times) and
the options, and a re-run with the same inputs returns the existing result
without running dcm2niix again.

No network, no database. Sizes in mm, timeouts in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib

__all__ = ["ConversionError", "UnequalSpacingError", "ConversionResult", "convert_series",
           "find_dcm2niix"]

log = logging.getLogger(__name__)

#: dcm2niix options (besides -f and -o); part of the stamp, so changing them reconverts.
DCM2NIIX_OPTIONS: tuple[str, ...] = ("-z", "y", "-b", "y", "-ba", "y")
STAMP_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NIFTI_SUFFIX = ".nii.gz"


class ConversionError(RuntimeError):
    """dcm2niix failed or produced nothing; the message names the series."""


class UnequalSpacingError(ConversionError):
    """dcm2niix found unequally spaced slices and interpolated them (an ``_Eq``
    output): slices are missing or irregular, so the volume would be partly
    invented. No output is kept."""


@dataclass
class ConversionResult:
    """Output of one conversion. ``voxel_size_mm`` is the NIfTI pixdim (mm)."""

    name: str
    nifti: Path
    sidecar: Path
    shape: tuple[int, ...]
    voxel_size_mm: tuple[float, ...]
    n_inputs: int
    input_hash: str
    extra_files: list[Path] = field(default_factory=list)
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary for the job store."""
        return {
            "name": self.name,
            "nifti": str(self.nifti),
            "sidecar": str(self.sidecar),
            "shape": list(self.shape),
            "voxel_size_mm": list(self.voxel_size_mm),
            "n_inputs": self.n_inputs,
            "input_hash": self.input_hash,
            "extra_files": [str(p) for p in self.extra_files],
            "reused": self.reused,
        }


def find_dcm2niix() -> Path:
    """Path of the dcm2niix executable: next to sys.executable first, then on PATH."""
    beside = Path(sys.executable).parent / "dcm2niix"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("dcm2niix")
    if found:
        return Path(found)
    raise ConversionError(
        f"dcm2niix is not installed: not found next to {sys.executable} nor on PATH "
        "(install the 'dcm2niix' Python package or the dcm2niix binary)")


def convert_series(files: Sequence[Path], out_dir: Path, name: str, *,
                   timeout_s: float = 600) -> ConversionResult:
    """Convert the DICOM ``files`` of one series to ``out_dir/<name>.nii.gz`` + ``.json``.

    ``name`` is a plain file stem (letters, digits, ``._-``). If dcm2niix
    writes several volumes, the main one is chosen by :func:`_choose_main`
    and the others are kept in ``out_dir`` and listed in ``extra_files``.
    Skips the work when the stamp shows the same inputs were converted
    before. Raises :class:`ConversionError` on failure or after ``timeout_s``
    seconds.
    """
    _check_name(name)
    inputs = _check_inputs(files, name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    input_hash = _input_hash(inputs)
    previous = _reuse(out_dir, name, input_hash)
    if previous is not None:
        log.info("conversion of %s: inputs unchanged, reusing %s", name, previous.nifti)
        return previous
    _remove_previous_outputs(out_dir, name)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        _link_inputs(inputs, src)
        dst.mkdir()
        _run_dcm2niix(src, dst, name, timeout_s)
        _refuse_interpolated(sorted(dst.glob(f"*{_NIFTI_SUFFIX}")), name)
        main, extras = _choose_main(sorted(dst.glob(f"*{_NIFTI_SUFFIX}")), name)
        nifti, sidecar, extra_files = _move_outputs(main, extras, out_dir, name)
    result = _result_from_files(name, nifti, sidecar, extra_files, len(inputs), input_hash)
    _write_stamp(out_dir, name, result)
    log.info("converted %s: %d files -> %s %s", name, len(inputs), result.shape, nifti)
    return result


# --- inputs and stamp ---------------------------------------------------------


def _check_name(name: str) -> None:
    """The output stem must be a safe file name (dcm2niix treats '%' as a macro)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConversionError(
            f"invalid output name {name!r}: use letters, digits, '.', '_' or '-' only")


def _check_inputs(files: Sequence[Path], name: str) -> list[Path]:
    """Absolute, de-duplicated, sorted input paths; all must exist."""
    if not files:
        raise ConversionError(f"cannot convert series '{name}': no DICOM files given")
    inputs = sorted({Path(f).absolute() for f in files})
    missing = [p for p in inputs if not p.is_file()]
    if missing:
        raise ConversionError(
            f"cannot convert series '{name}': {len(missing)} input file(s) missing, "
            f"e.g. {missing[0]}")
    return inputs


def _input_hash(inputs: Sequence[Path]) -> str:
    """SHA-256 over the options and each input's path, size (bytes) and mtime (ns)."""
    digest = hashlib.sha256()
    digest.update(" ".join(DCM2NIIX_OPTIONS).encode())
    for path in inputs:
        st = path.stat()
        digest.update(f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _stamp_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.conversion.json"


def _reuse(out_dir: Path, name: str, input_hash: str) -> ConversionResult | None:
    """The previous result if its stamp matches ``input_hash`` and its files exist."""
    stamp_file = _stamp_path(out_dir, name)
    nifti, sidecar = out_dir / f"{name}{_NIFTI_SUFFIX}", out_dir / f"{name}.json"
    if not (stamp_file.is_file() and nifti.is_file() and sidecar.is_file()):
        return None
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("version") != STAMP_VERSION or stamp.get("input_hash") != input_hash:
        return None
    extras = [out_dir / n for n in stamp.get("extra_files", [])]
    result = _result_from_files(name, nifti, sidecar, [p for p in extras if p.exists()],
                                int(stamp.get("n_inputs", 0)), input_hash)
    result.reused = True
    return result


def _write_stamp(out_dir: Path, name: str, result: ConversionResult) -> None:
    """Atomically record what was converted (written last: its presence means done)."""
    stamp = {
        "version": STAMP_VERSION,
        "input_hash": result.input_hash,
        "n_inputs": result.n_inputs,
        "options": list(DCM2NIIX_OPTIONS),
        "nifti": result.nifti.name,
        "sidecar": result.sidecar.name,
        "extra_files": [p.name for p in result.extra_files],
        "shape": list(result.shape),
        "voxel_size_mm": list(result.voxel_size_mm),
    }
    tmp = _stamp_path(out_dir, name).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, _stamp_path(out_dir, name))


def _remove_previous_outputs(out_dir: Path, name: str) -> None:
    """Delete the stamp and outputs of an earlier conversion of ``name``."""
    stamp_file = _stamp_path(out_dir, name)
    old: list[str] = [f"{name}{_NIFTI_SUFFIX}", f"{name}.json"]
    try:
        old += json.loads(stamp_file.read_text()).get("extra_files", [])
    except (OSError, ValueError):
        pass
    stamp_file.unlink(missing_ok=True)
    for file_name in old:
        path = out_dir / file_name
        if path.parent == out_dir:
            path.unlink(missing_ok=True)
            if path.name.endswith(_NIFTI_SUFFIX):
                _sidecar_of(path).unlink(missing_ok=True)


def _link_inputs(inputs: Sequence[Path], folder: Path) -> None:
    """Symlink every input into ``folder`` under unique numbered names."""
    folder.mkdir()
    for index, path in enumerate(inputs):
        os.symlink(path.resolve(), folder / f"{index:06d}_{path.name}")


# --- running dcm2niix -----------------------------------------------------------


def _run_dcm2niix(src: Path, dst: Path, name: str, timeout_s: float) -> None:
    """Run dcm2niix; raise ConversionError on timeout or non-zero exit."""
    cmd = [str(find_dcm2niix()), *DCM2NIIX_OPTIONS, "-f", name, "-o", str(dst), str(src)]
    env = dict(os.environ, HOME=str(dst.parent))  # ignore any ~/.dcm2nii.ini defaults
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise ConversionError(
            f"dcm2niix timed out after {timeout_s:g} s converting series '{name}'"
            f"{_tail(stderr, stdout)}") from None
    log.debug("dcm2niix %s stdout:\n%s", name, stdout)
    if proc.returncode != 0:
        raise ConversionError(
            f"dcm2niix failed (exit code {proc.returncode}) converting series '{name}'"
            f"{_tail(stderr, stdout)}")
    if not any(dst.glob(f"*{_NIFTI_SUFFIX}")):
        raise ConversionError(
            f"dcm2niix produced no NIfTI for series '{name}'{_tail(stderr, stdout)}")


def _refuse_interpolated(niftis: list[Path], name: str) -> None:
    """Raise UnequalSpacingError when dcm2niix wrote an equalized (``_Eq``) volume:
    it does so only when the slices of the series are unequally spaced, i.e.
    slices are missing or the acquisition is irregular."""
    eq = [p.name for p in niftis if re.search(r"_Eq(_\d+)?\.nii\.gz$", p.name)]
    if eq:
        raise UnequalSpacingError(
            f"series '{name}' has unequally spaced slices (slices missing or irregular): dcm2niix "
            f"would interpolate them ({', '.join(eq)}), so the series is not used")


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill dcm2niix and its children (the PyPI launcher runs the binary as a child)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _tail(stderr: str, stdout: str, n_lines: int = 5) -> str:
    """': <last lines of stderr>' (stdout when stderr is empty; dcm2niix logs there)."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    if not lines:
        lines = [ln.strip() for ln in (stdout or "").splitlines() if ln.strip()]
    return (": " + " | ".join(lines[-n_lines:])) if lines else ""


# --- outputs --------------------------------------------------------------------

#: Suffix patterns after ``<name>``, best first. Geometry-corrected volumes
#: (_Eq: equalized slice spacing -- refused before this ranking by
#: _refuse_interpolated --, _Tilt: gantry tilt) beat the raw one; split
#: single images (_i00001), ROIs, phase/real/imaginary parts come last.
_SUFFIX_RANKS: tuple[tuple[str, int], ...] = (
    (r"_(Eq|Tilt)(_\d+)?", 0),
    (r"", 1),
    (r"_e1", 2),
    (r"_e\d+", 3),
    (r"_(t|c)\d+.*", 4),
)
_WORST_RANK = 9


def _suffix_rank(path: Path, name: str) -> int:
    """Rank of a dcm2niix output by its suffix after ``name`` (lower is better)."""
    stem = path.name[: -len(_NIFTI_SUFFIX)]
    if not stem.startswith(name):
        return _WORST_RANK
    suffix = stem[len(name):]
    for pattern, rank in _SUFFIX_RANKS:
        if re.fullmatch(pattern, suffix):
            return rank
    return _WORST_RANK - 1


def _n_voxels(path: Path) -> int:
    """Voxel count from the NIfTI header (pixel data not read)."""
    shape = nib.load(path).shape
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _choose_main(niftis: list[Path], name: str) -> tuple[Path, list[Path]]:
    """Pick the main volume deterministically: suffix rank, then most voxels, then name."""
    if not niftis:
        raise ConversionError(f"dcm2niix produced no NIfTI for series '{name}'")
    ranked = sorted(niftis, key=lambda p: (_suffix_rank(p, name), -_n_voxels(p), p.name))
    if len(ranked) > 1:
        log.warning("dcm2niix wrote %d volumes for %s; using %s, also kept: %s", len(ranked),
                    name, ranked[0].name, ", ".join(p.name for p in ranked[1:]))
    return ranked[0], ranked[1:]


def _sidecar_of(nifti: Path) -> Path:
    return nifti.with_name(nifti.name[: -len(_NIFTI_SUFFIX)] + ".json")


def _main_sidecar(main: Path, name: str) -> Path:
    """JSON sidecar of the main volume (a corrected _Eq/_Tilt volume may only
    have the sidecar of the raw volume ``<name>.json``)."""
    for candidate in (_sidecar_of(main), main.with_name(f"{name}.json")):
        if candidate.is_file():
            return candidate
    raise ConversionError(f"dcm2niix wrote no JSON sidecar for series '{name}' ({main.name})")


def _move_outputs(main: Path, extras: list[Path], out_dir: Path,
                  name: str) -> tuple[Path, Path, list[Path]]:
    """Move the main volume to ``<name>.nii.gz``/``.json`` and extras under their own names.

    An extra whose name would collide with the main output is kept as
    ``<name>_extra_<its name>``.
    """
    main_sidecar = _main_sidecar(main, name)
    nifti, sidecar = out_dir / f"{name}{_NIFTI_SUFFIX}", out_dir / f"{name}.json"
    extra_files = []
    for path in extras:
        for part in (path, _sidecar_of(path)):
            if not part.is_file() or part == main_sidecar:
                continue
            target = out_dir / part.name
            if target in (nifti, sidecar):
                target = out_dir / f"{name}_extra_{part.name}"
            os.replace(part, target)
            extra_files.append(target)
    os.replace(main_sidecar, sidecar)
    os.replace(main, nifti)
    return nifti, sidecar, extra_files


def _result_from_files(name: str, nifti: Path, sidecar: Path, extra_files: list[Path],
                       n_inputs: int, input_hash: str) -> ConversionResult:
    """Read shape and voxel size (mm) from the NIfTI header."""
    header = nib.load(nifti).header
    shape = tuple(int(v) for v in header.get_data_shape())
    zooms = tuple(round(float(v), 6) for v in header.get_zooms()[: min(3, len(shape))])
    return ConversionResult(name=name, nifti=nifti, sidecar=sidecar, shape=shape,
                            voxel_size_mm=zooms, n_inputs=n_inputs, input_hash=input_hash,
                            extra_files=sorted(extra_files))
