"""Each worker process's call queue, as an explicit state machine.

A worker runs one call at a time and may hold more calls, sent to it and queued in its pipe behind
the one it runs. Its answers come back in the order the calls were sent. This module decides what
happens to every call when answers arrive, the worker dies, a call times out, or a caller is
cancelled; the process executor only does the I/O (writes frames, reads answers, kills processes)
and wakes the callers this module names.

The rules
---------

A call goes through these states (``->`` marks the transitions; ``*`` the final states)::

    SENT ------------> RUNNING ---------> ANSWERED*
      |                   |
      |                   +-------------> FAILED*       worker died, timed out, cancelled or closed
      +--> RESEND*                                      worker lost before the call started
      +--> ABANDONED*                                   caller cancelled while the call was queued

1. **Sent.** ``send()`` queues a call on an open worker. A call sent to a worker with nothing
   queued is RUNNING at once; otherwise it is SENT, queued behind the others.
2. **Answered in send order.** ``answered()`` takes the answer the worker sent, which belongs to the
   RUNNING call at the head of the queue (an answer with no running call is a ``CallQueueError``:
   the pipe is out of step). That call is ANSWERED; the next call becomes RUNNING and its caller
   is woken to read the next answer (its time limit starts then).
3. **Worker died** (``died()``: its pipe closed, a write failed) **or was stopped** (``stopped()``:
   the running call timed out, or the executor closed): the RUNNING call is FAILED with that
   cause. The calls queued behind it never started: they are RESEND, their callers send them to
   another worker, and that is no failure of theirs. The worker is closed: it takes no call again.
   A call whose frames could not be written because the worker was dead already (``lost()``) never
   reached it: it is RESEND too, even if it was to run first.
4. **Caller cancelled** (``cancel()``):

   - a RUNNING call: the worker is killed (the call cannot be stopped otherwise); the call is
     FAILED and the queued calls are RESEND, as in rule 3;
   - a SENT call: ABANDONED. It stays in the pipe; the worker goes on with the running call. When
     its answer comes, the abandoned call would run next: the worker is killed instead, and the
     calls behind it are RESEND;
   - a call already in a final state: nothing happens.

5. **Retired** (``retire()``: the worker ran as many calls as it may, or grew too big): it takes no
   new call, and the calls it holds run to their answers as before; once it holds none
   (``drained``) the shell stops it. Retiring kills nothing and sends nothing elsewhere.
6. **Every call ends exactly once**, in one final state; a final state never changes. Only a
   RUNNING call can be answered or fail; a RESEND call is never counted as a failure.

Each event returns a :class:`Step`: which callers to wake (their call is now RUNNING, or must be
sent again) and whether the worker must be killed. The async shell performs the step.

This module is pure: no I/O, no clock, no anyio. It is tested without an event loop.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Call", "CallQueue", "CallQueueError", "CallState", "Step"]


class CallState(enum.Enum):
    SENT = "sent"
    RUNNING = "running"
    ANSWERED = "answered"
    FAILED = "failed"
    RESEND = "resend"
    ABANDONED = "abandoned"


FINAL = frozenset({CallState.ANSWERED, CallState.FAILED, CallState.RESEND, CallState.ABANDONED})


class CallQueueError(RuntimeError):
    """An event that the rules do not allow in the queue's state (a desynchronised pipe)."""


class Call:
    """One call sent to one worker; ``state`` is its :class:`CallState`."""

    __slots__ = ("number", "state")

    def __init__(self, number: int, state: CallState) -> None:
        self.number = number  # the order in which it was sent to its worker, from 0
        self.state = state

    @property
    def done(self) -> bool:
        """Whether the call reached a final state."""
        return self.state in FINAL

    def __repr__(self) -> str:
        return f"<Call {self.number} {self.state.value}>"


@dataclass
class Step:
    """What the shell must do after an event."""

    # Calls that became RUNNING: their callers read the next answer now.
    running: list[Call] = field(default_factory=list)
    # Calls that must be sent to another worker: their callers send them again.
    resend: list[Call] = field(default_factory=list)
    # The worker must be killed (if it is still alive).
    kill: bool = False


class CallQueue:
    """The calls of one worker process, in the order they were sent; see the module docstring."""

    __slots__ = ("open", "retired", "_calls", "_sent")

    def __init__(self) -> None:
        # Takes new calls. False once the worker died, must be killed or retired: it never takes
        # one again.
        self.open = True
        # Closed by retire(): the calls it holds still run.
        self.retired = False
        self._calls: deque[Call] = deque()  # not final yet (or ABANDONED, still in the pipe)
        self._sent = 0

    def __len__(self) -> int:
        """Calls sent and not answered, abandoned ones included (they are still in the pipe)."""
        return len(self._calls)

    @property
    def sent(self) -> int:
        """How many calls were sent to this worker, whatever became of them."""
        return self._sent

    @property
    def drained(self) -> bool:
        """Retired and holding no call: the worker can be stopped (rule 5)."""
        return self.retired and not self._calls

    @property
    def running(self) -> Call | None:
        """The call the worker runs now, if any."""
        if self._calls and self._calls[0].state is CallState.RUNNING:
            return self._calls[0]
        return None

    def send(self) -> Call:
        """Queue a new call; RUNNING if nothing is queued ahead of it, SENT otherwise (rule 1)."""
        if not self.open:
            raise CallQueueError("cannot send a call to a worker that is closed (dead or to be killed)")
        call = Call(self._sent, CallState.SENT if self._calls else CallState.RUNNING)
        self._sent += 1
        self._calls.append(call)
        return call

    def answered(self) -> tuple[Call, Step]:
        """The worker's next answer arrived: it belongs to the running call (rule 2)."""
        call = self.running
        if call is None:
            raise CallQueueError(
                f"an answer arrived with no call running (queue: {list(self._calls)}): "
                f"the pipe is out of step"
            )
        call.state = CallState.ANSWERED
        self._calls.popleft()
        if not self._calls:
            return call, Step()
        following = self._calls[0]
        if following.state is CallState.ABANDONED:
            # Rule 4: the worker would run a call whose caller is gone.
            self._calls.popleft()
            return call, self._close(kill=True)
        following.state = CallState.RUNNING
        return call, Step(running=[following])

    def died(self) -> Step:
        """The worker died: the running call fails, the queued ones are sent again (rule 3)."""
        return self._close(kill=False)

    def lost(self, call: Call) -> Step:
        """Writing ``call`` failed: the worker died before it read the call, which goes elsewhere."""
        if call.done:
            return Step()
        if call not in self._calls:
            raise CallQueueError(f"{call!r} was not sent to this worker")
        call.state = CallState.SENT  # never delivered, so never started
        return self._close(kill=False)

    def retire(self) -> None:
        """Take no new call; the calls held run to their answers (rule 5)."""
        if self.open:
            self.open = False
            self.retired = True

    def stopped(self) -> Step:
        """The running call timed out, or the executor closed: kill the worker (rule 3)."""
        return self._close(kill=True)

    def cancel(self, call: Call) -> Step:
        """``call``'s caller was cancelled before its answer was read (rule 4)."""
        if call.done:
            return Step()
        if call not in self._calls:
            raise CallQueueError(f"{call!r} was not sent to this worker")
        if call.state is CallState.RUNNING:
            return self._close(kill=True)
        call.state = CallState.ABANDONED
        return Step()

    def _close(self, *, kill: bool) -> Step:
        self.open = False
        step = Step(kill=kill)
        calls, self._calls = self._calls, deque()
        for call in calls:
            if call.state is CallState.RUNNING:
                call.state = CallState.FAILED
            elif call.state is CallState.SENT:
                call.state = CallState.RESEND
                step.resend.append(call)
        return step
