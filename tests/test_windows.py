"""Windows folded batch by batch against a plain-Python model, with random streams and batch cuts."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from windows_oracle import oracle, same_windows

import microbatch as mb
from microbatch.aggregate.windows import Windows, WindowsState, each_result

KINDS = [
    {"size": 10},
    {"size": 10, "slide": 5},
    {"size": 12, "slide": 4},
    {"gap": 7},
]
INNERS = ["sum", "count", "bykey", "bykey_triples"]


def _agg(inner: str, kind: dict[str, int], grace: int) -> Windows:
    agg = {"sum": mb.Sum(), "count": mb.Count()}.get(inner, mb.ByKey(mb.Count()))
    return Windows(agg, grace=grace, **kind)


def _pairs(inner: str, batch: list[tuple[int, Any, int]]) -> list[Any]:
    if inner == "sum":
        return [(t, v) for t, _, v in batch]
    if inner == "count":
        return [(t, 1) for t, _, _ in batch]
    if inner == "bykey_triples":  # the worker's fast path for tumbling windows
        return [(t, k, 1) for t, k, _ in batch]
    # both forms a keyed inner takes
    return [(t, {k: 1}) if i % 2 else (t, k, 1) for i, (t, k, _) in enumerate(batch)]


def _model_records(inner: str, batch: list[tuple[int, Any, int]]) -> list[tuple[int, Any, int]]:
    if inner == "sum":
        return [(t, None, v) for t, _, v in batch]
    if inner == "count":
        return [(t, None, 1) for t, _, _ in batch]
    return [(t, k, 1) for t, k, _ in batch]


def run_windows(agg: Windows, batches: list[list[Any]], *, reload_at: set[int] = frozenset()  # type: ignore[assignment]
                ) -> tuple[list[tuple[Any, ...]], int]:
    """Fold the batches as the pipeline does (combined in a 'worker', pickled), reloading the
    state from its JSON dump after the batches in ``reload_at``."""
    state: WindowsState = agg.initial()
    out: list[tuple[Any, ...]] = []
    for i, batch in enumerate(batches):
        grouped = pickle.loads(pickle.dumps(agg.combine(batch)))
        state = agg.fold(state, grouped)
        closed, _late = agg.close_batch(state)
        out += [(w.start, w.end, w.key, w.value) for w in each_result(closed)]
        if i in reload_at:
            state = agg.load(json.loads(json.dumps(agg.dump(state))))
    out += [(w.start, w.end, w.key, w.value) for w in each_result(agg.close_all(state))]
    return out, state.late_records


records = st.lists(
    st.tuples(st.integers(0, 200), st.sampled_from(["a", "b", "c"]), st.integers(-5, 20)), max_size=60
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[list[tuple[int, Any, int]]], set[int]]:
    recs = draw(records)
    if draw(st.booleans()):
        recs = sorted(recs, key=lambda r: r[0])  # in order; some out of order streams come unsorted
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(recs) - 1)), max_size=10)))
    bounds = [0, *[c for c in cuts if c < len(recs)], len(recs)]
    batches = [recs[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    reload_at = draw(st.sets(st.integers(0, max(0, len(batches) - 1)), max_size=3))
    return batches, reload_at


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("inner", INNERS)
@settings(max_examples=150, deadline=None)
@given(stream=streams(), grace=st.sampled_from([0, 3, 15]))
def test_windows_equal_the_model(
    kind: dict[str, int], inner: str, stream: tuple[list[list[Any]], set[int]], grace: int
) -> None:
    batches, reload_at = stream
    agg = _agg(inner, kind, grace)
    got, late = run_windows(agg, [_pairs(inner, b) for b in batches], reload_at=reload_at)
    want, want_late = oracle([_model_records(inner, b) for b in batches], grace=grace, **kind)
    assert same_windows(got, want)
    assert late == want_late


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@settings(max_examples=100, deadline=None)
@given(recs=records, cuts=st.sets(st.integers(1, 59), max_size=10), grace=st.sampled_from([0, 4]))
def test_in_order_streams_do_not_depend_on_batch_cuts(
    kind: dict[str, int], recs: list[tuple[int, Any, int]], cuts: set[int], grace: int
) -> None:
    recs = sorted(recs, key=lambda r: r[0])
    bounds = [0, *sorted(c for c in cuts if c < len(recs)), len(recs)]
    batches = [recs[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    agg = _agg("bykey", kind, grace)
    cut, late = run_windows(agg, [_pairs("bykey", b) for b in batches])
    whole, _ = run_windows(agg, [_pairs("bykey", recs)])
    assert cut == whole
    assert late == 0


def test_tumbling_windows_close_when_the_watermark_reaches_their_end() -> None:
    agg = Windows(mb.ByKey(mb.Count()), size=60, grace=5)
    state = agg.fold(agg.initial(), [(0, "a", 1), (30, "b", 1), (64, "a", 1)])
    assert agg.close_batch(state) == ([], [])  # watermark 59: [0, 60) still open
    state = agg.fold(state, [(65, "a", 1), (10, "b", 1)])  # 10 is judged against 59: on time
    closed, late = agg.close_batch(state)
    assert closed == [mb.KeyedWindow(0, 60, {"a": 1, "b": 2})]  # a keyed window: all its keys at once
    assert list(each_result(closed)) == [mb.WindowResult(0, 60, 1, "a"), mb.WindowResult(0, 60, 2, "b")]
    assert late == []
    state = agg.fold(state, [(5, "a", 1)])
    closed, late = agg.close_batch(state)
    assert closed == [] and [(x.start, x.end, x.records, x.first) for x in late] == [(0, 60, 1, 5)]
    assert agg.watermark(state) == 60
    assert agg.summary(state) == {"open_windows": 1, "watermark": 60, "emitted": 2, "late_records": 1}
    assert list(each_result(agg.close_all(state))) == [mb.WindowResult(60, 120, 2, "a")]


def test_timestamps_may_be_aware_datetimes_and_naive_ones_are_refused() -> None:
    agg = Windows(mb.Count(), size=60)
    utc = datetime.timezone.utc
    state = agg.fold(agg.initial(), [(datetime.datetime(2024, 5, 1, 12, 0, 30, tzinfo=utc), 1)])
    (w,) = agg.close_all(state)
    assert w.to_json() == {"start": "2024-05-01T12:00:00Z", "end": "2024-05-01T12:01:00Z", "value": 1}
    with pytest.raises(TypeError, match="naive datetime"):
        agg.combine([(datetime.datetime(2024, 5, 1), 1)])
    with pytest.raises(TypeError, match="item 1 of fn's result"):
        agg.combine([(1, 1), ("soon", 1)])
    with pytest.raises(ValueError, match="not finite"):
        agg.combine([(float("nan"), 1)])
    with pytest.raises(TypeError, match="list of \\(timestamp, partial\\) pairs"):
        agg.combine(5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "none of size, slide and gap"),
        ({"slide": 5}, "was given slide"),
        ({"size": 5, "gap": 3}, "size and gap"),
        ({"size": 5, "slide": 10}, "slide must not exceed size"),
        ({"size": -1}, "size=...\\) must be a finite number"),
        ({"size": 5, "grace": -1}, "grace"),
        ({"size": 5, "clock": "wall"}, "clock"),
        ({"size": 5, "on_late": "keep"}, "on_late"),
    ],
)
def test_settings_that_make_no_window_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Windows(mb.Count(), **kwargs)


def test_sessions_need_an_inner_aggregate_that_merges() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        Windows(mb.TopK(3), gap=30)
    Windows(mb.Aggregates(n=mb.Count(), total=mb.Sum(), lo=mb.Min(), avg=mb.Mean()), gap=30)


def test_a_late_record_bridging_two_sessions_merges_them() -> None:
    agg = Windows(mb.ByKey(mb.Aggregates(n=mb.Count(), total=mb.Sum(), avg=mb.Mean())), gap=10, grace=20)
    state = agg.fold(
        agg.initial(), [(0, "k", {"n": 1, "total": 1.5, "avg": 1}), (15, "k", {"n": 1, "total": 2})]
    )
    agg.close_batch(state)
    assert len(agg.value(state)) == 2
    state = agg.fold(state, [(8, "k", {"n": 1, "total": 0.25, "avg": 3})])
    agg.close_batch(state)
    (w,) = agg.close_all(agg.load(json.loads(json.dumps(agg.dump(state)))))
    assert w == mb.WindowResult(0, 25, {"n": 3, "total": 3.75, "avg": 2.0}, "k")


def test_aggregates_fold_several_in_one_pass() -> None:
    agg = mb.Aggregates(count=mb.Count(), total=mb.Sum(), top=mb.TopK(2))
    state = agg.fold(agg.initial(), {"count": 3, "total": [1, 2, 3], "top": {"x": 2, "y": 1, "z": 5}})
    state = agg.fold(state, {"count": 1})
    assert agg.value(state) == {"count": 4, "total": 6, "top": [("z", 5), ("x", 2)]}
    again = agg.load(json.loads(json.dumps(agg.dump(state))))
    assert agg.value(again) == agg.value(state)
    with pytest.raises(TypeError, match="'totl', which is none of count, total, top"):
        agg.fold(state, {"totl": 1})
    with pytest.raises(ValueError, match="put Aggregates inside Windows"):
        mb.Aggregates(w=Windows(mb.Count(), size=5))
    keyed = mb.ByKey(mb.Aggregates(n=mb.Count(), s=mb.Sum()))
    ks = keyed.fold(keyed.initial(), {"u": {"n": 1, "s": 5}, "v": {"n": 2, "s": 1}})
    assert dict(keyed.value(ks)) == {"u": {"n": 1, "s": 5}, "v": {"n": 2, "s": 1}}


def test_processing_time_stamps_each_result_with_its_batch_read_time() -> None:
    agg = Windows(mb.Sum(), size=10, clock="processing")
    state = agg.initial()
    for result in agg.stamp([3, 4], 1005.0):
        state = agg.fold(state, result)
    agg.close_batch(state)
    for result in agg.stamp([5], 1012.0):
        state = agg.fold(state, result)
    closed, _ = agg.close_batch(state)
    assert closed == [mb.WindowResult(1000, 1010, 7)]


def test_a_worker_sends_one_partial_per_window_and_key() -> None:
    agg = Windows(mb.ByKey(mb.Count()), size=60)
    grouped = agg.combine([(t, "k" if t % 2 else "j", 1) for t in range(120)])
    assert grouped.buckets == {
        0: [60, 0, 59, {"j": 30, "k": 30}, {}, True], 60: [60, 60, 119, {"j": 30, "k": 30}, {}, True]
    }
    # the general path (a mapping per pair) groups the same way
    general = agg.combine([(t, {"k" if t % 2 else "j": 1}) for t in range(120)])
    assert general.buckets == {
        0: [60, 0, 59, {"j": 30, "k": 30}, {}, False], 60: [60, 60, 119, {"j": 30, "k": 30}, {}, False]
    }


def test_a_refused_partial_leaves_a_state_that_cannot_be_saved() -> None:
    agg = Windows(mb.Sum(), size=10)
    state = agg.fold(agg.initial(), [(1, 2)])
    agg.close_batch(state)
    with pytest.raises(TypeError, match="cannot fold a batch result of type str"):
        agg.fold(state, [(3, 1), (15, "x")])
    with pytest.raises(ValueError, match="part of a refused batch result"):
        agg.dump(state)
    with pytest.raises(ValueError, match="part of a refused batch result"):
        agg.fold(state, [(4, 1)])


def test_the_fast_path_of_counts_refuses_what_count_refuses() -> None:
    agg = Windows(mb.ByKey(mb.Count()), size=60)
    with pytest.raises(TypeError, match="Count\\(\\) cannot fold"):
        agg.fold(agg.initial(), [(1, "a", 1), (2, "a", 1.0)])
    with pytest.raises(ValueError, match="negative"):
        agg.fold(agg.initial(), [(1, "a", 1), (2, "a", -1)])


def test_iso_times_are_utc_with_fractions_only_when_there_are_some() -> None:
    from microbatch.aggregate.windows import iso

    assert iso(1714564800) == "2024-05-01T12:00:00Z"
    assert iso(1714564800.5) == "2024-05-01T12:00:00.5Z"
    assert iso(1714564859.9999998) == "2024-05-01T12:01:00Z"  # rounded to microseconds, carried
    assert iso(-0.25) == "1969-12-31T23:59:59.75Z"


@pytest.mark.parametrize("kind", [{"size": 2.5}, {"size": 3.0, "slide": 0.75}, {"gap": 1.5}],
                         ids=["tumbling", "hopping", "session"])
@settings(max_examples=80, deadline=None)
@given(
    points=st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.floats(-1e6, 1e6, allow_nan=False),
                              st.sampled_from(["a", "b"])), max_size=40),
    cuts=st.sets(st.integers(1, 39), max_size=8),
    reload_at=st.sets(st.integers(0, 8), max_size=2),
)
def test_float_times_and_sums_do_not_depend_on_batch_cuts_or_reloads(
    kind: dict[str, float], points: list[tuple[float, float, str]], cuts: set[int], reload_at: set[int]
) -> None:
    points = sorted(points)
    bounds = [0, *sorted(c for c in cuts if c < len(points)), len(points)]
    pairs = [(t, k, v) for t, v, k in points]
    batches = [pairs[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    agg = Windows(mb.ByKey(mb.Sum()), grace=0.5, **kind)
    cut, _ = run_windows(agg, batches, reload_at=reload_at)
    whole, _ = run_windows(agg, [pairs])
    assert cut == whole
    for start, end, key, value in whole:  # each value is the exact sum of its window's points
        inside = [v for t, k, v in pairs if k == key and start <= t < end]
        assert value == math.fsum(inside) if inside else value == 0
