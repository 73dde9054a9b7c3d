"""``microbatch inspect DIR``: what the newest valid checkpoint of a folder holds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import progress as _progress
from .codes import EXIT_ERROR, EXIT_OK, UsageError
from .load import load_target
from .logs import log


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
    value: Any = None
    has_value = False
    keyed = _keyed_files(args.directory, cp.state)
    if keyed is not None:
        return _inspect_keyed(args, keyed, cp.state, aggregator)
    if args.key is not None:
        raise UsageError("--key needs a checkpoint of keyed state (ByKey or TopK)")
    if aggregator is not None:
        try:
            value = aggregator.value(aggregator.load(cp.state))
            has_value = True
        except Exception as exc:
            log.warning("cannot compute the value with %s: %s", aggregator.describe(), exc)
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
    if has_value:
        info["value"] = value
    else:
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


def _inspect_keyed(args: argparse.Namespace, files: Any, manifest: Any, aggregator: Any) -> int:
    """Keys per shard from the manifest alone; with ``--key``, one key's value from its shard."""
    counts: list[int] = files.counts(manifest)
    info: dict[str, Any] = {"shards": len(counts), "keys": sum(counts), "keys_per_shard": counts}
    if args.key is not None:
        # 200 is the int key 200 when the state holds it, else the str key "200".
        for key in dict.fromkeys([_parse_key(args.key), args.key]):
            found, state = files.lookup(manifest, key)
            if found:
                break
        inner = getattr(aggregator, "inner", None)
        if found and inner is not None:
            state = inner.value(inner.load(state))
        info.update(key=key, found=found, value=state)
    if args.json:
        print(_progress.to_json(info), flush=True)
    else:
        lines = [f"{'shards':<14}{info['shards']}", f"{'keys':<14}{info['keys']:,}"]
        lines += [f"  shard {n:<6}{c:,} keys" for n, c in enumerate(counts)]
        if args.key is not None:
            lines.append(f"{'key':<14}{info['key']!r}: " + (repr(info["value"]) if found else "not found"))
        print("\n".join(lines), flush=True)
    return EXIT_OK if args.key is None or info["found"] else EXIT_ERROR


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
    lines = [f"{label:<14}{text}" for label, text in rows]
    if "value" in info:
        rendered = _progress.format_value(info["value"], human=True)  # people read it; --json: programs
        lines.append("value" + ("\n" + _indent(rendered) if "\n" in rendered else f"{'':<9}{rendered}"))
    else:
        state = _progress.to_json(info["state"])
        lines.append(f"{'state':<14}{state[:500]}  (pass --target to compute the value)")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
