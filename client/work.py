"""Who holds each structure of a ``compute_many`` run: the rules the sync and asyncio
stream runs share.

A structure taken from the input is, at any moment, in exactly one place: the ledger's
queue (to be sent, or sent again), the ``pending`` map of one open stream (sent, not yet
answered), or nowhere (answered; the run has its result). Every move between places
happens under the run's one lock, so a stream that closes while a structure is on its
way into it cannot strand that structure: ``place`` finds the stream closed and puts the
structure back in the queue instead (the ``compute_many`` hang of issue 15 was a
structure added to a stream after that stream had handed back its pending ones).

Poison control: when a stream's server goes away (the stream failed with UNAVAILABLE and
the server no longer answers), every structure in flight on it is charged with a loss
and becomes a *suspect*. A suspect is only ever sent alone (a stream with a suspect in
flight takes nothing else), so when a server goes away again with a suspect in flight,
the suspect is the likely cause: after ``RetryPolicy.poison_after`` losses it is answered
with ``PoisonStructureError`` instead of being sent to the next server. Innocent
structures that rode along with it the first time are answered normally.

Structures that a live server answered with a retryable status (RESOURCE_EXHAUSTED: a
full queue; UNAVAILABLE: a server shutting down) go back to the queue with backoff, up to
``RetryPolicy.attempts`` answers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from crossfield.client.connection import RetryPolicy
from crossfield.v1 import inference_pb2


@dataclass(eq=False)
class Work:
    """One structure of the run with its request and its history."""

    index: int
    request: inference_pb2.ComputeRequest
    lost_on: list[str] = field(default_factory=list)  # servers that went away with it
    answers: int = 0  # retryable answers so far (RESOURCE_EXHAUSTED, ...)
    due: float = 0.0  # time.monotonic() before which it is not sent again

    @property
    def suspect(self) -> bool:
        return bool(self.lost_on)


@dataclass(eq=False)
class OpenStream:
    """The structures one open stream has sent and not yet had answered."""

    limit: int
    pending: dict[str, Work] = field(default_factory=dict)
    closed: bool = False

    def has_room(self) -> bool:
        """Room for a structure that is not a suspect."""
        if self.closed or len(self.pending) >= self.limit:
            return False
        return not any(work.suspect for work in self.pending.values())

    def can_take(self, work: Work) -> bool:
        return not (self.closed or self.pending) if work.suspect else self.has_room()


class Ledger:
    """The queue and counts of one run. Not thread-safe: callers hold their run's lock."""

    def __init__(self, retries: RetryPolicy) -> None:
        self.retries = retries
        self.queue: deque[Work] = deque()
        self.outstanding = 0  # taken from the input and not yet answered
        self.exhausted = False  # the input has no more structures

    @property
    def done(self) -> bool:
        return self.exhausted and self.outstanding == 0

    def next_for(self, stream: OpenStream, now: float) -> tuple[Work | None, float | None]:
        """The queued structure ``stream`` should send now, taken out of the queue; else
        (None, seconds until a queued one is due, or None if nothing in the queue waits
        for time alone)."""
        wait = None
        for work in self.queue:
            if not stream.can_take(work):
                continue
            if work.due <= now:
                self.queue.remove(work)
                return work, None
            wait = work.due - now if wait is None else min(wait, work.due - now)
        return None, wait

    def place(self, stream: OpenStream, work: Work) -> bool:
        """Hand ``work`` to ``stream``; False (and ``work`` back in the queue) when the
        stream closed after it was chosen."""
        if stream.closed:
            self.queue.appendleft(work)
            return False
        stream.pending[work.request.id] = work
        return True

    def answered(self, stream: OpenStream, request_id: str) -> Work | None:
        """The structure a response answers (None for an unknown or repeated id)."""
        return stream.pending.pop(request_id, None)

    def retry_later(self, work: Work, now: float) -> bool:
        """Queue a structure a live server could not take now, after a backoff; False when
        it has had its ``attempts`` and its answer stands."""
        work.answers += 1
        if work.answers >= self.retries.attempts:
            return False
        work.due = now + self.retries.delay(work.answers - 1)
        self.queue.append(work)
        return True

    def close(self, stream: OpenStream, lost: str | None) -> list[Work]:
        """A stream ended: its unanswered structures go back to the queue. ``lost``: the
        address of a server that went away with them; returns the structures that now
        count as poison (to be answered with an error, not sent again)."""
        stream.closed = True
        poisoned = []
        for work in stream.pending.values():
            if lost is not None:
                work.lost_on.append(lost)
            limit = self.retries.poison_after
            if limit is not None and len(work.lost_on) >= limit:
                poisoned.append(work)
            else:
                self.queue.append(work)
        stream.pending.clear()
        return poisoned
