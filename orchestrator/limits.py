"""Limits on upload streams at ingest: how many one owner may hold, and how long one may stay silent.

One owner, or one stalled client, must not block ingest for everyone. Every upload stream takes a
slot of its owner's before it reads a single message (refused at once with ``TooManyStreams``
beyond ``ingest.max_streams_per_owner``), and a watchdog ends any stream that has waited for its
client longer than ``ingest.stream_idle_timeout_s``: the handler's read then raises, the store frees
the shard (what was verified is kept), and the slot goes back. Only time spent *waiting for the
client* counts as idle; time the server spends writing or verifying does not.

A stream is ended with the transport's cancel (``grpc.ServicerContext.cancel``, callable from any
thread): its client sees CANCELLED, which the owner's agent treats as "ask where to resume".
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from orchestrator.errors import TooManyStreams

log = logging.getLogger("orchestrator.ingest")


class Stream:
    """One upload stream's slot, held from its first byte to its end (use as a context manager)."""

    def __init__(self, limits: StreamLimits, owner: str, cancel: Callable[[], None]) -> None:
        self.owner = owner
        self.what = "upload stream"  # the servicer names the shard once the header arrived
        self._limits = limits
        self._cancel = cancel
        self._waiting_since: float | None = None  # monotonic time the read of the next message began
        self.ended_because: str | None = None  # "idle" or "superseded" once ended from outside

    def messages(self, requests: Iterator) -> Iterator:
        """The client's messages, one by one; the wait for each is what the idle timeout measures."""
        while True:
            self._waiting_since = time.monotonic()
            try:
                message = next(requests, None)
            finally:
                self._waiting_since = None
            if message is None:
                return
            yield message

    def idle_for(self, now: float) -> float:
        since = self._waiting_since
        return 0.0 if since is None else now - since

    def end(self, because: str) -> None:
        """End the stream from outside (any thread); its handler unwinds and frees what it held."""
        if self.ended_because is None:
            self.ended_because = because
            log.info("ending %s of owner %s: %s", self.what, self.owner, because)
            self._cancel()

    def supersede(self) -> None:
        self.end("superseded by a newer stream of the same shard")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self._limits._release(self)


class StreamLimits:
    """Per-owner slots for upload streams and the idle watchdog (one thread for all streams)."""

    def __init__(self, max_streams_per_owner: int, idle_timeout_s: float) -> None:
        self.max_streams_per_owner = max_streams_per_owner
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Condition()  # notified whenever a stream opens or closes
        self._open: dict[str, set[Stream]] = {}
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="ingest-idle-watchdog")
        self._watchdog.start()

    def open(self, owner: str, cancel: Callable[[], None]) -> Stream:
        """A slot for a new stream of ``owner``, or TooManyStreams (retryable: one of them ends soon)."""
        with self._lock:
            held = self._open.setdefault(owner, set())
            if len(held) >= self.max_streams_per_owner:
                raise TooManyStreams(
                    f"owner {owner} already has {len(held)} upload streams open, the most it may "
                    f"(ingest.max_streams_per_owner); retry when one ends (a silent one is ended after "
                    f"{self.idle_timeout_s:g} s)")
            stream = Stream(self, owner, cancel)
            held.add(stream)
            self._lock.notify_all()
            return stream

    def open_streams(self, owner: str) -> int:
        with self._lock:
            return len(self._open.get(owner, ()))

    def wait_for_streams(self, owner: str, count: int, timeout_s: float) -> bool:
        """Whether ``owner`` came to hold exactly ``count`` streams within ``timeout_s``."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._open.get(owner, ())) == count, timeout_s)

    def _release(self, stream: Stream) -> None:
        with self._lock:
            held = self._open.get(stream.owner, set())
            held.discard(stream)
            if not held:
                self._open.pop(stream.owner, None)
            self._lock.notify_all()

    def _watch(self) -> None:
        tick = min(1.0, self.idle_timeout_s / 4)  # a silent stream ends within 1.25 x the timeout
        while not self._stopped.wait(tick):
            now = time.monotonic()
            with self._lock:
                idle = [s for held in self._open.values() for s in held if s.idle_for(now) > self.idle_timeout_s]
            for stream in idle:
                stream.end(f"sent nothing for {self.idle_timeout_s:g} s (ingest.stream_idle_timeout_s)")

    def close(self) -> None:
        self._stopped.set()
        self._watchdog.join()


class Periodic:
    """Run ``action`` every ``interval_s`` on a thread of its own until closed; errors are logged,
    never fatal. ``runs`` counts completed runs (tests wait on it with :meth:`wait_for_runs`)."""

    def __init__(self, name: str, interval_s: float, action: Callable[[], object]) -> None:
        self.interval_s = interval_s
        self.runs = 0
        self._action = action
        self._done = threading.Condition()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._action()
            except Exception:  # a failing sweep must not end the sweeper; the next run tries again
                log.exception("%s failed", self._thread.name)
            with self._done:
                self.runs += 1
                self._done.notify_all()

    def wait_for_runs(self, count: int, timeout_s: float) -> bool:
        with self._done:
            return self._done.wait_for(lambda: self.runs >= count, timeout_s)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
