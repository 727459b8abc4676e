"""One plugin mechanism for BrainLine: a small registry of named factories.

Each plugin type has one :class:`Registry`, kept in the module of that type:

* segmentation backends: ``SEGMENTATION_BACKENDS`` in ``models/base.py``
  (decorator ``@segmentation_backend(name, *aliases)``);
* skull-strip backends: ``SKULL_STRIP_BACKENDS`` in ``pipelines/skull_strip.py``
  (``@skull_strip_backend(name, *aliases)``);
* result destinations: ``DESTINATIONS`` in ``service/gateway/destinations.py``
  (``@destination(kind)``).

A plugin is registered in one of three ways:

1. ``@registry.register("name", "alias", ..., **info)`` on a class or
   function; ``info`` is free metadata that the loader of that type reads;
2. ``registry.register_module("name", "package.module", "alias", ...)``: the
   module is imported on first use and registers "name" with the decorator
   (so heavy frameworks are not imported before a plugin is asked for);
3. a Python entry point in the registry's group, e.g. in a site package's
   ``pyproject.toml``::

       [project.entry-points."brainline.segmentation_backends"]
       my_net = "my_site.my_net:MyNetBackend"

   Entry points are looked up only for a name that is not known otherwise
   (built-in names always win), and loaded on first use. An entry point may
   name the factory itself or a module whose decorator registers the name.

This module imports nothing from BrainLine, so every layer may use it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger("brainline.plugins")

T = TypeVar("T")


def default_key(name: object) -> str:
    """Registry key of a name: stripped and lower-case."""
    return str(name).strip().lower()


@dataclass
class _Entry:
    name: str
    obj: Any = None                       # the factory, once known
    module: str | None = None             # module that registers it (lazy)
    entry_point: Any = None               # importlib.metadata.EntryPoint (lazy)
    info: dict = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.obj is not None


class Registry(Generic[T]):
    """Name -> factory, with aliases, lazy modules and entry points.

    ``what`` names the plugin type in messages ("segmentation backend");
    ``error`` is the exception class raised for an unknown name;
    ``entry_point_group`` is the ``importlib.metadata`` group searched for
    third-party plugins; ``key`` normalises names (default: strip, lower).
    """

    def __init__(self, what: str, *, error: type[Exception] = LookupError,
                 entry_point_group: str | None = None,
                 key: Callable[[object], str] = default_key):
        self.what = what
        self.error = error
        self.entry_point_group = entry_point_group
        self.key = key
        self._entries: dict[str, _Entry] = {}   # canonical key -> entry, registration order
        self._aliases: dict[str, str] = {}      # any key (name or alias) -> canonical key
        self._lock = threading.RLock()

    # -- registering -------------------------------------------------------
    def _add(self, name: str, aliases: tuple[str, ...]) -> _Entry:
        k = self.key(name)
        if not k:
            raise ValueError(f"a {self.what} needs a non-empty name")
        for a in (k, *(self.key(x) for x in aliases)):
            other = self._aliases.get(a)
            if other is not None and other != k:
                raise ValueError(f"{self.what} name {a!r} is already used by {other!r}")
        entry = self._entries.get(k) or _Entry(name=k)
        self._entries[k] = entry
        for a in (k, *(self.key(x) for x in aliases)):
            self._aliases[a] = k
        return entry

    def register(self, name: str, *aliases: str, replace: bool = False, **info) -> Callable[[T], T]:
        """Decorator: register the decorated factory (usually a class) under
        ``name`` and ``aliases``, with metadata ``info``. Registering another
        factory under a taken name is an error unless ``replace``."""

        def decorate(obj: T) -> T:
            with self._lock:
                entry = self._add(name, aliases)
                if replace:
                    entry.info.clear()
                elif (entry.obj is not None and entry.obj is not obj
                        and not _same_definition(entry.obj, obj)):
                    raise ValueError(f"{self.what} {entry.name!r} is already registered "
                                     f"({_where(entry.obj)}); cannot register {_where(obj)} too")
                entry.obj = obj
                entry.info.update(info)
            return obj

        return decorate

    def register_module(self, name: str, module: str, *aliases: str, **info) -> None:
        """Declare that importing ``module`` registers ``name`` (imported on
        first use of the name, not now)."""
        with self._lock:
            entry = self._add(name, aliases)
            entry.module = module
            entry.info.update(info)

    def unregister(self, name: str) -> None:
        """Forget ``name`` and its aliases (an entry point is found again on
        the next lookup of its name while its package is installed)."""
        with self._lock:
            k = self._aliases.get(self.key(name))
            if k is not None:
                del self._entries[k]
                for a in [a for a, target in self._aliases.items() if target == k]:
                    del self._aliases[a]

    # -- looking up --------------------------------------------------------
    def _discover(self) -> None:
        """Add the entry points of our group whose names are not known yet."""
        if not self.entry_point_group:
            return
        try:
            eps = importlib.metadata.entry_points(group=self.entry_point_group)
        except Exception as exc:  # broken metadata of some unrelated package
            log.warning("cannot read %s entry points: %s", self.entry_point_group, exc)
            return
        with self._lock:
            for ep in eps:
                k = self.key(ep.name)
                if k and k not in self._aliases:
                    self._entries[k] = _Entry(name=k, entry_point=ep)
                    self._aliases[k] = k

    def canonical(self, name: object) -> str | None:
        """The registered name for ``name`` or one of its aliases, else None."""
        k = self.key(name if name is not None else "")
        if k not in self._aliases:
            self._discover()
        return self._aliases.get(k)

    def __contains__(self, name: object) -> bool:
        return self.canonical(name) is not None

    def names(self) -> tuple[str, ...]:
        """Every registered name (not aliases), built-ins first, then entry points."""
        self._discover()
        return tuple(self._entries)

    def info(self, name: object) -> dict:
        """The metadata registered with ``name`` (loads the plugin)."""
        return dict(self._entry(name).info)

    def get(self, name: object) -> T:
        """The factory registered as ``name`` (imported now if lazy). Unknown
        names raise ``self.error`` listing the known names; a plugin that
        cannot be imported raises its ImportError."""
        return self._entry(name).obj

    def _entry(self, name: object) -> _Entry:
        k = self.canonical(name)
        if k is None:
            raise self.error(f"unknown {self.what} {str(name).strip()!r}; "
                             f"known: {', '.join(self.names()) or 'none'}")
        entry = self._entries[k]
        if not entry.loaded:
            self._load(entry)
        return entry

    def _load(self, entry: _Entry) -> None:
        with self._lock:
            if entry.loaded:
                return
            if entry.module is not None:
                importlib.import_module(entry.module)
                if not entry.loaded:
                    raise self.error(f"{self.what} {entry.name!r}: module {entry.module} was imported "
                                     f"but did not register it")
                return
            ep = entry.entry_point
            try:
                obj = ep.load()
            except ImportError:
                raise
            except Exception as exc:
                raise self.error(f"{self.what} {entry.name!r} from entry point {ep.value!r} "
                                 f"cannot be loaded: {exc}") from exc
            if isinstance(obj, types.ModuleType):
                if not entry.loaded:
                    raise self.error(f"{self.what} {entry.name!r}: entry point module {ep.value} "
                                     f"does not register it")
                return
            if not entry.loaded:  # the module's decorator may have registered it already
                entry.obj = obj


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _same_definition(a: object, b: object) -> bool:
    """True for the same class/function defined again (a reloaded module)."""
    return _where(a) == _where(b) and not _where(a).endswith("<lambda>")
