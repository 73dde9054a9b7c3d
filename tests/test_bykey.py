"""ByKey and TopK over sharded keyed state: exact against plain dicts, resumable, reshardable."""

from __future__ import annotations

import json
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbatch.aggregate import Aggregator, ByKey, Count, Max, Mean, Min, Sum, TopK, split_to_bytes

RECORDS = 200_000
KEYS = 50_000
BATCH = 10_000


def make_records(kind: str, seed: int = 7, n: int = RECORDS) -> list[tuple[Any, int]]:
    """``n`` (key, value) records over KEYS keys of one kind: str, int or tuple."""
    rng = random.Random(seed)
    ids = [rng.randrange(KEYS) for _ in range(n)]
    values = [rng.randrange(-1000, 1000) for _ in range(n)]
    if kind == "str":
        keys: list[Any] = [f"user-{i}" for i in ids]
    elif kind == "int":
        keys = [i * 7919 - 10**12 for i in ids]
    else:
        keys = [("host", i % 101, f"p{i}") for i in ids]
    return list(zip(keys, values, strict=True))


def batch_results(
    records: list[tuple[Any, int]], partial: Callable[[list[int]], Any]
) -> list[dict[Any, Any]]:
    """What fn would return per batch: key -> partial of that key's values in the batch."""
    results = []
    for start in range(0, len(records), BATCH):
        grouped: dict[Any, list[int]] = {}
        for key, value in records[start : start + BATCH]:
            grouped.setdefault(key, []).append(value)
        results.append({key: partial(values) for key, values in grouped.items()})
    return results


def fold(agg: Aggregator[Any, Any, Any], results: list[Any], state: Any = None) -> Any:
    state = agg.initial() if state is None else state
    for result in results:
        state = agg.fold(state, result)
    return state


def through_json(data: Any) -> Any:
    return json.loads(json.dumps(data))


CASES: list[tuple[Aggregator[Any, Any, Any], Callable[[list[int]], Any], Callable[[list[int]], Any]]] = [
    (Sum(), sum, sum),
    (Count(), len, len),
    (Mean(), lambda v: (sum(v), len(v)), lambda v: sum(v) / len(v)),
    (Min(), min, min),
    (Max(), list, max),
]


@pytest.mark.parametrize("kind", ["str", "int", "tuple"])
def test_bykey_matches_a_plain_dict_computation(kind: str) -> None:
    records = make_records(kind)
    per_key: dict[Any, list[int]] = {}
    for key, value in records:
        per_key.setdefault(key, []).append(value)
    for inner, partial, final in CASES:
        agg = ByKey(inner, shards=8)
        results = batch_results(records, partial)
        half = len(results) // 2
        # checkpointed through real JSON half-way, resumed, finished
        state = agg.load(through_json(agg.dump(fold(agg, results[:half]))))
        value = agg.value(fold(agg, results[half:], state))
        expected = {key: final(values) for key, values in per_key.items()}
        assert len(value) == len(expected)
        assert dict(value) == expected, inner
        some = next(iter(expected))
        assert value[some] == expected[some] and some in value


def test_topk_value_unchanged_and_equal_to_a_counter() -> None:
    records = make_records("str")
    counter = Counter(key for key, _ in records)
    results = batch_results(records, len)
    expected = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
    for shards in (1, 16):
        agg = TopK(25, shards=shards)
        assert agg.value(fold(agg, results)) == expected
        cut = agg.load(through_json(agg.dump(fold(agg, results[:7]))))
        assert agg.value(fold(agg, results[7:], cut)) == expected
    assert TopK(25, shards=3).describe() == "TopK(k=25)"


def test_topk_refuses_a_state_that_is_not_keyed_documents() -> None:
    with pytest.raises(ValueError, match="not a state this aggregator dumped"):
        TopK(2).load({"counts": {"a": 3, "b": 5, "c": 1}, "monotone": True})


@pytest.mark.parametrize("before, after", [(4, 5), (5, 3), (1, 16), (16, 1)])
def test_resharding_ends_exact(before: int, after: int) -> None:
    records = make_records("tuple", seed=before, n=50_000)
    results = batch_results(records, sum)
    old, new = ByKey(Sum(), shards=before), ByKey(Sum(), shards=after)
    dumped = through_json(old.dump(fold(old, results[:9])))
    state = new.load(dumped)
    assert all(not shard or new.ring.shard_of(next(iter(shard))) == i for i, shard in enumerate(state.shards))
    assert all(new.ring.shard_of(key) == i for i, shard in enumerate(state.shards) for key in shard)
    finished = fold(new, results[9:], state)
    assert dict(new.value(finished)) == dict(old.value(fold(old, results)))
    # after a reshard every shard is written whole, in the new layout
    docs = new.dump_changes(finished)
    assert sorted(d["shard"] for d in docs) == list(range(after))
    assert {d["kind"] for d in docs} == {"base"} and {d["shards"] for d in docs} == {after}


def test_dump_changes_names_only_the_changed_keys_and_replays_exactly() -> None:
    agg = ByKey(Sum(), shards=4)
    state = fold(agg, [{f"k{i}": i for i in range(10_000)}])
    first = agg.dump_changes(state)
    assert {d["kind"] for d in first} == {"base"} and sum(len(d["keys"]) for d in first) == 10_000
    assert agg.dump_changes(state) == []  # nothing changed since
    state = agg.fold(state, {"k1": 5, "k2": 5, "new": 1, ("t", 1): 2})
    second = agg.dump_changes(state)
    assert {d["kind"] for d in second} == {"delta"}
    assert sorted(map(str, (k for d in second for k in d["keys"]))) == sorted(["k1", "k2", "new", "['t', 1]"])
    assert all(d["count"] == len(state.shards[d["shard"]]) for d in second)
    replayed = agg.load_documents(through_json([*first, *second]))
    assert dict(agg.value(replayed)) == dict(agg.value(state))
    assert agg.dump_changes(replayed) == []


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.one_of(st.text(max_size=2), st.integers(-3, 3)), st.integers(-5, 5), max_size=6),
        max_size=12,
    ),
    st.sets(st.integers(0, 12)),
    st.sampled_from([1, 2, 5]),
)
def test_any_cuts_of_dump_changes_replay_to_the_uninterrupted_value(
    results: list[dict[Any, int]], cuts: set[int], shards: int
) -> None:
    agg = ByKey(Sum(), shards=shards)
    state, documents = agg.initial(), []
    for i, result in enumerate(results):
        if i in cuts:
            documents += agg.dump_changes(state)
            state = agg.load_documents(through_json(documents))
        state = agg.fold(state, result)
    documents += agg.dump_changes(state)
    assert dict(agg.value(agg.load_documents(through_json(documents)))) == dict(agg.value(fold(agg, results)))


@pytest.mark.parametrize("result, words", [
    ({"b": 2, 1.5: 1}, ["ByKey(Sum())", "1.5", "float", "dict"]),
    (Counter({"b": 2, None: 1}), ["None", "NoneType", "Counter"]),
    ({"b": 2, ("a", 2.5): 1}, ["('a', 2.5)", "2.5", "float"]),
    ({"b": 2, True: 1}, ["True", "bool"]),
    ([("a", 1)], ["ByKey(Sum())", "list", "mapping"]),
])
def test_bad_keys_raise_naming_the_key_and_the_result_type_and_change_nothing(
    result: Any, words: list[str]
) -> None:
    agg = ByKey(Sum())
    state = agg.fold(agg.initial(), {"a": 1})
    with pytest.raises(TypeError) as info:
        agg.fold(state, result)
    for word in words:
        assert word in str(info.value)
    assert dict(agg.value(state)) == {"a": 1}
    assert agg.fold(state, {"a": 1}) is state and agg.value(state)["a"] == 2


def test_a_partial_the_inner_aggregator_refuses_breaks_the_state_visibly() -> None:
    agg = ByKey(Count())
    state = agg.fold(agg.initial(), {"a": 1})
    with pytest.raises(TypeError, match=r"ByKey\(Count\(\)\) for the key 'b'.*float"):
        agg.fold(state, {"b": 2.5})
    with pytest.raises(ValueError, match="refused batch result"):
        agg.dump(state)
    with pytest.raises(ValueError, match="refused batch result"):
        agg.fold(state, {"a": 1})


def test_value_is_a_read_only_mapping() -> None:
    agg = ByKey(Max(), shards=3)
    value = agg.value(fold(agg, [{"a": [1, 5]}, {"b": 2, ("x", 1): "z"}]))
    assert isinstance(value, Mapping)
    assert value == {"a": 5, "b": 2, ("x", 1): "z"}
    assert 1.5 not in value and "zz" not in value and [1] not in value
    with pytest.raises(KeyError):
        value["zz"]
    with pytest.raises(TypeError):
        value["a"] = 1  # type: ignore[index]
    assert "3 keys" in repr(value)


def test_describe_leaves_shards_out_and_bad_arguments_are_named() -> None:
    assert ByKey(Sum(), shards=4).describe() == ByKey(Sum(), shards=9).describe() == "ByKey(Sum())"
    assert ByKey(Mean()).summary(ByKey(Mean()).initial()) == {"keys": 0}
    with pytest.raises(TypeError, match="inner must be an aggregator"):
        ByKey(sum)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shards"):
        ByKey(Sum(), shards=0)
    with pytest.raises(ValueError, match="not a state"):
        ByKey(Sum()).load({"counts": {}})
    with pytest.raises(ValueError, match="not the JSON form of a key"):
        ByKey(Sum()).load({"format": "microbatch.keyed/1", "documents": [
            {"format": "microbatch.keyed/1", "shard": 0, "shards": 1, "kind": "base", "count": 1,
             "keys": [1.5], "states": [1]}]})


def _split_in_worker(result: dict[Any, int]) -> dict[int, bytes]:
    return split_to_bytes(result, ByKey(Count(), shards=5))


def test_results_split_to_bytes_in_a_worker_process_fold_per_shard_exactly() -> None:
    records = make_records("str", n=60_000)
    results = batch_results(records, len)
    agg = ByKey(Count(), shards=5)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        parts = pool.map(_split_in_worker, results)
        with pytest.raises(TypeError, match=r"1\.5"):
            pool.apply(_split_in_worker, ({"a": 1, 1.5: 2},))
    assert all(isinstance(data, bytes) for part in parts for data in part.values())
    # one owner per shard, each folding only its shard, in batch order
    owners = {shard: agg.initial() for shard in range(5)}
    for part in parts:
        for shard, data in part.items():
            agg.fold_shard(owners[shard], shard, data)
    merged = agg.initial()
    for shard, owner in owners.items():
        assert all(not s for i, s in enumerate(owner.shards) if i != shard)
        merged.shards[shard] = owner.shards[shard]
    assert dict(agg.value(merged)) == dict(agg.value(fold(agg, results)))
    with pytest.raises(ValueError, match="shard"):
        agg.fold_shard(agg.initial(), 5, b"")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.dictionaries(st.sampled_from("abcdefg"), st.integers(-3, 5), max_size=5), max_size=12),
    st.sets(st.integers(0, 12)),
    st.sampled_from([1, 3]),
)
def test_topk_through_dump_changes_at_any_cuts(
    results: list[dict[str, int]], cuts: set[int], shards: int
) -> None:
    agg = TopK(3, shards=shards)
    state, documents = agg.initial(), []
    for i, result in enumerate(results):
        if i in cuts:
            documents += agg.dump_changes(state)
            state = agg.load_documents(through_json(documents))
        state = agg.fold(state, result)
    total: Counter[str] = Counter()
    for result in results:
        total.update(result)
    expected = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert agg.value(state) == expected
    documents += agg.dump_changes(state)
    assert agg.value(agg.load_documents(through_json(documents))) == expected


def test_topk_checks_keys_and_counts_where_results_are_split() -> None:
    agg = TopK(2, shards=4)
    with pytest.raises(TypeError, match="needs str keys"):
        split_to_bytes({"a": 1, 7: 1}, agg)
    with pytest.raises(TypeError, match="needs int counts"):
        split_to_bytes({"a": True}, agg)
    state = agg.initial()
    for shard, data in split_to_bytes(Counter("abracadabra"), agg).items():
        agg.fold_shard(state, shard, data)
    assert agg.value(state) == [("a", 5), ("b", 2)]
