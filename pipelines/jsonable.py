"""One rule for turning stage results into JSON values (the ``<stage>.json``
files of a workspace and the job store's stage results).

:func:`jsonable` converts, recursively:

* dict keys to ``str``; tuples, lists and numpy arrays to lists;
* numpy scalars to Python ``bool``/``int``/``float`` (``np.bool_`` stays a bool);
* non-finite floats (NaN, +-Infinity) to ``None``: strict JSON has no spelling
  for them (``json.dumps`` would write ``NaN``/``Infinity``, which
  JavaScript's ``JSON.parse`` and PostgreSQL's ``json`` type reject), and a
  reader treats ``null`` as "not measured";
* ``pathlib.Path`` to ``str``.

Everything else (str, int, bool, None, finite floats) passes unchanged.
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (see the module doc); a new object, ``obj`` is not changed."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, PurePath):
        return str(obj)
    return obj
