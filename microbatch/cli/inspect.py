"""``microbatch inspect DIR``: what the newest valid checkpoint of a folder holds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import progress as _progress
from .codes import EXIT_ERROR, EXIT_OK, UsageError
from .load import load_target
from .logs import log
from .windows import windows_summary


def _aggregator_from(description: str) -> Any:
    """A built-in aggregator from its ``describe()`` text (``TopK(k=10)``), or None."""
    import ast

    from .. import aggregate

    try:
        call = ast.parse(description, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        return None
    cls = getattr(aggregate, call.func.id, None)
    if not (isinstance(cls, type) and issubclass(cls, aggregate.Aggregator)) or call.func.id == "Reduce":
        return None
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
        agg = cls(*args, **kwargs)
    except (ValueError, TypeError, SyntaxError):
        return None
    return agg if agg.describe() == description else None


def _command_inspect(args: argparse.Namespace) -> int:
    from ..checkpoints.targets import open_store

    path = Path(args.directory)
    if not path.exists():
        raise UsageError(f"{args.directory!r} does not exist (give the folder passed to --checkpoint)")
    pipeline = load_target(args.target) if args.target else None
    store = open_store(args.directory)
    try:
        cp = store.load()
    finally:
        store.close()
    if cp is None:
        log.error("no checkpoint in %s", args.directory)
        return EXIT_ERROR
    fingerprint = dict(cp.fingerprint)
    aggregator = (
        pipeline.aggregate if pipeline is not None else _aggregator_from(fingerprint.get("aggregate", ""))
    )
    created = getattr(cp, "created", None)
    info: dict[str, Any] = {
        "location": str(getattr(store, "location", args.directory)),
        "created": created,
        "finished": cp.finished,
        "batches": cp.batches,
        "records": cp.records,
        "position": cp.position,
        "dead_letters": cp.dead_letters,
        "fingerprint": fingerprint,
    }
    keyed = _keyed_files(args.directory, cp.state)
    if keyed is not None:
        return _inspect_keyed(args, info, keyed, cp.state, aggregator)
    if args.key is not None:
        raise UsageError("--key needs a checkpoint of keyed state (ByKey or TopK)")
    windows = windows_summary(cp.state, fingerprint.get("aggregate", ""))
    if windows is not None:
        info["windows"] = windows
    if aggregator is not None:
        try:
            info["value"] = aggregator.value(aggregator.load(cp.state))
        except Exception as exc:
            log.warning("cannot compute the value with %s: %s", aggregator.describe(), exc)
    if "value" not in info:
        info["state"] = cp.state
    if args.json:
        print(_progress.to_json(info), flush=True)
        return EXIT_OK
    print(_inspect_text(info), flush=True)
    return EXIT_OK


def _keyed_files(directory: str, state: Any) -> Any:
    """The shard files of a keyed checkpoint (its state a manifest), else None."""
    from ..checkpoints.shards import MANIFEST_FORMAT, ShardFiles
    from ..checkpoints.targets import is_sqlite_target

    if not (isinstance(state, dict) and state.get("format") == MANIFEST_FORMAT):
        return None
    folder = directory + ".keyed" if is_sqlite_target(directory) else str(Path(directory) / "keyed")
    return ShardFiles(folder)


def _parse_key(text: str) -> Any:
    """The key ``text`` reads as: a Python literal (``42``, ``('a', 1)``, ``'x'``), else the text."""
    import ast

    try:
        key = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return key if isinstance(key, (str, int, tuple)) and not isinstance(key, bool) else text


def _inspect_keyed(
    args: argparse.Namespace, info: dict[str, Any], files: Any, manifest: Any, aggregator: Any
) -> int:
    """A keyed checkpoint: keys per shard from the manifest, and either one key's value (``--key``,
    reading only that key's shard) or the largest values (``--top``, reading every shard)."""
    counts: list[int] = files.counts(manifest)
    info.update(shards=len(counts), keys=sum(counts), keys_per_shard=counts)
    inner = getattr(aggregator, "inner", None)
    found = True
    if args.key is not None:
        # 200 is the int key 200 when the state holds it, else the str key "200".
        for key in dict.fromkeys([_parse_key(args.key), args.key]):
            found, state = files.lookup(manifest, key)
            if found:
                break
        if found and inner is not None:
            state = inner.value(inner.load(state))
        info.update(key=key, found=found, value=state)
    elif args.top:
        info["top"] = _largest(files, manifest, inner, args.top)
    if args.json:
        print(_progress.to_json(info), flush=True)
        return EXIT_OK if found else EXIT_ERROR
    lines = _inspect_text({name: v for name, v in info.items() if name != "value"}).splitlines()
    low, high = (min(counts), max(counts)) if counts else (0, 0)
    lines.append(f"{'keys':<14}{info['keys']:,} in {len(counts)} shards ({low:,}-{high:,} a shard)")
    if args.key is not None:
        lines.append(f"{'key':<14}{info['key']!r}: " + (repr(info["value"]) if found else "not found"))
    elif "top" in info:
        lines.append(f"top {len(info['top'])}" if info["top"] else "top           (values not comparable)")
        lines.extend(f"  {value!r:>12}  {key!r}" for key, value in info["top"])
    print("\n".join(lines), flush=True)
    return EXIT_OK if found else EXIT_ERROR


def _largest(files: Any, manifest: Any, inner: Any, n: int) -> list[tuple[Any, Any]]:
    """The ``n`` keys of largest value in the shard files (values as ``inner`` gives them, or as
    saved without it); empty when the values are not numbers."""
    import heapq
    import numbers

    from .._core.keys import key_bytes, key_from_json

    latest: dict[bytes, tuple[Any, Any]] = {}
    for doc in files.read(manifest):  # each shard's base, then its deltas: a later state wins
        for key_data, state in zip(doc["keys"], doc["states"], strict=True):
            key = key_from_json(key_data)
            latest[key_bytes(key)] = (key, state)
    pairs = [(key, inner.value(inner.load(state)) if inner is not None else state)
             for key, state in latest.values()]
    if not all(isinstance(value, numbers.Real) for _, value in pairs):
        return []
    return heapq.nlargest(n, pairs, key=lambda pair: pair[1])


def _format_time(created: Any) -> str:
    import datetime

    if isinstance(created, (int, float)):
        when = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc).astimezone()
        return when.isoformat(timespec="seconds")
    return str(created)


def _inspect_text(info: dict[str, Any]) -> str:
    position = info["position"]
    fp = info["fingerprint"]
    rows: list[tuple[str, str]] = [
        ("checkpoint", str(info["location"])),
        ("written", _format_time(info["created"])),
        ("finished", "yes" if info["finished"] else "no (a rerun of the same command resumes here)"),
        ("batches", f"{info['batches']:,}"),
        ("records", f"{info['records']:,}"),
        ("position", f"{position:,}" if isinstance(position, int) else str(position)),
        ("dead letters", f"{info['dead_letters']:,}"),
    ]
    rows.extend((key, str(fp[key])) for key in ("fn", "aggregate", "source") if key in fp)
    windows = info.get("windows")
    if windows is not None:
        rows.append(("watermark", str(windows["watermark"])))
        rows.append(("windows", f"{len(windows['open_windows'])} open, {windows['emitted']:,} emitted, "
                                f"{windows['late_records']:,} late records"))
        rows.extend(("", span) for span in windows["open_windows"][:20])
    lines = [f"{label:<14}{text}" for label, text in rows]
    if "value" in info:
        rendered = _progress.format_value(info["value"], human=True)  # people read it; --json: programs
        lines.append("value" + ("\n" + _indent(rendered) if "\n" in rendered else f"{'':<9}{rendered}"))
    elif "state" in info:
        state = _progress.to_json(info["state"])
        lines.append(f"{'state':<14}{state[:500]}  (pass --target to compute the value)")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
