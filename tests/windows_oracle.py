"""A plain-Python model of time windows, written apart from microbatch's, for tests to compare with.

Records are ``(t, key, v)``; ``batches`` lists them cut into batches in arrival order. The model
follows the documented rules: a batch is judged against the watermark (largest timestamp folded
minus grace) as it stood before the batch; a window closes when the watermark reaches its end;
every open window closes at the end; sessions judge the records of one batch that are less than
``gap`` apart (per key) together. Values are sums of ``v`` (counts use v = 1).
"""

from __future__ import annotations

from typing import Any

Record = tuple[int, Any, int]


def _close_by_time(windows: dict[tuple[int, Any], int], size: int, mark: float) -> list[tuple[Any, ...]]:
    done = sorted((s, s + size, k) for (s, k) in windows if s + size <= mark)
    out = [(s, e, k, windows.pop((s, k))) for s, e, k in done]
    return sorted(out, key=lambda w: (w[1], w[0], w[2]))


def oracle(
    batches: list[list[Record]], *, size: int | None = None, slide: int | None = None,
    gap: int | None = None, grace: int = 0,
) -> tuple[list[tuple[Any, ...]], int]:
    """The windows emitted, ``(start, end, key, value)`` in emission order, and the late records."""
    top: int | None = None
    late = 0
    out: list[tuple[Any, ...]] = []
    windows: dict[tuple[int, Any], int] = {}
    sessions: dict[Any, list[list[int]]] = {}  # key -> [[start, last, value]]
    for batch in batches:
        mark = None if top is None else top - grace
        if gap is None:
            assert size is not None
            step = slide or size
            for t, key, v in batch:
                for start in range(t - t % step - (size // step) * step, t + 1, step):
                    if not start <= t < start + size:
                        continue
                    if mark is not None and start + size <= mark:
                        late += 1
                        continue
                    windows[(start, key)] = windows.get((start, key), 0) + v
        else:
            by_key: dict[Any, list[tuple[int, int]]] = {}
            for t, key, v in batch:
                by_key.setdefault(key, []).append((t, v))
            for key, items in by_key.items():
                items.sort(key=lambda p: p[0])
                runs: list[list[int]] = []
                for t, v in items:
                    if runs and t - runs[-1][1] < gap:
                        runs[-1][1] = t
                        runs[-1][2] += v
                        runs[-1][3] += 1
                    else:
                        runs.append([t, t, v, 1])
                for first, last, v, n in runs:
                    if mark is not None and last + gap <= mark:
                        late += n
                        continue
                    merged = [first, last, v]
                    keep = []
                    for s in sessions.get(key, []):
                        if s[0] < merged[1] + gap and merged[0] < s[1] + gap:
                            merged = [min(s[0], merged[0]), max(s[1], merged[1]), s[2] + merged[2]]
                        else:
                            keep.append(s)
                    # a merged session may now reach sessions it did not overlap before
                    changed = True
                    while changed:
                        changed = False
                        for s in list(keep):
                            if s[0] < merged[1] + gap and merged[0] < s[1] + gap:
                                merged = [min(s[0], merged[0]), max(s[1], merged[1]), s[2] + merged[2]]
                                keep.remove(s)
                                changed = True
                    sessions[key] = [*keep, merged]
        tops = [t for t, _, _ in batch]
        if tops:
            top = max(tops) if top is None else max(top, *tops)
        mark = None if top is None else top - grace
        if mark is not None:
            out += _close(windows, sessions, size, gap, mark)
    out += _close(windows, sessions, size, gap, float("inf"))
    return out, late


def _close(windows: dict[tuple[int, Any], int], sessions: dict[Any, list[list[int]]], size: int | None,
           gap: int | None, mark: float) -> list[tuple[Any, ...]]:
    if gap is None:
        assert size is not None
        return _close_by_time(windows, size, mark)
    done = []
    for key, ss in sessions.items():
        for s in list(ss):
            if s[1] + gap <= mark:
                ss.remove(s)
                done.append((s[0], s[1] + gap, key, s[2]))
    return sorted(done, key=lambda w: (w[1], w[0], w[2]))


def same_windows(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
    """Equal windows in the same close order; the keys of one window in any order (microbatch
    gives them in the order they first came)."""
    def order(w: tuple[Any, ...]) -> tuple[Any, ...]:
        return (w[1], w[0], repr(w[2]))

    return [w[:2] for w in got] == [w[:2] for w in want] and sorted(got, key=order) == sorted(want, key=order)
