"""Aggregators: fold per-batch results, in batch order, into a running value that checkpoints can save.

A pipeline runs ``fn`` on every batch and hands each batch's result to an aggregator, strictly in
batch order. The aggregator keeps a *state*; ``value(state)`` is what the user sees. To survive a
crash the state goes into a checkpoint as JSON-compatible data (``dump``) and comes back (``load``).

The contract every aggregator keeps, and the built-ins are tested against:

- folding in batch order makes the state a pure function of the results folded so far;
- ``load(dump(state))`` is a state that folds and reports exactly like ``state`` (floats included:
  Python's JSON writes the shortest ``repr`` of a float, which reads back bit for bit);

so a run resumed from a checkpoint ends with exactly the value of an uninterrupted run.

Built-ins (``R`` is what each accepts as a batch result; anything else raises ``TypeError`` naming
the aggregator and the result's type):

=============  ================================================  =========================================
aggregator     batch result                                      value
=============  ================================================  =========================================
``Sum()``      a number, or an iterable of numbers               exact int sum; a float when floats appear
``Count()``    a ``Sized`` (adds ``len``) or a non-negative int  int
``Mean()``     a ``(sum, count)`` tuple, a number, or an         float, or ``None`` when nothing was seen
               iterable of numbers
``Min()``      a number or str, or an iterable of them;          the smallest value, ``None`` when none
               ``None``, empty iterables and NaN are skipped
``Max()``      as ``Min``                                        the largest value, ``None`` when none
``TopK(k)``    a mapping of str key to int count                 ``[(key, count), ...]``, the k largest
               (``collections.Counter`` fits)                    counts, ties by key
``ByKey(       a mapping of key (str, int or a tuple of them)    a read-only ``Mapping`` of key to that
inner)``       to a result ``inner`` accepts                     key's ``inner`` value
``Reduce(fn,   anything ``fn`` takes                             the state itself
initial)``
``Aggregates(  a dict of some of the names -> that aggregator's  a dict of name -> value
**named)``     batch result
``Windows(     ``[(timestamp, partial), ...]`` (see               the open windows; closed ones are handed
inner, ...)``  ``docs/windows.md``)                              over as ``WindowResult``
=============  ================================================  =========================================

Writing one's own: subclass :class:`Aggregator` and implement ``initial``, ``fold`` and ``value``.
``dump``/``load`` default to a copy of a JSON-native state, ``describe`` to the class name and its
public attributes. For a state that is already JSON data, ``Reduce(fn, initial)`` needs no class.
"""


from .base import JSON, Aggregator
from .bykey import ByKey, KeyedAggregator, split_to_bytes
from .numeric import Count, Max, Mean, Min, Sum
from .reduce import Reduce
from .several import Aggregates
from .topk import TopK
from .windows import KeyedWindow, WindowResult, Windows

__all__ = [
    "Aggregator", "Sum", "Count", "Mean", "Min", "Max", "TopK", "Reduce", "ByKey", "JSON",
    "KeyedAggregator", "split_to_bytes", "Aggregates", "Windows", "WindowResult",
    "KeyedWindow",
]
