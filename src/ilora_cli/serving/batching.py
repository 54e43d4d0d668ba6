"""Dynamic batching: users whose requests arrive close together are scored in one forward.

iLoRA's expert mixture is a per-user gate vector that the LoRA layers read per row, so users with different
mixtures share one batched forward at the cost of a single LoRA. The batcher collects users (from any number of
requests) for up to ``max_wait`` after the first one arrives, or until ``max_batch`` are waiting, and hands them
to one model thread. Only users with the same ``key`` are scored together (the same kind of candidates, as
many), so that each gets exactly what they would get alone.

The number of users waiting is bounded: a request that does not fit is refused at once (:class:`QueueFull`)
instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFull(Exception):
    """No room for the request's users: the caller answers 503 with ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One user of a request, parsed and checked: what the model needs, and where the answer goes."""

    payload: Any  # what the score function reads
    key: Hashable  # jobs with equal keys may be scored together
    future: asyncio.Future | None = None  # set by Batcher.submit
    arrived: float = 0.0  # loop time of submission


class Batcher:
    """Collects jobs on the event loop and scores them in batches on one model thread.

    ``score(jobs)`` runs on the model thread and returns one result per job, in order; an exception fails the
    jobs of that call only. ``on_batch(size, seconds)`` is called on the loop after every call.
    """

    def __init__(
        self,
        score: Callable[[list[Job]], list[Any]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ilora-model")
        self._pending: deque[Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._seconds_per_batch = 0.0  # running mean, for Retry-After

    @property
    def waiting(self) -> int:
        """Users submitted and not yet handed to the model."""
        return len(self._pending)

    def start(self) -> None:
        """Start collecting (on the running loop)."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name="ilora-batcher")

    async def stop(self) -> None:
        """Stop collecting; jobs still waiting fail; the model thread finishes its current call."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is stopping"))
        self.executor.shutdown(wait=True)

    async def in_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread (loading the model, for one), between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue all of ``jobs`` or none (:class:`QueueFull`); returns their futures."""
        if len(self._pending) + len(jobs) > self.max_queue:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        now = loop.time()
        for job in jobs:
            job.future, job.arrived = loop.create_future(), now
            self._pending.append(job)
        self._arrived.set()
        return [job.future for job in jobs]

    def abandon(self, jobs: list[Job]) -> None:
        """Forget jobs whose request gave up (timed out) so that they free their place at once."""
        gone = set(map(id, jobs))
        if any(id(j) in gone for j in self._pending):
            self._pending = deque(j for j in self._pending if id(j) not in gone)
        for job in jobs:
            if job.future is not None and not job.future.done():
                job.future.cancel()

    def retry_after(self) -> int:
        """Seconds until the users waiting now have been scored, by the mean batch time so far (at least 1)."""
        batches = math.ceil(max(1, len(self._pending)) / self.max_batch)
        return max(1, math.ceil(batches * self._seconds_per_batch))

    async def _collect_forever(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._collect()
            for group in _groups(batch):
                await self._score(group)

    async def _collect(self) -> list[Job]:
        """Wait until ``max_batch`` users are waiting or the first has waited ``max_wait_s``; take up to
        ``max_batch`` of them, in order of arrival."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrived + self.max_wait_s
        while len(self._pending) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._pending and len(batch) < self.max_batch:
            job = self._pending.popleft()
            if not job.future.done():  # a request that gave up meanwhile is not scored
                batch.append(job)
        return batch

    async def _score(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        try:
            results = await self.in_model_thread(lambda: self.score(jobs))
        except Exception as exc:  # delivered to each request, which decides what the client sees
            results = [exc] * len(jobs)
        seconds = time.perf_counter() - start
        mean = self._seconds_per_batch
        self._seconds_per_batch = seconds if mean == 0 else 0.9 * mean + 0.1 * seconds
        for job, result in zip(jobs, results):
            if job.future.done():  # timed out while it was being scored
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(len(jobs), seconds)


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs by key, each group in order of arrival, groups in order of their first job."""
    by_key: dict[Hashable, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(job.key, []).append(job)
    return list(by_key.values())
