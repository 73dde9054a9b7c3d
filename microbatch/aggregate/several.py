"""Aggregates: several aggregators folded in one pass, each under its own name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import JSON, Aggregator, _type_error

__all__ = ["Aggregates"]


class Aggregates(Aggregator[Mapping[str, Any], dict[str, Any], dict[str, Any]]):
    """Several aggregators in one pass: ``Aggregates(count=Count(), total=Sum(), top=TopK(5))``.

    ``fn`` returns a dict of name -> that aggregator's batch result (a name left out folds nothing
    into its aggregator); the value is a dict of the same names -> each aggregator's value. A name
    the aggregators do not have raises ``TypeError`` naming it, and nothing is folded. It works
    inside ``Windows`` and ``ByKey`` (the state is a dict of name -> inner state, dumped as one).
    """

    def __init__(self, **named: Aggregator[Any, Any, Any]) -> None:
        if not named:
            raise ValueError("Aggregates() needs at least one named aggregator, e.g. count=mb.Count()")
        for name, agg in named.items():
            if hasattr(agg, "close_batch"):  # a Windows: its windows close in the pipeline only
                raise ValueError(
                    f"Aggregates({name}=...) is a Windows: put Aggregates inside Windows instead, "
                    f"Windows(Aggregates(...), size=...)"
                )
            if not isinstance(agg, Aggregator):
                raise TypeError(
                    f"Aggregates({name}=...) must be an aggregator such as mb.Sum(), got {agg!r:.100} "
                    f"of type {type(agg).__qualname__}"
                )
        self.named = dict(named)

    def describe(self) -> str:
        return f"Aggregates({', '.join(f'{n}={a.describe()}' for n, a in self.named.items())})"

    def initial(self) -> dict[str, Any]:
        return {name: agg.initial() for name, agg in self.named.items()}

    def fold(self, state: dict[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(result, Mapping):
            raise _type_error(self, result, f"a dict with some of the names {', '.join(self.named)}")
        unknown = [name for name in result if name not in self.named]
        if unknown:
            raise TypeError(
                f"{self.describe()}: fn's result names {unknown[0]!r}, which is none of "
                f"{', '.join(self.named)}"
            )
        for name, partial in result.items():
            state[name] = self.named[name].fold(state[name], partial)
        return state

    def value(self, state: dict[str, Any]) -> dict[str, Any]:
        return {name: agg.value(state[name]) for name, agg in self.named.items()}

    def dump(self, state: dict[str, Any]) -> JSON:
        return {name: agg.dump(state[name]) for name, agg in self.named.items()}

    def load(self, data: JSON) -> dict[str, Any]:
        if not isinstance(data, dict) or set(data) != set(self.named):
            raise ValueError(f"{self.describe()}.load(): not a state this aggregator dumped: {data!r:.200}")
        return {name: agg.load(data[name]) for name, agg in self.named.items()}
