"""Which training rows the encoder fits, and which the second stage (LLM, head, fusion) learns from.

A frozen encoder scores the rows it was trained on almost perfectly (SASRec on LastFM: HR@1 0.97 on its own
training rows, 0.40 on new users), so a second stage trained on those rows learns that the encoder is always
right. Like every stacked model, the second stage must learn on rows the first stage did not fit. The
*holdout* divides the train split:

- ``users:F`` — a seeded fraction F of the training users: all their rows go to the second stage and none to
  the encoder, which therefore meets them as it meets validation users (never seen);
- ``last:N`` — the last N rows (the latest transitions) of every training user go to the second stage; the
  encoder fits the earlier ones; ``last:N:F`` does so for a seeded fraction F of the users only, and the
  encoder fits every row of the others;
- ``none`` — the encoder fits every row, and the second stage trains on the same rows.

The division is a pure function of the train split, the spec and the dataset's seed, so ``encode`` and
``train`` compute the same rows independently; the encoder records a checksum of them, which ``train``
checks. Users come from the dataset's user ids, or, for formats without them (the LLaRA files), from the
chaining of consecutive prefix windows (:func:`train_users`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

DEFAULT_HOLDOUT = "users:0.2+last:5"  # measured against the alternatives: docs/BENCHMARKS.md, *The holdout*
NO_HOLDOUT = "none"
_USER_STREAM = 0x5E7A  # keeps the holdout's random stream apart from the other seeded draws
_FRACTION = r"(0?\.\d+|0|1(?:\.0*)?)"
_SPEC = re.compile(rf"^users:{_FRACTION}(?:\+last:(\d+))?$|^last:(\d+)(?::{_FRACTION})?$|^(none)$")
_SPEC_HELP = (
    "users:F (a seeded fraction 0 < F < 1 of the training users, never seen by the encoder), users:F+last:N (the "
    "same users, of whose rows the second stage takes the last N), last:N or last:N:F (the last N ≥ 1 rows of "
    "every user, or of a fraction F of the users) or none"
)


@dataclass(frozen=True)
class Holdout:
    """A parsed holdout spec: ``users:F``, ``users:F+last:N``, ``last:N``, ``last:N:F`` or ``none``."""

    method: str  # users (held users unseen by the encoder), last (held users' last rows unseen), none
    users: float = 1.0  # the fraction of the training users held out
    last: int | None = None  # the held users' last N rows go to the second stage (None: all their rows)

    @classmethod
    def parse(cls, spec: str | None) -> Holdout:
        text = str(spec if spec is not None else DEFAULT_HOLDOUT).strip().lower()
        m = _SPEC.match(text)
        if m is None:
            raise UserError(f"holdout must be {_SPEC_HELP}; got {spec!r}.")
        if m.group(5):
            return cls(NO_HOLDOUT)
        if m.group(1) is not None:
            fraction = float(m.group(1))
            if not 0 < fraction < 1:
                raise UserError(f"holdout users:F needs 0 < F < 1 (some users for each stage); got {spec!r}.")
            last = int(m.group(2)) if m.group(2) is not None else None
            if last is not None and last < 1:
                raise UserError(f"holdout users:F+last:N needs N ≥ 1; got {spec!r}.")
            return cls("users", fraction, last)
        n = int(m.group(3))
        users = float(m.group(4)) if m.group(4) is not None else 1.0
        if n < 1:
            raise UserError(f"holdout last:N needs N ≥ 1; got {spec!r}.")
        if not 0 < users <= 1:
            raise UserError(f"holdout last:N:F needs 0 < F ≤ 1 (the fraction of the users); got {spec!r}.")
        return cls("last", users, n)

    @property
    def spec(self) -> str:
        if self.method == "users":
            return f"users:{self.users:g}" + (f"+last:{self.last}" if self.last is not None else "")
        if self.method == "last":
            return f"last:{self.last}" + (f":{self.users:g}" if self.users < 1 else "")
        return NO_HOLDOUT

    @property
    def active(self) -> bool:
        return self.method != NO_HOLDOUT


def train_users(dataset) -> tuple[np.ndarray, str]:
    """(N,) a user index per train row, and where it comes from.

    Formats without user ids (the LLaRA files) list each user's prefix windows one after the other; a row
    continues the previous one when its history is the previous history plus the previous target (the
    oldest item dropped once the window is full), so consecutive windows are chained into users.
    """
    from datasets import load_from_disk

    table = load_from_disk(str(dataset.path / "train")).data.table
    users = table.column("user").to_numpy().astype(np.int64)
    if len(users) and (users >= 0).all():
        return users, "user ids"
    split = dataset.split("train")
    return chain_users(split.seq, split.len_seq, split.next), "reconstructed from consecutive prefix windows"


def chain_users(seq: np.ndarray, len_seq: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """(N,) user indices of rows listed user by user as growing prefix windows (see :func:`train_users`)."""
    n, width = seq.shape
    out = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        previous = seq[i - 1, : len_seq[i - 1]].tolist() + [int(nxt[i - 1])]
        same = previous[-width:] == seq[i, : len_seq[i]].tolist()
        out[i] = out[i - 1] if same else out[i - 1] + 1
    return out


def split_masks(users: np.ndarray, holdout: Holdout, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) masks of the rows the encoder fits and of the rows the second stage trains on, given each row's user
    (the rows of one user in time order). They never overlap, except with ``none`` (every row, both).

    The held users are a seeded ``round(F · users)`` of them (at least one; with ``users:F`` at least one is
    left to the encoder too). ``users:F``: the encoder fits none of their rows, the second stage all of them
    (``+last:N``: their last N; the others go to neither). ``last:N[:F]``: their last N rows go to the second
    stage, every other row to the encoder.
    """
    n = len(users)
    if not holdout.active:
        return np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    distinct = np.unique(users)
    if holdout.method == "users" and len(distinct) < 2:
        raise UserError(f"holdout {holdout.spec} needs 2 training users or more; the train split has {len(distinct)}.")
    held = np.ones(n, dtype=bool)
    if holdout.users < 1:
        n_held = max(1, int(round(holdout.users * len(distinct))))
        if holdout.method == "users":
            n_held = min(len(distinct) - 1, n_held)
        held = np.isin(users, np.random.default_rng([seed, _USER_STREAM]).permutation(distinct)[:n_held])
    late = held if holdout.last is None else held & (_rank_from_end(users) < holdout.last)
    encoder = ~held if holdout.method == "users" else ~late
    return encoder, late


def second_stage_mask(users: np.ndarray, holdout: Holdout, seed: int) -> np.ndarray:
    """(N,) True for the rows the second stage trains on (:func:`split_masks`)."""
    return split_masks(users, holdout, seed)[1]


def _rank_from_end(users: np.ndarray) -> np.ndarray:
    """(N,) each row's rank from the end of its user's rows: 0 for the user's last row (file order inside a user)."""
    n = len(users)
    order = np.argsort(users, kind="stable")  # (N,) rows grouped by user, in file order inside a user
    starts = np.r_[0, np.flatnonzero(np.diff(users[order])) + 1]  # first position of each user's block
    ends = np.r_[starts[1:], n]
    from_end = np.empty(n, dtype=np.int64)
    for s, e in zip(starts, ends):
        from_end[order[s:e]] = np.arange(e - s)[::-1]
    return from_end


def rows_checksum(rows: np.ndarray) -> str:
    """SHA-256 of a sorted array of row indices, so that two stages can check that they split the rows alike."""
    return hashlib.sha256(np.ascontiguousarray(np.sort(rows).astype(np.int64)).tobytes()).hexdigest()


def dataset_holdout(dataset) -> str:
    """The holdout a prepared dataset asks for (its meta.json); datasets prepared before holdouts: the default."""
    recorded = dataset.meta.get("holdout")
    spec = recorded.get("spec") if isinstance(recorded, dict) else recorded
    return Holdout.parse(spec).spec


@dataclass
class Partition:
    """The train split divided between the encoder and the second stage."""

    holdout: Holdout
    encoder_rows: np.ndarray  # (N_e,) sorted row indices the encoder fits
    second_stage_rows: np.ndarray  # (N_s,) sorted row indices the second stage trains on
    users: int  # training users in all
    second_stage_users: int  # users with at least one second-stage row
    users_from: str  # user ids, or reconstructed

    def describe(self) -> dict[str, Any]:
        """What ``encoder.json``, ``ilora.json`` and reports record of the division."""
        return {
            "spec": self.holdout.spec,
            "encoder_rows": int(len(self.encoder_rows)),
            "second_stage_rows": int(len(self.second_stage_rows)),
            "users": self.users,
            "second_stage_users": self.second_stage_users,
            "users_from": self.users_from,
            "second_stage_sha256": rows_checksum(self.second_stage_rows),
        }


def partition(dataset, spec: str | None) -> Partition:
    """Divide ``dataset``'s train split by the holdout ``spec`` (None: the dataset's own)."""
    holdout = Holdout.parse(spec if spec is not None else dataset_holdout(dataset))
    users, how = train_users(dataset)
    fits, learns = split_masks(users, holdout, int(dataset.meta.get("seed", 0)))
    all_rows = np.arange(len(users))
    encoder, second = all_rows[fits], all_rows[learns]
    if holdout.active and (len(encoder) == 0 or len(second) == 0):
        raise UserError(
            f"holdout {holdout.spec} leaves {len(encoder)} training rows to the encoder and {len(second)} to the "
            f"second stage of {dataset.name!r}; choose another holdout or holdout=none."
        )
    return Partition(
        holdout=holdout,
        encoder_rows=encoder,
        second_stage_rows=second,
        users=int(len(np.unique(users))),
        second_stage_users=int(len(np.unique(users[learns]))),
        users_from=how,
    )


def second_stage_rows(
    dataset, encoder_info: dict[str, Any], requested: str | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The train rows a second stage on this encoder trains on, and what ``ilora.json`` records of them.

    ``requested`` None: the rows the encoder's own holdout gives the second stage. Another spec: its rows, if
    the encoder fitted none of them (``users:0.2+last:3`` on an encoder trained with ``users:0.2``, say);
    else it is refused. ``none``: every row, the encoder's included, which the record says. Encoders of older
    versions record no holdout; they fitted every row.
    """
    recorded = encoder_info.get("holdout") if isinstance(encoder_info.get("holdout"), dict) else None
    encoder_spec = Holdout.parse(recorded["spec"] if recorded else NO_HOLDOUT).spec
    wanted = Holdout.parse(requested).spec if requested is not None else encoder_spec
    where = encoder_info.get("path", "the encoder")
    if wanted == NO_HOLDOUT or encoder_spec == NO_HOLDOUT:
        rows = np.arange(len(train_users(dataset)[0]))
        saw = True
    else:
        own = partition(dataset, encoder_spec)
        if recorded.get("second_stage_sha256") not in (None, rows_checksum(own.second_stage_rows)):
            raise UserError(
                f"The rows the encoder {where} left out (holdout {encoder_spec}) are not the ones this dataset gives "
                "now; train the encoder again (`ilora encode --overwrite`)."
            )
        rows = own.second_stage_rows if wanted == encoder_spec else partition(dataset, wanted).second_stage_rows
        fitted = np.intersect1d(rows, own.encoder_rows).size
        if fitted:
            raise UserError(
                f"The encoder {where} was trained with holdout {encoder_spec} and fitted {fitted:,} of the rows "
                f"holdout {wanted} gives the second stage; leave holdout unset, choose one within the rows it left "
                f"out, or train an encoder with `ilora encode holdout={wanted}`."
            )
        saw = False
    return rows, {
        "spec": wanted if not saw else encoder_spec,
        "encoder_spec": encoder_spec,
        "train_rows_from": "rows the encoder left out" if not saw else "every training row",
        "rows": int(len(rows)),
        "encoder_saw_training_rows": saw,
    }


_APART_STREAM = 0xA9A7  # the users set apart inside the second stage: a random stream of their own


def set_apart(rows: np.ndarray, users: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the second stage's ``rows`` (sorted train-row indices; ``users`` (N,) the user of every train row) into
    the rows the language model trains on and the rows of a seeded ``round(fraction · users)`` of their users
    (at least one, and one left) set apart, on which the fusion weights are fitted and ``--keep-best`` chooses:
    rows that neither the encoder nor the language model was fitted on. ``fraction`` 0: nothing set apart."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if not fraction:
        return rows, rows[:0]
    distinct = np.unique(users[rows])
    if len(distinct) < 2:
        raise UserError(f"apart_users={fraction:g} needs 2 second-stage users or more; there is {len(distinct)}.")
    n_apart = min(len(distinct) - 1, max(1, int(round(fraction * len(distinct)))))
    apart_users = np.random.default_rng([seed, _APART_STREAM]).permutation(distinct)[:n_apart]
    apart = np.isin(users[rows], apart_users)
    return rows[~apart], rows[apart]
