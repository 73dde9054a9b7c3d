"""The worker call queue (``microbatch._core.calls``), without an event loop or processes."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbatch._core.calls import Call, CallQueue, CallQueueError, CallState, Step

FINAL = {CallState.ANSWERED, CallState.FAILED, CallState.RESEND, CallState.ABANDONED}


def test_calls_run_one_after_the_other_in_send_order() -> None:
    queue = CallQueue()
    a, b, c = queue.send(), queue.send(), queue.send()
    assert [a.state, b.state, c.state] == [CallState.RUNNING, CallState.SENT, CallState.SENT]
    done, step = queue.answered()
    assert done is a and a.state is CallState.ANSWERED
    assert step.running == [b] and step.resend == [] and not step.kill
    assert b.state is CallState.RUNNING and c.state is CallState.SENT
    done, step = queue.answered()
    assert done is b and step.running == [c]
    done, step = queue.answered()
    assert done is c and step.running == [] and len(queue) == 0
    assert queue.send().state is CallState.RUNNING  # idle again: the next call runs at once


def test_a_dead_worker_fails_the_running_call_and_resends_the_queued_ones() -> None:
    queue = CallQueue()
    running, queued1, queued2 = queue.send(), queue.send(), queue.send()
    step = queue.died()
    assert running.state is CallState.FAILED
    assert step.resend == [queued1, queued2] and not step.kill
    assert all(call.state is CallState.RESEND for call in (queued1, queued2))
    assert not queue.open
    with pytest.raises(CallQueueError, match="closed"):
        queue.send()
    with pytest.raises(CallQueueError, match="no call running"):
        queue.answered()


def test_a_timeout_kills_the_worker_and_resends_the_queued_calls() -> None:
    queue = CallQueue()
    running, queued = queue.send(), queue.send()
    step = queue.stopped()
    assert step.kill and step.resend == [queued]
    assert running.state is CallState.FAILED


def test_cancelling_the_running_call_kills_the_worker() -> None:
    queue = CallQueue()
    running, queued = queue.send(), queue.send()
    step = queue.cancel(running)
    assert step.kill and step.resend == [queued]
    assert running.state is CallState.FAILED
    assert queue.cancel(running).kill is False  # a final call: nothing more happens


def test_cancelling_a_queued_call_abandons_it_until_its_turn_comes() -> None:
    queue = CallQueue()
    running, abandoned, behind = queue.send(), queue.send(), queue.send()
    step = queue.cancel(abandoned)
    assert abandoned.state is CallState.ABANDONED
    assert not step.kill and step.resend == [] and queue.open  # the running call goes on
    done, step = queue.answered()
    assert done is running and running.state is CallState.ANSWERED
    # the worker would now run the abandoned call: it is killed, the call behind goes elsewhere
    assert step.kill and step.resend == [behind] and step.running == []
    assert abandoned.state is CallState.ABANDONED and not queue.open


def test_a_call_that_never_reached_a_dead_worker_is_resent_even_if_it_was_to_run_first() -> None:
    queue = CallQueue()
    first = queue.send()
    step = queue.lost(first)
    assert first.state is CallState.RESEND and step.resend == [first] and not step.kill
    assert not queue.open
    other = CallQueue()
    running, unsent = other.send(), other.send()
    step = other.lost(unsent)
    assert running.state is CallState.FAILED  # it was running when the worker died
    assert step.resend == [unsent]


def test_cancelling_a_call_of_another_worker_is_an_error() -> None:
    mine, other = CallQueue(), CallQueue()
    mine.send()
    with pytest.raises(CallQueueError, match="not sent to this worker"):
        mine.cancel(other.send())


# ---- interleavings ------------------------------------------------------------------------------

WORKERS = 2
events = st.lists(
    st.tuples(
        st.sampled_from(["send", "answer", "die", "timeout", "cancel", "lost"]),
        st.integers(0, WORKERS - 1),
        st.integers(0, 3),
    ),
    max_size=80,
)


@settings(max_examples=1000, deadline=None)
@given(events)
def test_any_interleaving_ends_every_call_exactly_once(script: list[tuple[str, int, int]]) -> None:
    """A pool of queues driven like the executor: workers replaced when closed, resent calls sent
    again to the next worker, answers produced in the order the worker received the calls."""
    queues = [CallQueue() for _ in range(WORKERS)]
    # What each worker process really holds in its pipe, in order: the model the queue must match.
    pipes: list[deque[Call]] = [deque() for _ in range(WORKERS)]
    jobs: dict[int, int] = {}  # id(call) -> job it carries (a resent job gets a new call)
    calls: list[Call] = []
    endings: dict[int, list[CallState]] = {}
    answered_jobs: list[int] = []
    failed_jobs: set[int] = set()
    resent_jobs: set[int] = set()
    next_job = 0

    def watch(call: Call) -> None:
        endings.setdefault(id(call), [])

    def note_final(call: Call) -> None:
        if call.state in FINAL and (not endings[id(call)] or endings[id(call)][-1] != call.state):
            endings[id(call)].append(call.state)

    def send(w: int, job: int) -> None:
        if not queues[w].open:  # the executor replaces a closed worker before sending to it
            queues[w] = CallQueue()
            pipes[w] = deque()
        call = queues[w].send()
        watch(call)
        calls.append(call)
        jobs[id(call)] = job
        pipes[w].append(call)

    def perform(w: int, resend: list[Call]) -> None:
        for call in resend:
            assert call.state is CallState.RESEND
            resent_jobs.add(jobs[id(call)])
            send((w + 1) % WORKERS, jobs[id(call)])

    for kind, w, pick in script:
        queue = queues[w]
        if kind == "send":
            send(w, next_job)
            next_job += 1
        elif kind == "answer":
            if not queue.open or not pipes[w] or pipes[w][0].state is not CallState.RUNNING:
                continue  # the worker runs nothing whose answer the parent still reads
            expected = pipes[w].popleft()
            done, step = queue.answered()
            assert done is expected  # answers are matched in send order
            answered_jobs.append(jobs[id(done)])
            if step.running:
                assert step.running == [pipes[w][0]]
            perform(w, step.resend)
        elif kind in ("die", "timeout"):
            if not queue.open:
                continue
            running = queue.running
            waiting = [c for c in pipes[w] if c.state is CallState.SENT]
            step = queue.died() if kind == "die" else queue.stopped()
            assert step.kill is (kind == "timeout")
            # The running call fails with the cause; only calls that never started are resent.
            if running is not None:
                assert running.state is CallState.FAILED
                failed_jobs.add(jobs[id(running)])
            assert step.resend == waiting
            perform(w, step.resend)
        elif kind == "lost":
            # The last call sent to this worker could not be written: the worker was dead already.
            pending = [c for c in pipes[w] if not c.done]
            if not queue.open or not pending:
                continue
            call = pending[-1]
            running = queue.running
            step = queue.lost(call)
            assert call.state is CallState.RESEND and call in step.resend and not step.kill
            if running is not None and running is not call:
                assert running.state is CallState.FAILED
                failed_jobs.add(jobs[id(running)])
            perform(w, step.resend)
        else:
            if not calls:
                continue
            call = calls[-1 - pick % len(calls)]  # recent calls are the interesting ones
            owner = next((i for i, p in enumerate(pipes) if call in p), None)
            if owner is None:  # answered, or its worker was replaced: it ended already
                assert call.done
                assert queue.cancel(call) == Step()
                continue
            was_running = call.state is CallState.RUNNING
            was_sent = call.state is CallState.SENT
            waiting = [c for c in pipes[owner] if c.state is CallState.SENT and c is not call]
            step = queues[owner].cancel(call)
            assert step.kill is was_running
            if was_running:
                assert call.state is CallState.FAILED and step.resend == waiting
                failed_jobs.add(jobs[id(call)])
            elif was_sent:  # abandoned: the worker goes on with its running call
                assert call.state is CallState.ABANDONED
                assert step.resend == [] and queues[owner].open
            else:  # ended already: nothing happens
                assert step == Step()
            perform(owner, step.resend)
        for call in calls:
            note_final(call)
            # A final state never changes (an abandoned call never runs, a failed one never resends).
            assert not endings[id(call)] or call.state is endings[id(call)][0], call
        # An open worker with calls runs exactly one, the oldest it holds; a closed one runs none.
        for q, pipe in zip(queues, pipes, strict=True):
            running = [c for c in pipe if c.state is CallState.RUNNING]
            assert running == ([pipe[0]] if q.open and pipe else [])

    for call in calls:
        assert len(endings[id(call)]) <= 1, f"{call!r} ended twice: {endings[id(call)]}"
        if call.done:
            assert len(endings[id(call)]) == 1
    # A resent job is never counted as a failure of the call that was resent.
    for call in calls:
        if call.state is CallState.RESEND:
            assert endings[id(call)] == [CallState.RESEND]
    # Every job is answered at most once, and a job answered never failed (or the reverse).
    assert len(answered_jobs) == len(set(answered_jobs))
    assert not failed_jobs & set(answered_jobs)
    # A resent job was not running when its worker was lost: it never counts as failed there.
    assert all(c.state is not CallState.FAILED for c in calls if c.state is CallState.RESEND)
    # A call that is not final is still held by an open worker, waiting or running.
    for call in calls:
        if not call.done:
            assert any(q.open and call in p for q, p in zip(queues, pipes, strict=True))


def test_core_calls_import_no_anyio() -> None:
    import microbatch._core.calls as calls

    source = open(calls.__file__).read()
    assert "import anyio" not in source and "from anyio" not in source
