"""Dataset variants of ablations: more or fewer candidates, fewer training users, another catalogue."""

from __future__ import annotations

import numpy as np
import pytest

from ilora_cli.data.prepared import PreparedDataset, write_prepared
from ilora_cli.data.source import Rows, SourceData, splits_from_sequences
from ilora_cli.data.variants import (
    EXTRA_DIR,
    candidate_draws,
    title_map,
    train_users,
    translate_split,
    user_subset,
)

from conftest import cycle_source


@pytest.fixture
def cyc(tmp_path) -> PreparedDataset:
    write_prepared(cycle_source(n_items=30, n_users=40, length=12), "cyc", tmp_path / "cyc", n_candidates=6, draws=3)
    return PreparedDataset(tmp_path / "cyc")


def test_more_candidates_extend_the_stored_draws_and_are_stored(cyc):
    before = cyc.split("val")
    extra = candidate_draws(cyc, "val", 10)
    assert extra.shape == (len(before), 3, 10)
    for i in range(len(before)):
        history = set(before.seq[i, : before.len_seq[i]].tolist())
        for d in range(3):
            row = extra[i, d].tolist()
            assert len(set(row)) == 10 and row.count(int(before.next[i])) == 1
            assert set(before.candidates[i, d].tolist()) <= set(row)  # the 6 stored ones plus 4 new
            assert not (set(row) - set(before.candidates[i, d].tolist())) & history
    stored = cyc.path / EXTRA_DIR / "val-c10.safetensors"
    assert stored.is_file()
    np.testing.assert_array_equal(candidate_draws(cyc, "val", 10), extra)  # read back
    stored.unlink()
    np.testing.assert_array_equal(candidate_draws(cyc, "val", 10), extra)  # drawn again: the same
    reopened = PreparedDataset(cyc.path)
    np.testing.assert_array_equal(reopened.split("val").candidates, before.candidates)  # untouched
    assert reopened.checksum == cyc.checksum
    np.testing.assert_array_equal(candidate_draws(cyc, "val", 6), before.candidates)


def test_fewer_candidates_keep_the_target_and_the_first_negatives(cyc):
    stored = cyc.split("test")
    fewer = candidate_draws(cyc, "test", 3)
    for i in range(len(stored)):
        for d in range(3):
            full = stored.candidates[i, d].tolist()
            row = fewer[i, d].tolist()
            assert int(stored.next[i]) in row and len(row) == 3
            assert row == [x for x in full if x in row]  # stored order kept
            negatives = [x for x in full if x != stored.next[i]]
            assert [x for x in row if x != stored.next[i]] == negatives[:2]


def test_a_user_subset_keeps_whole_users_and_the_same_evaluation(cyc, tmp_path):
    users, how = train_users(cyc)
    assert how == "user ids"
    half = user_subset(cyc, 0.5, seed=1, out_dir=tmp_path / "half")
    kept, _ = train_users(half)
    assert len(np.unique(kept)) == round(0.5 * len(np.unique(users)))
    for u in np.unique(kept):  # every row of a kept user, none of the others
        assert (kept == u).sum() == (users == u).sum()
    assert half.meta["splits"]["train"] == int(np.isin(users, kept).sum())
    for split in ("val", "test"):
        a, b = cyc.split(split), half.split(split)
        np.testing.assert_array_equal(a.candidates, b.candidates)
        np.testing.assert_array_equal(a.next, b.next)
    assert half.checksum != cyc.checksum and half.meta["derived_from"]["users_kept"] == len(np.unique(kept))
    again = user_subset(cyc, 0.5, seed=1, out_dir=tmp_path / "half")
    assert again.checksum == half.checksum
    other = user_subset(cyc, 0.5, seed=2, out_dir=tmp_path / "half")
    assert other.checksum != half.checksum


def test_users_are_reconstructed_from_consecutive_windows_without_user_ids(tmp_path):
    src = cycle_source(n_items=30, n_users=20, length=14)
    truth = src.splits["train"].user
    src.splits["train"] = Rows(src.splits["train"].seq, src.splits["train"].len_seq, src.splits["train"].next, None)
    write_prepared(src, "anon", tmp_path / "anon", n_candidates=6, draws=1)
    ds = PreparedDataset(tmp_path / "anon")
    users, how = train_users(ds)
    assert how.startswith("reconstructed")
    kept = ds.split("train")  # rows with at least 3 history items, in file order
    true_users = truth[src.splits["train"].len_seq >= 3]
    assert len(np.unique(users)) == len(np.unique(true_users))
    same_true = true_users[:, None] == true_users[None, :]
    same_found = users[:, None] == users[None, :]
    np.testing.assert_array_equal(same_true, same_found)
    assert len(kept) == len(users)


def test_rows_of_another_catalogue_are_mapped_by_title(cyc, tmp_path):
    rng = np.random.default_rng(0)
    perm = rng.permutation(30)[:18]
    titles = [cyc.titles[j] for j in perm] + ["Other One", "Other Two"]
    titles[3] = titles[3].upper()  # matched ignoring case
    seqs = [(rng.integers(20) + np.arange(10)) % 20 for _ in range(30)]
    src = SourceData(titles=titles, splits=splits_from_sequences(seqs, 20, seed=0), n_users=30)
    write_prepared(src, "other", tmp_path / "other", n_candidates=5, draws=2)
    other = PreparedDataset(tmp_path / "other")

    mapping, by_case = title_map(other.titles, cyc.titles)
    assert by_case == 1 and (mapping[:18] == perm).all() and (mapping[18:] == -1).all()
    split, report = translate_split(other, "val", cyc, n_candidates=5, draws=2, seed=4)
    original = other.split("val")
    assert report["rows"] == len(original) and report["rows_kept"] == len(split) > 0
    assert report["items_mapped"] == 18 and report["candidate_pool"] == 18
    for i in range(len(split)):
        j = int(np.flatnonzero(original.sample_id == split.sample_id[i])[0])
        assert cyc.titles[split.next[i]].casefold() == other.titles[original.next[j]].casefold()
        history = [other.titles[x].casefold() for x in original.seq[j, : original.len_seq[j]] if mapping[x] >= 0]
        assert [cyc.titles[x].casefold() for x in split.seq[i, : split.len_seq[i]]] == history[-cyc.max_history :]
        for d in range(2):
            row = split.candidates[i, d]
            assert split.next[i] in row and set(row.tolist()) <= set(perm.tolist())
            assert not set(row.tolist()) & set(split.seq[i, : split.len_seq[i]].tolist())
    again, _ = translate_split(other, "val", cyc, n_candidates=5, draws=2, seed=4)
    np.testing.assert_array_equal(again.candidates, split.candidates)
