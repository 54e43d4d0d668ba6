"""The run behind the HTTP API: loads it, checks each user's request, and answers users in batches.

Nothing here knows about HTTP: a request's user becomes a :class:`~.batching.Job` (or a :class:`UserError`
with one sentence), and the answers are what ``ilora recommend --json`` prints for that user.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import err, labelled
from ..errors import UserError, describe
from .batching import Batcher, Job
from .config import ServeConfig


class Timeout(Exception):
    """A request was not answered within ``request_timeout_s``."""


class NotReady(Exception):
    """The model is still loading (or failed to)."""


@dataclass
class UserRequest:
    """One user's part of a request, as sent (ids and titles not resolved yet)."""

    history: list[Any]
    candidates: list[Any] | None = None
    top_k: int | None = None
    dataset: str | None = None


@dataclass
class Parsed:
    """A user's request resolved to item ids: what the model thread reads."""

    history: list[int]
    notes: list[str]
    candidates: list[int] | None
    top_k: int


class Service:
    """Loads the run on the model thread, then answers users through the batcher."""

    def __init__(self, config: ServeConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.recommender = None  # set once loaded
        self.ready = False  # loaded and a warm-up request answered
        self.batcher = Batcher(self._score, config.max_batch, config.max_wait_ms / 1000, config.max_queue)
        self._loading: asyncio.Task | None = None

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self, on_fatal: Callable[[int], None]) -> None:
        """Start batching and load the run in the background; ``on_fatal(exit_code)`` if loading fails."""
        self.batcher.start()
        self._loading = asyncio.get_running_loop().create_task(self._load(on_fatal), name="ilora-load")

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        await self.batcher.stop()

    async def _load(self, on_fatal: Callable[[int], None]) -> None:
        start = time.perf_counter()
        try:
            self.recommender = await self.batcher.in_model_thread(self._build)
            loaded = time.perf_counter()
            warm_up = self.job(UserRequest(history=[0]))
            await self.batcher.in_model_thread(lambda: self._score([warm_up]))  # not queued: nobody waits for it
        except UserError as exc:
            labelled("error", str(exc), style="bold red")
            on_fatal(exc.exit_code)
            return
        except Exception:
            err.print_exception()
            on_fatal(1)
            return
        self.ready = True
        err.print(
            f"Ready: loaded {self.run_dir.name} in {loaded - start:.1f} s; a warm-up request took "
            f"{time.perf_counter() - loaded:.2f} s.",
            highlight=False,
        )

    def _build(self):
        from ..evaluation.recommend import RecommendConfig, Recommender

        c = self.config
        # Every user is ranked up to max_top_k and cut to their own top_k, so users with different top_k share
        # a batch. The history comes with each request; user_history is only a stand-in.
        rec_config = RecommendConfig(
            run=str(self.run_dir),
            user_history=Path("<given per request>"),
            top_k=c.max_top_k,
            retrieve=c.retrieve,
            normalize=c.normalize,
            device=c.device,
        )
        rec_config.validate()
        return Recommender(rec_config)

    # -- requests --------------------------------------------------------------------------------------------
    def job(self, user: UserRequest) -> Job:
        """A user's request as a job for the batcher; bad input: :class:`UserError` with one sentence."""
        if self.recommender is None:
            raise NotReady()
        c = self.config
        top_k = c.top_k if user.top_k is None else user.top_k
        if not 1 <= top_k <= c.max_top_k:
            raise UserError(f"top_k must be between 1 and {c.max_top_k}; got {top_k}.")
        if len(user.history) > c.max_history_items:
            raise UserError(
                f"The history has {len(user.history)} items; this server accepts at most {c.max_history_items}."
            )
        for entry in [*user.history, *(user.candidates or [])]:
            _check_title_length(entry)
        raw = user.history if user.dataset is None else {"history": user.history, "dataset": user.dataset}
        history, notes = self.recommender.parse(raw)
        candidates = None if user.candidates is None else self._candidates(user.candidates)
        parsed = Parsed(history, notes, candidates, top_k)
        return Job(parsed, self.recommender.batch_key(history, candidates))

    def _candidates(self, raw: list[Any]) -> list[int]:
        c = self.config
        if not raw:
            raise UserError("candidates lists no items; give at least one, or leave it out to retrieve them.")
        if len(raw) > c.max_candidates:
            raise UserError(f"candidates lists {len(raw)} items; this server accepts at most {c.max_candidates}.")
        ids = []
        for entry in raw:
            named = isinstance(entry, dict) and ({"item_id", "id", "title"} & set(entry))
            if isinstance(entry, bool) or not (isinstance(entry, (int, str)) or named):
                raise UserError(f"The candidate {describe(entry)} is neither an item id nor a title.")
            ids.append(self.recommender.resolve(entry, "candidate"))
        seen = set()
        for i in ids:
            if i in seen:
                raise UserError(f"candidates lists {self.recommender.run.titles[i]!r} (id {i}) twice.")
            seen.add(i)
        return ids

    async def answer_jobs(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """The answers of jobs, in order; :class:`~.batching.QueueFull`, :class:`Timeout`, or what scoring
        raised."""
        futures = self.batcher.submit(jobs)
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            self.batcher.abandon(jobs)
            raise Timeout() from None

    def _score(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """On the model thread: one ``rank`` call for jobs of one key, each answer cut to its own top_k."""
        users: list[Parsed] = [j.payload for j in jobs]
        given = None if users[0].candidates is None else [u.candidates for u in users]
        out = self.recommender.rank([u.history for u in users], [list(u.notes) for u in users], given)
        return [_cut(doc, u.top_k) for doc, u in zip(out, users)]

    # -- the run ---------------------------------------------------------------------------------------------
    def run_document(self) -> dict[str, Any]:
        """What ``GET /v1/run`` returns: the run's model, data and recorded metrics, and this server's limits."""
        from ..card import EVALUATIONS
        from ..training.run import read_info

        info = read_info(self.run_dir)
        evaluations = self.run_dir / EVALUATIONS
        ex = info["experts"]
        c = self.config
        return {
            "run": self.run_dir.name,  # the name only: where the run lies on the server's disk is not the client's
            "ready": self.ready,
            "backbone": _public_backbone(info["backbone"]),
            "experts": ex["experts"],
            "rank": ex["rank"],
            "gate": ex["gate"],
            "head": ex.get("head", "title"),
            "prompt": info.get("prompt"),
            "objective": info.get("objective"),
            "normalize": c.normalize or info.get("normalize", "sum"),
            "fusion": info.get("fusion"),
            "dataset": info["dataset"],
            "training": info.get("training", {}),
            "evaluations": json.loads(evaluations.read_text(encoding="utf-8")) if evaluations.is_file() else {},
            "serving": {
                "max_batch": c.max_batch,
                "max_wait_ms": c.max_wait_ms,
                "max_queue": c.max_queue,
                "request_timeout_s": c.request_timeout_s,
                "top_k": c.top_k,
                "max_top_k": c.max_top_k,
                "max_users": c.max_users,
                "max_history_items": c.max_history_items,
                "max_candidates": c.max_candidates,
                "retrieve": c.retrieve,
            },
        }


MAX_TITLE = 1000  # characters; longer is no title: refused before the closest matches are searched for it


def _check_title_length(entry: Any) -> None:
    title = entry.get("title") if isinstance(entry, dict) else entry
    if isinstance(title, str) and len(title) > MAX_TITLE:
        raise UserError(f"A title of {len(title):,} characters is longer than any this server looks up ({MAX_TITLE}).")


def _public_backbone(backbone: dict[str, Any]) -> dict[str, Any]:
    """The backbone as ``GET /v1/run`` shows it: a hub id as it is, a local folder by its name alone (where it
    lies on the server's disk is not the client's)."""
    name = str(backbone.get("name", ""))
    return {**backbone, "name": Path(name).name} if Path(name).is_absolute() else backbone


def _cut(doc: dict[str, Any], top_k: int) -> dict[str, Any]:
    """``doc`` with its recommendations cut to the first ``top_k`` (they are ranked best first)."""
    return {**doc, "recommendations": doc["recommendations"][:top_k]}
