"""Variants of a prepared dataset for ablations: other candidate counts, fewer training users, another catalogue.

None of them changes the prepared dataset's own splits or its stored 20-candidate draws:

- :func:`candidate_draws` gives each val/test row sets of another size. A larger set is the stored draw plus
  new uniform negatives (outside the history, the target and the stored set), shuffled; a smaller one is the
  target and the first negatives of the stored draw. So 20, 30 and 40 candidates differ only by the added
  negatives. Larger sets are drawn once, seeded per row, and stored beside the dataset
  (``extra_candidates/<split>-c<N>.safetensors``).
- :func:`user_subset` writes a copy of the dataset whose train split keeps a seeded fraction of the training
  users (all their rows); val and test, with their candidate draws, stay identical.
- :func:`translate_split` expresses the rows of one dataset in another dataset's catalogue by title, for
  cross-domain evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..console import labelled
from ..errors import UserError
from .candidates import SPLIT_CODES
from .checks import sha256_arrays
from .holdout import train_users
from .prepared import PreparedDataset, SplitData, history_histogram

EXTRA_DIR = "extra_candidates"
_EXTRA_STREAM = 0xCA4D  # keeps the extra negatives' random stream apart from the stored draws'
_CROSS_STREAM = 0xC205


# -- other candidate counts --------------------------------------------------------------------------
def candidate_draws(dataset: PreparedDataset, split: str, n_candidates: int, store: bool = True) -> np.ndarray:
    """(N, draws, n_candidates) frozen candidate sets of every row of ``split``, built on the stored draws."""
    stored = dataset.split(split)
    if stored.candidates is None:
        raise UserError(f"The {split} split of {dataset.name!r} has no stored candidate draws.")
    base = stored.candidates  # (N, D, C0)
    c0 = base.shape[2]
    if n_candidates < 2:
        raise UserError(f"An evaluation needs at least 2 candidates; got {n_candidates}.")
    if n_candidates == c0:
        return base
    if n_candidates < c0:
        return _fewer(base, stored.next, n_candidates)
    path = dataset.path / EXTRA_DIR / f"{split}-c{n_candidates}.safetensors"
    checksum = dataset.meta["checksums"][split]
    cached = _read_extra(path, checksum, base.shape)
    if cached is not None:
        return cached
    extra = _more(stored, dataset.n_items, n_candidates, int(dataset.meta["seed"]))
    if store:
        _write_extra(path, extra, stored.sample_id, checksum, int(dataset.meta["seed"]))
    return extra


def _fewer(base: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """The target and the first ``n - 1`` negatives of each stored draw, in their stored order."""
    n_rows, draws, _ = base.shape
    out = np.empty((n_rows, draws, n), dtype=np.int64)
    for i in range(n_rows):
        for d in range(draws):
            row = base[i, d]
            keep = row == target[i]
            keep[np.flatnonzero(~keep)[: n - 1]] = True
            out[i, d] = row[keep]
    return out


def _more(split: SplitData, n_items: int, n: int, seed: int) -> np.ndarray:
    """Each stored draw plus ``n - C0`` uniform negatives outside the history, the target and the draw."""
    base = split.candidates  # (N, D, C0)
    n_rows, draws, c0 = base.shape
    out = np.empty((n_rows, draws, n), dtype=np.int64)
    for i in range(n_rows):
        history = set(split.seq[i, : split.len_seq[i]].tolist())
        rng = np.random.default_rng([seed, SPLIT_CODES[split.name], int(split.sample_id[i]), n, _EXTRA_STREAM])
        for d in range(draws):
            excluded = history | set(base[i, d].tolist())
            pool = np.setdiff1d(np.arange(n_items), np.fromiter(excluded, dtype=np.int64))
            if len(pool) < n - c0:
                raise UserError(
                    f"The catalogue has {n_items} items: too few for {n} candidates outside a history of "
                    f"{len(history)} items; ask for fewer candidates."
                )
            added = rng.choice(pool, size=n - c0, replace=False)
            out[i, d] = rng.permutation(np.concatenate([base[i, d], added]))
    return out


def _read_extra(path: Path, checksum: str, base_shape: tuple[int, ...]) -> np.ndarray | None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            cands = fh.get_tensor("candidates")
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # damaged (truncated, edited): drawn again, and stored again in its place
    if meta.get("split_checksum") != checksum or cands.shape[:2] != base_shape[:2] or cands.ndim != 3:
        return None  # drawn for another version of the split: draw again
    return cands.astype(np.int64)


def _write_extra(path: Path, cands: np.ndarray, sample_id: np.ndarray, checksum: str, seed: int) -> None:
    from safetensors.numpy import save_file

    meta = {"split_checksum": checksum, "seed": str(seed), "n_candidates": str(cands.shape[2])}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"candidates": np.ascontiguousarray(cands), "sample_id": sample_id}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except PermissionError:
        labelled("note", f"could not store the {cands.shape[2]}-candidate draws in {path.parent}.")


# -- fewer training users ----------------------------------------------------------------------------
def users_kept(fraction: float, n_users: int, dataset_name: str) -> int:
    """How many of ``n_users`` training users a train ``fraction`` keeps; one sentence when it keeps none."""
    kept = int(round(fraction * n_users))
    if kept < 1:
        raise UserError(
            f"A train fraction of {fraction:g} keeps {kept} of the {n_users:,} training users of {dataset_name!r}; "
            f"give at least {1 / n_users:.3g} (one user)."
        )
    return kept


def user_subset(dataset: PreparedDataset, fraction: float, seed: int, out_dir: Path) -> PreparedDataset:
    """A copy of ``dataset`` in ``out_dir`` whose train split keeps a seeded ``fraction`` of the training users.

    Val and test (rows and candidate draws) are copied unchanged, so results stay comparable on the same rows.
    An existing copy made from the same dataset with the same settings is reused.
    """
    from datasets import load_from_disk

    from ..home import atomic_directory

    if not 0 < fraction <= 1:
        raise UserError(f"A train fraction must be in (0, 1]; got {fraction}.")
    out_dir = Path(out_dir)
    wanted = {"name": dataset.name, "checksum": dataset.checksum, "train_fraction": fraction, "seed": seed}
    if (out_dir / "meta.json").is_file():
        existing = PreparedDataset(out_dir)
        if {k: existing.meta.get("derived_from", {}).get(k) for k in wanted} == wanted:
            return existing
    users, how = train_users(dataset)
    distinct = np.unique(users)
    n_keep = users_kept(fraction, len(distinct), dataset.name)
    kept_users = np.random.default_rng([seed, 0x05E45]).permutation(distinct)[:n_keep]
    rows = np.flatnonzero(np.isin(users, kept_users))
    train = load_from_disk(str(dataset.path / "train")).select(rows)
    meta = json.loads(json.dumps(dataset.meta))
    split = dataset.split("train")
    seq, len_seq, nxt = split.seq[rows], split.len_seq[rows], split.next[rows]
    meta["name"] = f"{dataset.name}-users{fraction:g}"
    meta["splits"]["train"] = len(rows)
    meta["history_lengths"]["train"] = history_histogram(len_seq, dataset.max_history)
    meta["checksums"]["train"] = sha256_arrays(seq, len_seq, nxt)
    meta["checksum"] = _sha256_text(json.dumps(meta["checksums"], sort_keys=True))
    meta["derived_from"] = {
        **wanted,
        "users_kept": int(n_keep),
        "users_total": int(len(distinct)),
        "users_from": how,
    }
    meta["notes"] = list(meta.get("notes", [])) + [
        f"Train split: {n_keep} of {len(distinct)} training users ({len(rows):,} rows) of {dataset.name!r}, "
        f"seed {seed}; users {how}."
    ]
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for name in ("items", *(s for s in dataset.splits if s != "train")):
            shutil.copytree(dataset.path / name, tmp / name)
        train.save_to_disk(str(tmp / "train"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return PreparedDataset(out_dir)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


# -- another catalogue -------------------------------------------------------------------------------
def title_map(source: list[str], target: list[str]) -> tuple[np.ndarray, int]:
    """(len(source),) the target id of each source title (−1 where none), matched exactly, then ignoring case;
    and how many matched only ignoring case. A case-insensitive key shared by several target titles matches
    nothing."""
    exact = {t: i for i, t in enumerate(target)}
    folded: dict[str, int] = {}
    for i, t in enumerate(target):
        key = t.casefold()
        folded[key] = -1 if key in folded else i
    out = np.full(len(source), -1, dtype=np.int64)
    by_case = 0
    for i, t in enumerate(source):
        if t in exact:
            out[i] = exact[t]
        elif folded.get(t.casefold(), -1) >= 0:
            out[i] = folded[t.casefold()]
            by_case += 1
    return out, by_case


def translate_split(
    rows_from: PreparedDataset, split: str, catalogue: PreparedDataset, n_candidates: int, draws: int, seed: int
) -> tuple[SplitData, dict[str, Any]]:
    """The rows of ``rows_from``'s ``split`` written in ``catalogue``'s item ids, and what was kept.

    A row is kept when its target and at least ``min_history`` of its history items have a title in the
    catalogue; history items without one are dropped (order kept). Candidates are drawn again, seeded per
    row, among the items the two catalogues share: the target plus ``n_candidates - 1`` negatives outside the
    row's history.
    """
    mapping, by_case = title_map(rows_from.titles, catalogue.titles)
    rows = rows_from.split(split)
    shared = np.unique(mapping[mapping >= 0])
    min_history = int(rows_from.meta.get("min_history", 3))
    width = catalogue.max_history
    seqs, lens, targets, ids, dropped = [], [], [], [], 0
    for i in range(len(rows)):
        target = mapping[rows.next[i]]
        history = mapping[rows.seq[i, : rows.len_seq[i]]]
        dropped += int((history < 0).sum())
        history = history[history >= 0][-width:]
        if target < 0 or len(history) < min_history:
            continue
        seqs.append(np.concatenate([history, np.full(width - len(history), catalogue.pad_id)]))
        lens.append(len(history))
        targets.append(target)
        ids.append(rows.sample_id[i])
    if not ids:
        raise UserError(
            f"No {split} row of {rows_from.name!r} has its target and {min_history} history items in the catalogue "
            f"of {catalogue.name!r} ({len(shared)} shared titles): nothing to evaluate across domains."
        )
    out = SplitData(
        name=f"{split}@{catalogue.name}",
        sample_id=np.array(ids, dtype=np.int64),
        seq=np.stack(seqs).astype(np.int64),
        len_seq=np.array(lens, dtype=np.int64),
        next=np.array(targets, dtype=np.int64),
        candidates=None,
    )
    out.candidates = _shared_candidates(out, shared, n_candidates, draws, seed, SPLIT_CODES.get(split, 9))
    report = {
        "rows_from": rows_from.name,
        "catalogue": catalogue.name,
        "split": split,
        "rows": len(rows),
        "rows_kept": len(out),
        "items": rows_from.n_items,
        "items_mapped": int((mapping >= 0).sum()),
        "items_mapped_ignoring_case": by_case,
        "history_items_dropped": dropped,
        "candidate_pool": int(len(shared)),
    }
    return out, report


def _shared_candidates(split: SplitData, pool: np.ndarray, n: int, draws: int, seed: int, code: int) -> np.ndarray:
    out = np.empty((len(split), draws, n), dtype=np.int64)
    for i in range(len(split)):
        excluded = np.append(split.seq[i, : split.len_seq[i]], split.next[i])
        negatives = np.setdiff1d(pool, excluded)
        if len(negatives) < n - 1:
            raise UserError(
                f"Only {len(pool)} items are shared by the two catalogues: too few for {n} candidates; "
                "ask for fewer candidates."
            )
        rng = np.random.default_rng([seed, code, int(split.sample_id[i]), n, _CROSS_STREAM])
        for d in range(draws):
            chosen = rng.choice(negatives, size=n - 1, replace=False)
            out[i, d] = rng.permutation(np.append(chosen, split.next[i]))
    return out
