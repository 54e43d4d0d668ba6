"""``ilora recommend``: rank items for users' histories with a trained run."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.prepared import SplitData
from ..devices import check_device, resolve_device
from ..errors import UserError, describe
from ..training.objectives import fused_scores
from .evaluate import encoder_candidate_scores, encoder_catalogue_scores


@dataclass
class RecommendConfig:
    run: str = ""  # run directory or name under $ILORA_HOME/runs
    user_history: Path | None = None  # JSON list of ids/titles, or JSONL of such lists (batch mode)
    candidates: Path | None = None  # JSON list of ids/titles to rank (default: encoder retrieval)
    top_k: int = 10  # recommendations per user
    retrieve: int = 20  # without --candidates: the encoder's top-N of the catalogue, reranked by the LLM
    normalize: str | None = None  # sum or mean of title token log-probs (default: the run's)
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N

    def validate(self) -> None:
        check_device(self.device)
        if not self.run:
            raise UserError("Pass --run RUN_DIR (a trained run).")
        if self.user_history is None:
            raise UserError("Pass --user-history FILE.json (a list of item ids or titles).")
        if self.normalize not in (None, "sum", "mean"):
            raise UserError(f"normalize must be sum or mean; got {self.normalize!r}.")
        if self.top_k < 1 or self.retrieve < 1:
            raise UserError("--top-k and retrieve must be at least 1.")


class ItemResolver:
    """Item ids or titles → ids: exact title first, then case-insensitive; clear errors otherwise.

    An entry is an id, a title, or an object that names its item by ``item_id``, ``id`` or ``title``; an object
    that gives several names must name one item with all of them."""

    NAMES = ("item_id", "id", "title")

    def __init__(self, titles: list[str]):
        self.titles = titles
        self.exact = {t: i for i, t in enumerate(titles)}
        self.folded: dict[str, list[int]] = {}
        for i, t in enumerate(titles):
            self.folded.setdefault(t.casefold(), []).append(i)

    def __call__(self, entry: Any, what: str = "history entry") -> int:
        """The id of ``entry``; ``what`` names it in the error sentences (a history entry, a candidate)."""
        if not isinstance(entry, dict):
            entry = _plain(entry)
            if isinstance(entry, bool) or not isinstance(entry, (int, str)):
                raise UserError(f"The {what} {describe(entry)} is neither an item id nor a title.")
            return self._resolve(entry)
        names = [key for key in self.NAMES if key in entry]
        if not names:
            raise UserError(f"The {what} {describe(entry)} has neither an item_id nor a title.")
        found = {}
        for key in names:
            value = _plain(entry[key])
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise UserError(f"The {what}'s {key} {describe(value)} is neither an item id nor a title.")
            found[key] = self._resolve(value)
        if len(set(found.values())) > 1:
            said = [
                f"title {entry[key]!r} is id {i}" if key == "title" else f"{key} {entry[key]!r} is {self.titles[i]!r}"
                for key, i in found.items()
            ]
            listed = ", ".join(said[:-1]) + " and " + said[-1]
            raise UserError(f"The {what} names different items: {listed}; give one of them.")
        return found[names[0]]

    def _resolve(self, entry: int | str) -> int:
        if isinstance(entry, int):
            if not 0 <= entry < len(self.titles):
                raise UserError(f"Unknown item id {describe(entry)}: ids run from 0 to {len(self.titles) - 1}.")
            return entry
        if entry in self.exact:
            return self.exact[entry]
        hits = self.folded.get(entry.casefold(), [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            names = ", ".join(f"{self.titles[i]!r} (id {i})" for i in hits)
            raise UserError(f"The title {entry!r} is ambiguous: it matches {names}; use an item id.")
        close = difflib.get_close_matches(entry, self.titles, n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise UserError(f"Unknown title {entry!r}{hint}.")


def _plain(entry: Any) -> Any:
    """A numpy integer as the Python int it holds (an id from an array, in the Python API); anything else as it is.
    numpy's booleans and floats are not integers here, as JSON's true and 1.0 are not ids."""
    return int(entry) if isinstance(entry, np.integer) else entry


class BadLine:
    """A line of a JSONL batch that is not a history: reported in its place when its turn comes."""

    def __init__(self, message: str):
        self.message = message


MAX_HISTORY_FILE = 256 << 20  # bytes: a single history is read whole (a JSONL batch is read line by line)
_CHUNK = 1 << 20  # characters read at a time where a file is scanned, not kept
_JSON_SPACE = " \t\n\r"  # what JSON allows around a document


def read_histories(path: Path, what: str = "history file") -> tuple[list[Any], bool]:
    """A JSON list (one user) or a JSONL file (one list per line: batch mode), as a list; see
    :func:`iter_histories`."""
    users, batch = iter_histories(path, what)
    return list(users), batch


def iter_histories(path: Path, what: str = "history file") -> tuple[Iterator[Any], bool]:
    """A JSON list (one user) or a JSONL file (one list per line: batch mode), and which of the two it is.

    The file is checked at once (present, UTF-8, not empty, a single history that is valid); a batch's lines are
    then read one at a time as the iterator is consumed, so that the first users are answered before the last are
    read and memory holds one line, not the file. In batch mode a line that is not a history becomes a
    :class:`BadLine` in its place, so that every other line still gets its recommendations (``recommend``
    reports the bad line by its number, on stdout and stderr, and exits 2 at the end); a single history that is
    not valid is refused at once.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The {what} {path} is {'a folder, not a file' if path.is_dir() else 'missing'}.")
    if path.stat().st_size > MAX_HISTORY_FILE:
        raise UserError(f"The {what} {path} is larger than {MAX_HISTORY_FILE >> 20} MiB; split it.")
    if not _utf8_with_content(path):
        raise UserError(f"The {what} {path} is empty.")
    found, doc = _single_document(path)
    if not found:
        return _batch_lines(path), True
    if history_problem(doc) is not None:
        raise UserError(f"{path}: {history_problem(doc)}.")
    return iter([doc]), False


def _open(path: Path):
    return open(path, encoding="utf-8-sig")  # a byte-order mark is allowed, as in the interactions reader


def _utf8_with_content(path: Path) -> bool:
    """Whether the file holds anything but whitespace; one sentence when it is not UTF-8 text (read in chunks)."""
    content = False
    try:
        with _open(path) as fh:
            while chunk := fh.read(_CHUNK):
                content = content or bool(chunk.strip())
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.") from None
    return content


def _single_document(path: Path) -> tuple[bool, Any]:
    """``(True, doc)`` where the whole file is one JSON document, else ``(False, None)`` (a JSONL batch).

    A batch is told from its first line that holds anything: a JSON value alone on it, followed by more than
    JSON whitespace, makes the file a batch without reading further than that. Where the first line is not a value
    by itself (a document written over several lines, or a batch whose first line is broken) the file is parsed
    whole, as a single document is."""
    with _open(path) as fh:
        first = next((line for line in fh if line.strip(_JSON_SPACE)), "")
        try:
            doc = json.loads(first)
        except RecursionError:
            raise UserError(f"{path} is nested too deeply to be a history.") from None
        except json.JSONDecodeError:
            pass
        else:
            rest = any(line.strip(_JSON_SPACE) for line in fh)
            return (False, None) if rest else (True, doc)
    try:
        return True, json.loads(path.read_text(encoding="utf-8-sig"))
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a history.") from None
    except json.JSONDecodeError:
        return False, None


def _batch_lines(path: Path) -> Iterator[Any]:
    """Each line of a JSONL batch as a history or a :class:`BadLine`, read as it is asked for. Lines are split as
    ``str.splitlines`` splits them, and numbered from 1; blank lines are skipped but counted."""
    lineno = 0
    with _open(path) as fh:
        for physical in fh:
            for line in physical.splitlines():
                lineno += 1
                if line.strip():
                    yield _history_line(line, path, lineno)


def _history_line(line: str, path: Path, lineno: int) -> Any:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine(f"{path} line {lineno} is not valid JSON ({exc.msg})")
    except RecursionError:
        return BadLine(f"{path} line {lineno} is nested too deeply to be a history")
    problem = history_problem(doc)
    return doc if problem is None else BadLine(f"{path} line {lineno}: {problem}")


def history_problem(doc: Any) -> str | None:
    """Why ``doc`` is not a history (a list of item ids or titles, or ``{"history": [...], "dataset": name}``)."""
    if isinstance(doc, list) or (isinstance(doc, dict) and isinstance(doc.get("history"), list)):
        return None  # {"history": [...], "dataset": optional name the ids refer to}
    return "a history must be a JSON list of item ids or titles"


_CHECK_KEYS = ("below", "metric", "default", "encoder", "p_value", "split", "rows")


class Recommender:
    def __init__(self, config: RecommendConfig):
        from ..training.run import load_run
        from .evaluate import resolve_run

        self.config = config
        self.run = load_run(resolve_run(config.run), device=resolve_device(config.device))
        self.resolve = ItemResolver(self.run.titles)
        self.max_history = int(self.run.info["dataset"]["max_history"])
        self.pad_id = int(self.run.info["dataset"]["pad_id"])
        # whether the default ranking was below the run's own encoder on its val catalogue (recorded by train)
        check = self.run.info.get("catalogue_check")
        self.check = None if not isinstance(check, dict) else {k: check.get(k) for k in _CHECK_KEYS}
        self.fixed = None
        if config.candidates is not None:
            cands, _ = read_histories(config.candidates, "candidates file")
            if len(cands) != 1 or not isinstance(cands[0], list):
                raise UserError("--candidates must be one JSON list of item ids or titles.")
            if not cands[0]:
                raise UserError("--candidates lists no items; give at least one, or leave it out to retrieve them.")
            self.fixed = [self.resolve(c, "candidate") for c in cands[0]]
            if len(set(self.fixed)) != len(self.fixed):
                raise UserError("--candidates lists an item twice.")

    def recommend(self, raw_history: list[Any] | dict[str, Any]) -> dict[str, Any]:
        """Recommendations for one history (a list of ids or titles, or ``{"history": [...]}``)."""
        history, notes = self.parse(raw_history)
        return self.rank([history], [notes])[0]

    def parse(self, raw_history: list[Any] | dict[str, Any]) -> tuple[list[int], list[str]]:
        """A history as item ids (the most recent ``max_history``), and notes for the user; bad input: UserError."""
        if isinstance(raw_history, BadLine):
            raise UserError(raw_history.message + ".")
        if isinstance(raw_history, dict):
            named = raw_history.get("dataset")
            trained = self.run.info["dataset"]["name"]
            if named is not None and named != trained:
                raise UserError(f"The history refers to the dataset {named!r}, but the run was trained on {trained!r}.")
            raw_history = raw_history["history"]
            if not isinstance(raw_history, list):
                raise UserError("A history must be a JSON list of item ids or titles.")
        if not raw_history:
            raise UserError("The history is empty: give at least one item.")
        history = [self.resolve(e) for e in raw_history]
        notes = []
        if len(history) > self.max_history:
            notes.append(f"the history has {len(history)} items; the model reads the most recent {self.max_history}")
            history = history[-self.max_history :]
        return history, notes

    def rank(
        self,
        histories: list[list[int]],
        notes: list[list[str]] | None = None,
        candidates: list[list[int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Recommendations for several parsed histories, scored together (each with its own gate).

        Candidates: each user's own ``candidates`` (resolved item ids, as many for every user) when given, else
        ``--candidates``; else, for a run whose head ranks the whole catalogue (the item head), every item outside
        the history; else the encoder's top ``retrieve`` items, reranked.
        """
        from .llm import score_rows

        notes = notes or [[] for _ in histories]
        run, fusion = self.run, self.run.fusion
        rows = self._rows(histories)
        given = candidates is not None or self.fixed is not None
        catalogue = not given and run.scorer.ranks_catalogue
        if catalogue:
            llm_out = score_rows(run, histories, np.zeros((len(histories), 1, 0), dtype=np.int64), catalogue=True)
            llm, enc = llm_out["catalogue"], encoder_catalogue_scores(run.model.encoder, rows)  # (B, N) each
            cands = np.broadcast_to(np.arange(llm.shape[1]), llm.shape)  # (B, N)
            where = "whole catalogue"
        else:
            cands = np.array(candidates) if candidates is not None else self._candidates(histories, rows)  # (B, C)
            llm_out = score_rows(run, histories, cands[:, None], len(histories), self.config.normalize or run.normalize)
            llm, enc = llm_out["draws"][:, 0], encoder_candidate_scores(run.model.encoder, rows, cands)  # (B, C)
            where = "given" if given else f"encoder top-{cands.shape[1]}"
        score = llm if fusion is None else fused_scores(llm, enc, fusion["llm"], fusion["encoder"])  # the default
        out = []
        for b, history in enumerate(histories):
            ranked = np.argsort(-score[b], kind="stable")
            if catalogue:  # the history is not recommended back
                ranked = ranked[~np.isin(ranked, history)]
            ranked = ranked[: self.config.top_k]
            out.append(
                {
                    "history": [{"item_id": i, "title": run.titles[i]} for i in history],
                    "recommendations": [
                        {
                            "item_id": int(cands[b, j]),
                            "title": run.titles[int(cands[b, j])],
                            "score": float(score[b, j]),
                            "llm_score": float(llm[b, j]),
                            "encoder_score": float(enc[b, j]),
                        }
                        for j in ranked
                    ],
                    "ranking": "llm" if fusion is None else "fused",  # fused: fusion["llm"]·llm_score + ...
                    "fusion": fusion,
                    "gate": [float(x) for x in llm_out["gates"][b]],
                    "candidates": where,
                    "below_encoder": self.check,
                    "notes": notes[b],
                }
            )
        return out

    def batch_key(self, history: list[int], candidates: list[int] | None = None) -> tuple:
        """Users with equal keys can share one :meth:`rank` call and get what each would get alone: candidates of
        the same kind, and as many."""
        if candidates is not None:
            return ("given", len(candidates))
        if self.fixed is not None or self.run.scorer.ranks_catalogue:
            return ("default",)
        return ("retrieved", min(self.config.retrieve, len(self.run.titles) - len(set(history))))

    def _candidates(self, histories: list[list[int]], rows: SplitData) -> np.ndarray:
        """(B, C) the given candidates for every user, or each user's encoder top-N (history excluded)."""
        if self.fixed is not None:
            return np.array([self.fixed] * len(histories))
        n = min(self.config.retrieve, min(len(self.run.titles) - len(set(h)) for h in histories))
        return self.run.model.encoder.top_items(rows.seq, rows.len_seq, n)  # (B, n)

    def _rows(self, histories: list[list[int]]) -> SplitData:
        """The histories as a split of right-padded rows (targets unknown: zeros)."""
        n = len(histories)
        return SplitData(
            "users",
            np.arange(n, dtype=np.int64),
            np.array([self._padded(h) for h in histories], dtype=np.int64),
            np.array([len(h) for h in histories], dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            None,
        )

    def _padded(self, history: list[int]) -> list[int]:
        return history + [self.pad_id] * (self.max_history - len(history))
