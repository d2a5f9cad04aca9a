"""The engine on a thread of its own, for asyncio callers.

Only the engine thread touches the engine: `submit` and `cancel` put commands in an inbox that
the thread drains between steps, so the event loop never waits for a step (a lock shared with
a thread that steps back to back starves the loop, and every stream with it). Events a step
produces (text, the finished output) go to the asyncio queue of their request, all of a step's
at once: one `call_soon_threadsafe` per event loop and step, since each call wakes the loop
and the engine thread then waits for the GIL while the loop runs (a post per token cost a
step 2-3 % at 2 clients). A request's first text goes at once, so its time to first token
does not wait for the step's round. A step that raises fails the requests it held with that
message and the engine carries on: one bad request never takes the server down.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, Request, RoundRecord
from ..stats import RequestOutput


class QueueFull(RuntimeError):
    """More requests are waiting than the server's queue holds."""


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    output: RequestOutput | None = None


class AsyncEngine:
    """Submit requests from asyncio and read their events; the loop runs on a thread."""

    def __init__(self, pipe: Any, *, max_batch: int, capacity: int, max_queue: int,
                 target_only: bool = False, metrics: Any = None) -> None:
        gamma = 0 if target_only else pipe.gamma
        scheduler = pipe.make_scheduler() if gamma else None
        self.pipe, self.max_queue, self.metrics = pipe, max_queue, metrics
        self.engine = Engine(pipe, slots=max_batch, capacity=capacity, gamma=gamma,
                             scheduler=scheduler, on_text=self._on_text,
                             on_finish=self._on_finish, on_round=self._on_round)
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: list[tuple[tuple[asyncio.AbstractEventLoop, asyncio.Queue], Event]] = []
        self._streaming: set[int] = set()  # requests whose first text went out
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> tuple[int, asyncio.Queue]:
        """Queue a request (ValueError for one the engine refuses, QueueFull when full)."""
        self.engine.check(request)
        waiting, running = self.load()
        free = len(self.engine.slots) - running
        if waiting >= self.max_queue + free:
            raise QueueFull(f"all {len(self.engine.slots)} slots are busy and "
                            f"{waiting - free} requests wait")
        request_id = next(self._ids)
        events: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), events)
        self._inbox.put(("submit", request_id, request))
        self._wake.set()
        return request_id, events

    def cancel(self, request_id: int) -> None:
        """End the request and free its slot; its output (so far) comes as "done"."""
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    def load(self) -> tuple[int, int]:
        """(waiting, running) requests, as far as the engine thread has taken them in."""
        return len(self.engine.waiting) + self._inbox.qsize(), self.engine.running

    def _loop(self) -> None:
        while not self._stopping:
            self._take_commands()
            busy = self.engine.has_work()
            if busy:
                try:
                    self.engine.step()
                except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                    self._fail_all(exc)
            self._deliver()
            if self.metrics is not None:
                self.metrics.load(*self.load())
            if not busy:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def _take_commands(self) -> None:
        while True:
            try:
                command, request_id, request = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "submit":
                self.engine.submit(request, request_id)
            else:
                self.engine.cancel(request_id)

    def _fail_all(self, exc: Exception) -> None:
        held = [w[0] for w in self.engine.waiting]
        held += [slot.request_id for slot in self.engine.slots if slot is not None]
        for request_id in held:
            target = self._queues.pop(request_id, None)
            self.engine.cancel(request_id)
            if target is not None:
                self._post(target, Event("error", text=f"generation failed: {exc}"))

    def _post(self, target: tuple[asyncio.AbstractEventLoop, asyncio.Queue],
              event: Event) -> None:
        self._outbox.append((target, event))

    def _deliver(self) -> None:
        """The events posted since the last delivery, one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for (loop, events), event in self._outbox:
            by_loop.setdefault(loop, []).append((events, event))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _on_text(self, request_id: int, text: str) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        if request_id in self._streaming:
            self._post(target, Event("text", text=text))
        else:
            self._streaming.add(request_id)
            loop, events = target
            loop.call_soon_threadsafe(events.put_nowait, Event("text", text=text))

    def _on_finish(self, request_id: int, output: RequestOutput) -> None:
        self._streaming.discard(request_id)
        target = self._queues.pop(request_id, None)
        if target is not None:
            self._post(target, Event("done", output=output))

    def _on_round(self, record: RoundRecord) -> None:
        if self.metrics is not None:
            self.metrics.round(record)


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for events, event in items:
        events.put_nowait(event)
