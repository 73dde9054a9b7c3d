"""Loading a ``TARGET``: ``path/to/file.py:NAME`` or ``package.module:NAME``, NAME a ``Pipeline``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .codes import UsageError

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def _split_target(spec: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(
            f"TARGET must be path/to/file.py:NAME or package.module:NAME, got {spec!r} "
            "(e.g. jobs.py:pipeline)"
        )
    return where, name


def _looks_like_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _load_file(where: str) -> ModuleType:
    path = Path(where)
    if not path.is_file():
        raise UsageError(
            f"job file {where!r} does not exist" if not path.exists() else f"{where!r} is not a file"
        )
    path = path.resolve()
    # Like ``python file.py``: the file's folder comes first on sys.path, for its sibling modules.
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # The file's own name when free, so that ``jobs.py:p`` and ``jobs:p`` share checkpoints.
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else "microbatch_job"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load {where!r} as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    # Worker processes receive the job's functions by value: they need not import the file.
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    return module


def _load_module(where: str) -> ModuleType:
    if not all(part.isidentifier() for part in where.split(".")):
        raise UsageError(
            f"{where!r} is neither a job file (path/to/file.py) nor a module name (package.module)"
        )
    # Like ``python -m``: modules in the current directory import.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        # Only a missing target is a usage error; a missing import inside the module is its own failure.
        if exc.name is not None and (where == exc.name or where.startswith(exc.name + ".")):
            raise UsageError(
                f"no module named {exc.name!r} (for {where!r}; set PYTHONPATH or run from the project folder)"
            ) from None
        raise


def _kind(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if isinstance(obj, ModuleType):
        return f"the module {obj.__name__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the function {obj.__qualname__}()"
    return f"a {type(obj).__qualname__} ({obj!r:.60})"


def load_target(spec: str) -> Pipeline[Any, Any]:
    """The ``Pipeline`` that ``spec`` (``path/to/file.py:NAME`` or ``package.module:NAME``) names.

    A job file is executed as a module with its folder first on ``sys.path`` and registered with
    ``cloudpickle.register_pickle_by_value``, so worker processes get its functions without importing
    it. A module name is imported with the current directory on ``sys.path``. Raises
    :class:`UsageError` when the file or module does not exist, the attribute is missing (listing the
    pipelines the module does define) or is not a ``Pipeline`` (saying what it is). Exceptions raised
    by the job's own code while it is imported propagate unchanged.
    """
    from ..pipeline import Pipeline

    where, name = _split_target(spec)
    module = _load_file(where) if _looks_like_path(where) else _load_module(where)
    obj: Any = module
    _missing = object()
    for i, part in enumerate(name.split(".")):
        obj = getattr(obj, part, _missing)
        if obj is _missing:
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
            hint = f"pipelines there: {', '.join(found)}" if found else "it defines no Pipeline"
            owner = where if i == 0 else f"{where}:{'.'.join(name.split('.')[:i])}"
            raise UsageError(f"{owner} has no attribute {part!r} ({hint})") from None
    if not isinstance(obj, Pipeline):
        raise UsageError(f"{spec} is {_kind(obj)}, not a microbatch.Pipeline")
    return obj
