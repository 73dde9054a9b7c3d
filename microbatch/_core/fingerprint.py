"""Fingerprints that see the code: what a checkpoint must match to be resumed, and what changed.

A pipeline's fingerprint is a mapping of str to str stored in every checkpoint:

- ``fn``: the function's ``module.qualname`` (as before);
- ``fn_code``: a SHA-256 of the function's code (see :func:`code_digest`);
- ``aggregate``: the aggregator's ``describe()`` (as before), e.g. ``TopK(k=10)``;
- ``aggregate_code``: a SHA-256 of the code of a user-defined aggregator (its class's methods) and of
  the functions it holds (``Reduce``'s function); microbatch's own aggregators are described by
  ``aggregate`` alone;
- ``source``: the source's description (the file's absolute path, ``tcp``...);
- ``python``: the ``major.minor`` version of Python, because bytecode differs between versions.

The digest of a function hashes its bytecode, its constants (recursively into nested code objects:
lambdas, comprehensions, inner functions), the names it uses, its defaults and closure, and the code
of the functions and classes it names that are defined in its own module (transitively, each once),
and of simple constants of that module it names (``LIMIT = 10``). Line numbers, file names and
comments are left out, so moving a function or editing a comment changes nothing. Everything hashed
is stable across processes and runs: no ``id()``, no addresses, no salted ``hash()`` (frozensets are
hashed in sorted order). Code in other modules (a library, a helper module beside the job) is named
by ``module.qualname`` only: a change there is not seen.

Comparing fingerprints (:func:`changes`) treats a key missing on either side as unknown, not as a
change, so checkpoints written before a key existed stay resumable.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import CheckpointMismatch
from .params import callable_name

__all__ = ["aggregate_digest", "changes", "check_fingerprint", "code_digest", "pipeline_fingerprint"]

logger = logging.getLogger("microbatch.checkpoint")

#: The most objects (functions, classes, code objects) one digest visits; a job module is far smaller.
MAX_OBJECTS = 10_000

_SCALARS = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))
_PLAIN = (*_SCALARS, tuple, frozenset)  # values hashed by value when code names them


# Class attributes that say nothing about behaviour, or change when the class moves in its file.
_CLASS_BOOKKEEPING = frozenset(
    {"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__firstlineno__",
     "__static_attributes__"}
)


class _Hasher:
    """Feeds a SHA-256 with a canonical description of code, visiting each object once."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.visited: dict[int, int] = {}  # id -> visit number: a guard for this digest only, never hashed
        self.keep: list[object] = []  # keeps visited objects alive so that their ids stay unique

    def put(self, *parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
            self.h.update(len(data).to_bytes(8, "little"))
            self.h.update(data)

    def first_visit(self, obj: object) -> bool:
        key = id(obj)
        if key in self.visited:
            self.put("ref", self.visited[key])  # the visit number is stable: visits happen in order
            return False
        if len(self.visited) >= MAX_OBJECTS:
            self.put("too-many")
            return False
        self.visited[key] = len(self.visited)
        self.keep.append(obj)
        return True

    # -- values ------------------------------------------------------------------------------------

    def constant(self, value: object, module: str | None) -> None:
        if isinstance(value, _SCALARS):
            self.put(type(value).__name__, repr(value))
        elif isinstance(value, types.CodeType):
            self.code(value, None, module)
        elif isinstance(value, (tuple, list)):
            self.put(type(value).__name__, len(value))
            for item in value:
                self.constant(item, module)
        elif isinstance(value, (frozenset, set)):
            # Iteration order of a set of str depends on the process's hash seed: hash each item
            # on its own and feed the sorted digests.
            digests = sorted(_digest_of(functools.partial(_Hasher.constant, value=item, module=module))
                             for item in value)
            self.put(type(value).__name__, *digests)
        elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
            self.put("dict", len(value))
            for k in sorted(value):
                self.put(k)
                self.constant(value[k], module)
        else:
            self.obj(value, module)

    def obj(self, value: object, module: str | None) -> None:
        """A value a function refers to: code of its own module is hashed, anything else named."""
        if isinstance(value, functools.partial):
            self.put("partial")
            self.obj(value.func, module)
            self.constant(value.args, module)
            self.constant(value.keywords, module)
        elif isinstance(value, (staticmethod, classmethod)):
            self.obj(value.__func__, module)
        elif isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                self.obj(accessor, module)
        elif isinstance(value, types.FunctionType):
            if module is None or value.__module__ == module:
                self.function(value)
            else:
                self.put("function", f"{value.__module__}.{value.__qualname__}")
        elif isinstance(value, type):
            if value.__module__ == module:
                self.cls(value)
            else:
                self.put("class", f"{value.__module__}.{value.__qualname__}")
        elif isinstance(value, types.ModuleType):
            self.put("module", value.__name__)
        elif isinstance(value, _PLAIN):
            self.constant(value, module)
        else:
            # An instance (or a builtin): its type names it; no repr, which may hold an address.
            kind = type(value)
            self.put("instance", f"{kind.__module__}.{kind.__qualname__}")

    # -- code --------------------------------------------------------------------------------------

    def function(self, fn: types.FunctionType) -> None:
        if not self.first_visit(fn):
            return
        self.put("function", fn.__qualname__)
        self.code(fn.__code__, fn.__globals__, fn.__module__)
        self.constant(fn.__defaults__, fn.__module__)
        self.constant(fn.__kwdefaults__, fn.__module__)
        for cell in fn.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                self.put("empty-cell")
                continue
            # A decorator's wrapper holds the decorated function in its closure: hash it whatever
            # module the decorator came from.
            inner = content.__module__ if isinstance(content, types.FunctionType) else fn.__module__
            self.obj(content, inner)
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            self.obj(wrapped, getattr(wrapped, "__module__", None))

    def code(self, code: types.CodeType, globals_: Mapping[str, Any] | None, module: str | None) -> None:
        if not self.first_visit(code):
            return
        self.put(
            "code", code.co_code, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
            code.co_flags, *code.co_names, "|", *code.co_varnames, "|", *code.co_freevars, "|",
            *code.co_cellvars,
        )
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const, globals_, module)
            else:
                self.constant(const, module)
        if globals_ is None:
            return
        # The module-level names this code uses: functions and classes of the same module are
        # hashed (transitively); simple constants by value; anything else by its name.
        for name in code.co_names:
            if name in globals_:
                value = globals_[name]
                if isinstance(value, (types.FunctionType, type, functools.partial)) or isinstance(
                    value, _PLAIN
                ):
                    self.put("global", name)
                    self.obj(value, module)

    def cls(self, cls: type) -> None:
        if not self.first_visit(cls):
            return
        self.put("class", cls.__qualname__)
        for base in cls.__bases__:
            self.obj(base, cls.__module__)
        for name in sorted(vars(cls)):
            if name in _CLASS_BOOKKEEPING:
                continue
            value = vars(cls)[name]
            self.put("attr", name)
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property, type)):
                self.obj(value, cls.__module__)
            elif isinstance(value, _PLAIN):
                self.constant(value, cls.__module__)


def _digest_of(feed: Callable[[_Hasher], None]) -> str:
    hasher = _Hasher()
    feed(hasher)
    return hasher.h.hexdigest()


def _unwrap(fn: object) -> object:
    """The user's callable behind microbatch's own wrappers (``BatchTask`` and the like)."""
    for _ in range(16):
        inner = getattr(fn, "fn", None)
        ours = type(fn).__module__.startswith("microbatch.")
        if callable(inner) and not hasattr(fn, "__qualname__") and ours:
            fn = inner
        else:
            break
    return fn


def code_digest(fn: object) -> str:
    """A SHA-256 (hex) of the code behind ``fn``: a function, a ``functools.partial``, a callable
    instance, or one of microbatch's wrappers around one of these.

    It changes when the body, a constant, a default, or a function or class of the same module that
    the code names changes; it does not change when the function moves or a comment is edited. A
    partial's arguments count by value when they are plain data, by type otherwise. For a callable
    instance, and for a bound method, the code of its class is hashed (not its attributes). A
    builtin is named only.
    """
    target = _unwrap(fn)

    def feed(h: _Hasher) -> None:
        if isinstance(target, types.MethodType):  # a bound method: its function and its class
            owner = type(target.__self__) if not isinstance(target.__self__, type) else target.__self__
            h.put("method")
            h.obj(target.__func__, target.__func__.__module__)
            h.obj(owner, owner.__module__)
        elif isinstance(target, (types.FunctionType, functools.partial, type)):
            h.obj(target, getattr(target, "__module__", None) if not isinstance(target, functools.partial)
                  else getattr(target.func, "__module__", None))
        elif callable(target) and type(target).__module__ not in ("builtins",) \
                and not isinstance(target, types.BuiltinFunctionType):
            h.put("callable-instance")
            h.obj(type(target), type(target).__module__)
        else:
            h.put("builtin", callable_name(target))

    return _digest_of(feed)


def _is_microbatch(cls: type) -> bool:
    return cls.__module__ == "microbatch" or cls.__module__.startswith("microbatch.")


def aggregate_digest(aggregate: object) -> str:
    """A SHA-256 (hex) of an aggregator's code: the methods of its classes that are not microbatch's
    own (a user's subclass, not ``Sum``), and the functions and nested aggregators its public
    attributes hold (``Reduce``'s function, ``ByKey``'s inner aggregator). Its settings are in
    ``describe()``, which the fingerprint keeps under ``aggregate``."""

    def feed(h: _Hasher, agg: object = aggregate, depth: int = 0) -> None:
        kind = type(agg)
        for cls in kind.__mro__:
            if cls is object or _is_microbatch(cls) or cls.__module__ in ("abc", "typing", "builtins"):
                continue
            h.obj(cls, cls.__module__)
        for name, value in sorted(vars(agg).items()) if hasattr(agg, "__dict__") else ():
            if name.startswith("_"):
                continue
            if isinstance(value, (types.FunctionType, functools.partial)):
                h.put("attr", name, code_digest(value))
            elif callable(getattr(value, "describe", None)) and callable(getattr(value, "fold", None)) \
                    and depth < 8:
                h.put("aggregate", name)
                feed(h, value, depth + 1)

    return _digest_of(feed)


def pipeline_fingerprint(fn: object, aggregate: object, source: str) -> dict[str, str]:
    """The fingerprint a pipeline stores in its checkpoints (keys: see the module's docstring).

    ``aggregate`` is an object with ``describe()``; ``source`` the source's description.
    """
    describe = getattr(aggregate, "describe", None)
    return {
        "fn": callable_name(_unwrap(fn)),
        "fn_code": code_digest(fn),
        "aggregate": describe() if callable(describe) else callable_name(aggregate),
        "aggregate_code": aggregate_digest(aggregate),
        "source": source,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def changes(saved: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """What differs between a saved and a current fingerprint, one phrase per change, in a fixed order.

    A key missing on either side is unknown and not reported. A code digest is not compared when
    the Python version changed (bytecode differs between versions); the change of version is
    reported instead.
    """
    def differs(key: str) -> bool:
        return key in saved and key in current and saved[key] != current[key]

    found: list[str] = []
    python_changed = differs("python")
    if differs("fn"):
        found.append(f"fn changed: {saved['fn']} -> {current['fn']}")
    elif differs("fn_code") and not python_changed:
        found.append(f"fn's code changed ({current.get('fn', 'fn')})")
    if differs("aggregate"):
        found.append(f"the aggregator changed: {saved['aggregate']} -> {current['aggregate']}")
    elif differs("aggregate_code") and not python_changed:
        found.append(f"the aggregator's code changed ({current.get('aggregate', 'aggregate')})")
    if differs("source"):
        found.append(f"the input changed: {saved['source']} -> {current['source']}")
    if python_changed:
        found.append(
            f"Python changed: {saved['python']} -> {current['python']} (the code cannot be compared "
            f"across versions)"
        )
    known = {"fn", "fn_code", "aggregate", "aggregate_code", "source", "python"}
    others = sorted(saved.keys() - known)
    found.extend(f"{key} changed: {saved[key]} -> {current[key]}" for key in others if differs(key))
    return found


def check_fingerprint(
    saved: Mapping[str, str], current: Mapping[str, str], *, location: str, accept_changes: bool = False
) -> list[str]:
    """Raise ``CheckpointMismatch`` naming every change (see :func:`changes`) and the two ways on.

    With ``accept_changes=True`` the changes are logged as a warning and returned instead: the user
    knows the new code is compatible with the saved state, and the next checkpoint records the new
    fingerprint.
    """
    found = changes(saved, current)
    if not found:
        return []
    what = "; ".join(found)
    if accept_changes:
        logger.warning("resuming from the checkpoint in %s although %s (changes accepted)", location, what)
        return found
    raise CheckpointMismatch(
        f"the checkpoint in {location} was written by a different pipeline: {what}. Resuming would fold "
        f"the results of two different computations. Either start over: fresh=True on Pipeline.run "
        f"(--fresh on the command line) discards the checkpoint; or, if the change cannot alter the "
        f"result, accept it: accept_changes=True on Pipeline.run (--accept-changes)"
    )
