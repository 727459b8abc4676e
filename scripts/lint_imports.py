#!/usr/bin/env python3
"""Check the architecture contracts of pyproject.toml (``[tool.importlinter]``)
with import-linter.

Why not ``lint-imports`` on its own: the package ``brainline`` is assembled
by setuptools' ``package-dir`` from sibling folders (``service/`` ->
``brainline.service``, ``pipelines/`` -> ``brainline.pipelines``, ...), and
import-linter (grimp) finds a package's modules by walking its folder, where
an editable install has only ``brainline/__init__.py``. So this script lays
the sources out as they are installed, in a temporary folder (``*.py`` files
only, mapping read from ``[tool.setuptools] package-dir``), and runs
``lint-imports`` there.

Usage: ``python scripts/lint_imports.py`` (exit status 0 when every contract
is kept; import-linter's report on stdout). To see a contract fail,
``--add-import brainline.service.compute.stages=brainline.service.gateway.vault``
adds ``import brainline.service.gateway.vault`` to the copied module (the
sources are not touched); tests/test_architecture.py does this for each
contract.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """Top-level mapped packages: dotted name -> source folder."""
    config = tomllib.loads(pyproject.read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: (pyproject.parent / folder).resolve() for name, folder in mapping.items()}


def lay_out(pyproject: Path, dest: Path) -> None:
    """Copy every ``*.py`` of the mapped packages into ``dest`` as installed
    (``dest/brainline/service/...``)."""
    for name, folder in sorted(package_dirs(pyproject).items()):
        target = dest.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for src in folder.rglob("*.py"):
            rel = src.relative_to(folder)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)


def add_import(dest: Path, spec: str) -> None:
    """``module=imported``: append ``import imported`` to ``module`` in the copy."""
    module, _, imported = spec.partition("=")
    if not imported:
        raise SystemExit(f"--add-import wants MODULE=IMPORTED, got {spec!r}")
    path = dest.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.is_file():
        raise SystemExit(f"--add-import: no module {module} in the package")
    with path.open("a") as fh:
        fh.write(f"\nimport {imported}  # added by scripts/lint_imports.py --add-import\n")


def lint(pyproject: Path = REPO / "pyproject.toml", add: list[str] = (), extra_args: list[str] = ()) -> int:
    """Lay out the package, run ``lint-imports``; its exit status."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        raise SystemExit("lint-imports not found: install the test extra (pip install -e '.[test]')")
    with tempfile.TemporaryDirectory(prefix="brainline-lint-imports-") as tmp:
        dest = Path(tmp)
        lay_out(pyproject, dest)
        for spec in add:
            add_import(dest, spec)
        shutil.copyfile(pyproject, dest / "pyproject.toml")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        # lint-imports reads ./pyproject.toml and puts its working directory first
        # on sys.path: run it in the copy, so that the repository's own
        # brainline/ folder (only __init__.py) is not the package it analyses.
        return subprocess.run([exe, "--no-cache", *extra_args], cwd=tmp, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "pyproject.toml",
                        help="pyproject.toml with the contracts")
    parser.add_argument("--add-import", action="append", default=[], metavar="MODULE=IMPORTED",
                        help="add 'import IMPORTED' to MODULE in the copy (to see a contract fail)")
    parser.add_argument("--contract", action="append", default=[], help="check only this contract id")
    args = parser.parse_args(argv)
    extra = [a for c in args.contract for a in ("--contract", c)]
    return lint(args.config.resolve(), args.add_import, extra)


if __name__ == "__main__":
    sys.exit(main())
