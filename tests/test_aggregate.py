"""Aggregators: a resumed fold (dump, JSON, load at any point) gives exactly the uninterrupted value."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import microbatch as mb
from microbatch.aggregate import Aggregator, Count, Max, Mean, Min, Reduce, Sum, TopK


def fold_all(agg: Aggregator[Any, Any, Any], results: Sequence[Any], cuts: Sequence[int] = ()) -> Any:
    """Fold ``results`` in order; at every index in ``cuts`` checkpoint through real JSON and resume."""
    state = agg.initial()
    for i, result in enumerate(results):
        if i in cuts:
            state = agg.load(json.loads(json.dumps(agg.dump(state))))
        state = agg.fold(state, result)
    if len(results) in cuts:
        state = agg.load(json.loads(json.dumps(agg.dump(state))))
    return agg.value(state)


def same(a: Any, b: Any) -> bool:
    """Equal values, NaN equal to NaN, and the same types (an int is not a float here)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats()
numbers = st.one_of(st.integers(), finite)
cuts = st.sets(st.integers(min_value=0, max_value=30))


@given(st.lists(st.one_of(numbers, any_float, st.lists(numbers, max_size=5)), max_size=30), cuts)
def test_sum_resumed_equals_uninterrupted(results: list[Any], where: set[int]) -> None:
    assert same(fold_all(Sum(), results, sorted(where)), fold_all(Sum(), results))


@given(st.lists(st.lists(st.one_of(st.integers(), finite), max_size=6), max_size=12), cuts)
def test_sum_does_not_depend_on_batching(batches: list[list[Any]], where: set[int]) -> None:
    """Float sums are correctly rounded over the whole run: any grouping of the numbers gives one value."""
    flat = [x for batch in batches for x in batch]
    exact = sum((Fraction(x) for x in flat), Fraction(0))
    value = fold_all(Sum(), batches, sorted(where))
    if any(isinstance(x, float) for x in flat):
        try:
            expected: int | float = float(exact)
        except OverflowError:
            return
        assert value == expected and isinstance(value, float)
        assert value == fold_all(Sum(), flat)  # one number per batch
    else:
        assert value == exact and type(value) is int


def test_sum_values_and_kinds() -> None:
    assert fold_all(Sum(), []) == 0
    assert fold_all(Sum(), [1, [2, 3], (4,), range(5)]) == 20
    assert same(fold_all(Sum(), [[0.1] * 10]), 1.0)  # plain addition would give 0.9999999999999999
    assert same(fold_all(Sum(), [10**30, 1.0, -(10**30)]), 1.0)
    assert same(fold_all(Sum(), [math.inf, 1]), math.inf)
    assert math.isnan(fold_all(Sum(), [math.inf, -math.inf]))
    assert same(fold_all(Sum(), [1e308, 1e308]), math.inf)
    assert same(fold_all(Sum(), [Fraction(1, 2), True]), 1.5)


@pytest.mark.parametrize("cut", [(), (1,), (2,), (3,)])
def test_sum_that_leaves_the_float_range_and_comes_back_is_exact(cut: tuple[int, ...]) -> None:
    big = sys.float_info.max
    assert same(fold_all(Sum(), [1e308, 1e308, -1e308], cut), 1e308)
    assert same(fold_all(Sum(), [-big, -big, big, 5.0], cut), -big)
    # the exact sum of the first two is just past the largest float; the third brings it back
    assert same(fold_all(Sum(), [1.1918415484831354e304, 1.7975739507074675e308, -1.0], cut), big)
    assert same(fold_all(Sum(), [1e308, 1e308, 10**400], cut), math.inf)
    assert same(fold_all(Sum(), [-1e308, -1e308, 1.0], cut), -math.inf)


@given(st.lists(st.one_of(st.integers(min_value=0, max_value=10**6), st.lists(st.integers(), max_size=4),
                          st.text(max_size=4)), max_size=30), cuts)
def test_count(results: list[Any], where: set[int]) -> None:
    expected = sum(r if isinstance(r, int) else len(r) for r in results)
    assert fold_all(Count(), results, sorted(where)) == expected


@given(st.lists(st.one_of(st.tuples(numbers, st.integers(min_value=0, max_value=100)), finite,
                          st.lists(numbers, max_size=5)), max_size=20), cuts)
def test_mean_resumed_equals_uninterrupted(results: list[Any], where: set[int]) -> None:
    assert same(fold_all(Mean(), results, sorted(where)), fold_all(Mean(), results))


@given(st.lists(st.lists(st.integers(min_value=-10**6, max_value=10**6), max_size=6), max_size=10))
def test_mean_of_ints_is_exact(batches: list[list[int]]) -> None:
    flat = [x for b in batches for x in b]
    assert fold_all(Mean(), batches) == (sum(flat) / len(flat) if flat else None)


def test_mean_pairs_and_none() -> None:
    assert fold_all(Mean(), []) is None
    assert fold_all(Mean(), [(10, 4), [1, 2], 3.5]) == (10 + 1 + 2 + 3.5) / 7
    assert fold_all(Mean(), [(0, 0)]) is None


scalars = st.one_of(st.none(), st.integers(), any_float)


@pytest.mark.parametrize("agg, pick", [(Min, min), (Max, max)])
@given(data=st.lists(st.one_of(scalars, st.lists(scalars, max_size=4)), max_size=20), where=cuts)
def test_min_max(agg: type[Min], pick: Any, data: list[Any], where: set[int]) -> None:
    flat = [x for r in data for x in (r if isinstance(r, list) else [r])]
    seen = [x for x in flat if x is not None and not (isinstance(x, float) and math.isnan(x))]
    value = fold_all(agg(), data, sorted(where))
    if not seen:
        assert value is None
    else:
        assert value == pick(seen)
        assert same(value, fold_all(agg(), data))


def test_min_max_strings_and_ties() -> None:
    assert fold_all(Min(), [["pear", "apple"], "fig"]) == "apple"
    assert same(fold_all(Max(), [1, 1.0]), 1)  # of equal values the first one seen stays
    assert same(fold_all(Max(), [1.0, 1]), 1.0)


counters = st.dictionaries(st.sampled_from("abcdefgh"), st.integers(min_value=0, max_value=5), max_size=8)


@given(st.lists(counters, max_size=20), st.integers(min_value=1, max_value=10), cuts)
def test_topk_against_exact_counts(results: list[dict[str, int]], k: int, where: set[int]) -> None:
    total: Counter[str] = Counter()
    for r in results:
        total.update(r)
    expected = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    assert fold_all(TopK(k), results, sorted(where)) == expected


@given(st.lists(st.dictionaries(st.sampled_from("abcd"), st.integers(-5, 5), max_size=4), max_size=15), cuts)
def test_topk_with_negative_counts(results: list[dict[str, int]], where: set[int]) -> None:
    total: dict[str, int] = {}
    for r in results:
        for key, n in r.items():
            total[key] = total.get(key, 0) + n
    expected = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert fold_all(TopK(2), results, sorted(where)) == expected


def test_topk_ties_are_broken_by_key_whatever_the_order() -> None:
    forward = [{"b": 2}, {"a": 2}, {"c": 2}, {"d": 1}]
    assert fold_all(TopK(2), forward) == [("a", 2), ("b", 2)]
    assert fold_all(TopK(2), forward[::-1]) == [("a", 2), ("b", 2)]
    assert fold_all(TopK(3), [Counter("abracadabra")]) == [("a", 5), ("b", 2), ("r", 2)]


def test_reduce_and_custom_aggregator_resume() -> None:
    longest = Reduce(lambda best, lines: max([best, *map(len, lines)]), 0)
    assert fold_all(longest, [["ab", "abcd"], [], ["a"]], [1, 2]) == 4
    assert longest.describe() == (
        f"Reduce(fn={__name__}.test_reduce_and_custom_aggregator_resume.<locals>.<lambda>, initial=0)"
    )

    class Histogram(Aggregator[list[float], dict[str, int], dict[str, int]]):
        def __init__(self, width: float) -> None:
            self.width = width

        def initial(self) -> dict[str, int]:
            return {}

        def fold(self, state: dict[str, int], result: list[float]) -> dict[str, int]:
            for x in result:
                key = str(math.floor(x / self.width) * self.width)
                state[key] = state.get(key, 0) + 1
            return state

        def value(self, state: dict[str, int]) -> dict[str, int]:
            return dict(sorted(state.items()))

    h = Histogram(10)
    assert h.describe() == "Histogram(width=10)"
    assert fold_all(h, [[1, 12], [15, 3.5]], [1]) == {"0": 2, "10": 2}


def test_default_dump_copies_and_names_what_json_cannot_hold() -> None:
    r = Reduce(lambda s, x: s, {"a": [1, 2]})
    state = r.initial()
    dumped = r.dump(state)
    dumped["a"].append(3)
    assert state == {"a": [1, 2]}  # dump shares nothing mutable with the state
    with pytest.raises(TypeError, match=r"state\['s'\] is a set"):
        r.dump({"s": {1, 2}})
    with pytest.raises(TypeError, match="JSON object keys are str"):
        r.dump({1: 2})


def test_describe_is_stable_and_names_settings() -> None:
    assert Sum().describe() == "Sum()"
    assert TopK(10).describe() == "TopK(k=10)"
    assert repr(TopK(3)) == "TopK(k=3)"
    assert Reduce(max, 0).describe() == "Reduce(fn=builtins.max, initial=0)"


@pytest.mark.parametrize(
    "agg, result, words",
    [
        (Sum(), "12", ["Sum()", "str"]),
        (Sum(), [1, "x"], ["Sum()", "'x'", "str"]),
        (Sum(), {"a": 1}, ["Sum()", "dict"]),
        (Count(), 3.5, ["Count()", "float"]),
        (Mean(), (1, 2, 3), ["Mean()", "(sum, count)"]),
        (Mean(), None, ["Mean()", "NoneType"]),
        (Min(), object(), ["Min()", "object"]),
        (Max(), {"a": 1}, ["Max()", "dict"]),
        (TopK(2), ["a", "b"], ["TopK(k=2)", "list", "mapping"]),
        (TopK(2), {1: 2}, ["TopK(k=2)", "str keys", "int"]),
        (TopK(2), {"a": 1.5}, ["TopK(k=2)", "int counts", "float"]),
    ],
)
def test_wrong_results_raise_type_error_naming_aggregator_and_type(
    agg: Aggregator[Any, Any, Any], result: Any, words: list[str]
) -> None:
    with pytest.raises(TypeError) as info:
        agg.fold(agg.initial(), result)
    for word in words:
        assert word in str(info.value)


def test_refused_result_leaves_topk_state_unchanged() -> None:
    agg = TopK(2)
    state = agg.fold(agg.initial(), {"a": 1})
    with pytest.raises(TypeError):
        agg.fold(state, {"b": 1, "c": "x"})  # type: ignore[dict-item]
    assert agg.value(state) == [("a", 1)]


def test_mixed_min_types_and_bad_arguments() -> None:
    with pytest.raises(TypeError, match="cannot compare 'a'"):
        fold_all(Min(), [1, "a"])
    with pytest.raises(ValueError, match="negative count"):
        Count().fold(0, -1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        TopK(0)
    with pytest.raises(TypeError, match="k must be an int"):
        TopK(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a state"):
        Sum().load({"nope": 1})


@settings(max_examples=30)
@given(st.lists(st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=5), max_size=10))
def test_topk_dump_is_plain_json(results: list[dict[str, int]]) -> None:
    agg = TopK(3)
    state = agg.initial()
    for r in results:
        state = agg.fold(state, r)
    text = json.dumps(agg.dump(state), allow_nan=False)
    assert agg.value(agg.load(json.loads(text))) == agg.value(state)


def test_public_names() -> None:
    for name in ("Aggregator", "Sum", "Count", "Mean", "Min", "Max", "TopK", "Reduce"):
        assert getattr(mb, name) is getattr(__import__("microbatch.aggregate", fromlist=[name]), name)
