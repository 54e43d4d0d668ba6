"""prepare: the llara format, the restricted unpickler, synthetic data, storage and candidate draws."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from ilora_cli.data.candidates import draw_candidates
from ilora_cli.data.prepare import PrepareConfig, prepare
from ilora_cli.data.prepared import PreparedDataset, write_prepared
from ilora_cli.errors import UserError

from conftest import cycle_source, run_cli

N_ITEMS = 40


def _llara_frame(n_rows: int, rng, pad=N_ITEMS, tuples=False):
    rows = []
    for _ in range(n_rows):
        n = int(rng.integers(1, 11))
        items = rng.choice(N_ITEMS, size=n + 1, replace=False).tolist()
        hist = [(i, 4) for i in items[:n]] if tuples else items[:n]
        seq = hist + [(pad, 0) if tuples else pad] * (10 - n)
        rows.append({"seq": seq, "len_seq": n, "next": (items[n], 5) if tuples else items[n]})
    return pd.DataFrame(rows)


@pytest.fixture
def llara_dir(tmp_path):
    d = tmp_path / "llara"
    d.mkdir()
    rng = np.random.default_rng(0)
    _llara_frame(200, rng).to_pickle(d / "train_data.df")
    _llara_frame(30, rng).to_pickle(d / "Val_data.df")
    (d / "id2name.txt").write_text("".join(f"{i}::Artist {i}\n" for i in range(N_ITEMS)), encoding="utf-8")
    return d


def test_llara_needs_trust_pickle(llara_dir, ilora_home):
    with pytest.raises(UserError, match="--trust-pickle"):
        prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir))
    assert not (ilora_home / "datasets" / "x").exists()


def test_llara_reads_splits_filters_and_notes_missing_test(llara_dir, ilora_home):
    meta = prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir, trust_pickle=True, draws=3))
    df = pd.read_pickle(llara_dir / "train_data.df")
    assert meta["n_items"] == N_ITEMS and meta["pad_id"] == N_ITEMS
    assert meta["splits"]["train"] == int((df.len_seq >= 3).sum())
    assert meta["raw_rows"]["train"] == 200
    assert "test" not in meta["splits"] and any("test" in n for n in meta["notes"])
    ds = PreparedDataset.open("x")
    train = ds.split("train")
    kept = df[df.len_seq >= 3].reset_index(drop=True)
    assert train.seq.tolist() == kept.seq.tolist()
    assert train.next.tolist() == kept.next.tolist()
    val = ds.split("val")
    assert val.candidates.shape == (len(val), 3, 20)
    assert ds.titles[:2] == ["Artist 0", "Artist 1"]
    with pytest.raises(UserError, match="no test split"):
        ds.split("test")


def test_llara_movielens_tuples_and_u_item(tmp_path, ilora_home):
    d = tmp_path / "ml"
    d.mkdir()
    rng = np.random.default_rng(1)
    _llara_frame(50, rng, tuples=True).to_pickle(d / "train_data.df")
    lines = [f"{i + 1}|Movie {i}, The (19{50 + i})|01-Jan-1995||http://x|0|1\n" for i in range(N_ITEMS)]
    (d / "u.item").write_bytes("".join(lines).encode("latin-1"))
    meta = prepare(PrepareConfig(dataset="ml", format="llara", input=d, trust_pickle=True))
    ds = PreparedDataset.open("ml")
    assert meta["domain"] == "movies"
    assert ds.titles[3] == "The Movie 3"
    assert ds.split("train").seq.max() == N_ITEMS


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-marker",))


def test_crafted_pickle_cannot_run_code(llara_dir, ilora_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (llara_dir / "Val_data.df").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match="posix.system|os.system|is not allowed"):
        prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir, trust_pickle=True))
    assert not (tmp_path / "pwned-marker").exists()
    assert not (ilora_home / "datasets" / "x").exists()


def test_llara_bad_inputs(llara_dir, ilora_home):
    (llara_dir / "id2name.txt").write_text("0\tArtist\n", encoding="utf-8")
    with pytest.raises(UserError, match="id::name"):
        prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir, trust_pickle=True))
    (llara_dir / "id2name.txt").write_bytes("0::Caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir, trust_pickle=True))
    (llara_dir / "id2name.txt").write_text("".join(f"{i}::A{i}\n" for i in range(5)), encoding="utf-8")
    with pytest.raises(UserError, match="outside 0..4"):
        prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir, trust_pickle=True))
    with pytest.raises(UserError, match="does not exist"):
        prepare(PrepareConfig(dataset="x", format="llara", input=llara_dir / "nope", trust_pickle=True))
    assert not (ilora_home / "datasets").exists() or not any((ilora_home / "datasets").iterdir())


def test_candidates_are_valid_frozen_and_per_row(ilora_home):
    src = cycle_source()
    meta = write_prepared(src, "c", ilora_home / "c", n_candidates=10, draws=4, seed=7)
    val = PreparedDataset(ilora_home / "c").split("val")
    n_items = meta["n_items"]
    for i in range(len(val)):
        hist = set(val.seq[i, : val.len_seq[i]].tolist())
        for d in range(4):
            c = val.candidates[i, d]
            assert len(set(c.tolist())) == 10 and val.next[i] in c
            assert not (set(c.tolist()) - {val.next[i]}) & hist
            assert c.min() >= 0 and c.max() < n_items
    assert not all((val.candidates[:, 0] == val.candidates[:, 1]).all(axis=1))  # draws differ
    # a row's draws depend only on (seed, split, sample id), not on the other rows
    sub = draw_candidates(val.seq[3:4], val.len_seq[3:4], val.next[3:4], val.sample_id[3:4], n_items, 10, 4, 7, "val")
    assert (sub[0] == val.candidates[3]).all()
    # the target's position is spread over the slots
    positions = np.argmax(val.candidates == val.next[:, None, None], axis=2)
    assert len(np.unique(positions)) > 3


def test_synthetic_is_deterministic_and_heterogeneous(ilora_home, tmp_path):
    a = prepare(PrepareConfig(output=tmp_path / "a"))
    b = prepare(PrepareConfig(output=tmp_path / "b"))
    assert a["checksum"] == b["checksum"] and a["n_users"] == 600
    c = prepare(PrepareConfig(output=tmp_path / "c", seed=1))
    assert c["checksum"] != a["checksum"]
    ds = PreparedDataset(tmp_path / "a")
    train = ds.split("train")
    # groups disagree on what follows an item: the most common successor covers well under all of them
    last = train.seq[np.arange(len(train)), train.len_seq - 1]
    item = np.bincount(last).argmax()
    successors = np.bincount(train.next[last == item])
    assert successors.max() / successors.sum() < 0.6 and (successors > 0).sum() >= 3
    assert len(set(ds.titles)) == ds.n_items and all(" " in t for t in ds.titles)


def test_existing_output_is_refused_then_overwritten_atomically(ilora_home):
    prepare(PrepareConfig(dataset="s", synthetic_users=100))
    with pytest.raises(UserError, match="--overwrite"):
        prepare(PrepareConfig(dataset="s", synthetic_users=100))
    prepare(PrepareConfig(dataset="s", synthetic_users=120, overwrite=True))
    assert PreparedDataset.open("s").meta["n_users"] == 120
    leftovers = [p.name for p in (ilora_home / "datasets").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_empty_and_too_small_datasets(ilora_home):
    with pytest.raises(UserError, match="no training samples"):
        prepare(PrepareConfig(dataset="s", synthetic_users=10, min_history=50))
    src = cycle_source(n_items=12, n_users=20)
    with pytest.raises(UserError, match="too few"):
        write_prepared(src, "t", ilora_home / "t", n_candidates=20)
    assert not (ilora_home / "t").exists()


def test_cli_prepare_json_and_errors(ilora_home, llara_dir):
    r = run_cli("prepare", "--dataset", "syn", "--json", "synthetic_users=80", home=ilora_home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_items"] == 240 and doc["n_users"] == 80 and set(doc["splits"]) == {"train", "val", "test"}
    assert "History length" in r.stderr
    r = run_cli("prepare", "--dataset", "syn", home=ilora_home)
    assert r.returncode == 2 and "already exists" in r.stderr and r.stdout == ""
    r = run_cli("prepare", "--dataset", "y", "--format", "llara", "--input", str(llara_dir), home=ilora_home)
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("prepare", "bogus=1", home=ilora_home)
    assert r.returncode == 2 and "valid keys are" in r.stderr
    r = run_cli("prepare", "--format", "nope", home=ilora_home)
    assert r.returncode == 2 and "Unknown format" in r.stderr
    r = run_cli("ablate", "--dataset", "missing", "--experts", "1,4", home=ilora_home)
    assert r.returncode == 2 and "No prepared dataset named 'missing'" in r.stderr
