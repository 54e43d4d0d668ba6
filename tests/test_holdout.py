"""The holdout: the encoder fits some training rows, the second stage learns on the others (data/holdout.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ilora_cli.data.holdout import (
    DEFAULT_HOLDOUT,
    Holdout,
    chain_users,
    partition,
    rows_checksum,
    second_stage_mask,
    second_stage_rows,
    set_apart,
    split_masks,
    train_users,
)
from ilora_cli.data.prepared import PreparedDataset, write_prepared
from ilora_cli.errors import UserError

from conftest import cycle_source, run_cli


def test_specs_parse_and_bad_ones_are_one_sentence():
    assert Holdout.parse("users:0.2") == Holdout("users", 0.2)
    assert Holdout.parse(" LAST:3 ").spec == "last:3"
    assert Holdout.parse("none").active is False
    assert Holdout.parse(None).spec == DEFAULT_HOLDOUT
    assert Holdout.parse("last:1:0.5") == Holdout("last", 0.5, 1) and Holdout.parse("last:2:1").spec == "last:2"
    assert (
        Holdout.parse("users:.3+last:4") == Holdout("users", 0.3, 4)
        and Holdout("users", 0.3, 4).spec == "users:0.3+last:4"
    )
    bad_specs = ("users:0", "users:1", "users:1.5", "last:0", "last:-1", "half", "users:abc", "last:2.5", "")
    for bad in (
        *bad_specs,
        "last:1:0",
        "last:1:1.5",
        "last:1:x",
        "users:0.2+last:0",
        "users:1+last:2",
        "last:2+users:0.1",
    ):
        with pytest.raises(UserError, match="holdout"):
            Holdout.parse(bad)


def test_users_holdout_takes_whole_users_and_is_seeded():
    users = np.repeat(np.arange(10), [3, 1, 4, 2, 5, 1, 2, 3, 1, 2])  # (24,) rows of 10 users, user by user
    mask = second_stage_mask(users, Holdout("users", 0.3), seed=7)
    held = np.unique(users[mask])
    assert len(held) == 3  # round(0.3 · 10) users, all their rows
    assert set(np.flatnonzero(mask)) == set(np.flatnonzero(np.isin(users, held)))
    assert np.array_equal(mask, second_stage_mask(users, Holdout("users", 0.3), seed=7))
    assert not np.array_equal(mask, second_stage_mask(users, Holdout("users", 0.3), seed=8))
    # never every user: at least one is left to the encoder
    assert not second_stage_mask(np.array([0, 0, 1]), Holdout("users", 0.9), seed=0).all()


def test_last_holdout_takes_each_users_latest_rows():
    users = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    mask = second_stage_mask(users, Holdout("last", 1.0, 2), seed=0)
    assert mask.tolist() == [False, False, True, True, True, True, True, False, True, True]
    # users need not be sorted: the order inside a user is the file order
    interleaved = np.array([5, 6, 5, 6, 5])
    assert second_stage_mask(interleaved, Holdout("last", 1.0, 1), seed=0).tolist() == [False, False, False, True, True]
    assert second_stage_mask(users, Holdout("none"), seed=0).all()
    # last:N:F: the last N rows of a seeded fraction of the users only
    many = np.repeat(np.arange(10), 4)  # 10 users of 4 rows
    fits, mask = split_masks(many, Holdout("last", 0.3, 2), seed=1)
    held = np.unique(many[mask])
    assert len(held) == 3 and mask.sum() == 6 and np.array_equal(fits, ~mask)  # the encoder fits their early rows
    for u in held:
        assert mask[many == u].tolist() == [False, False, True, True]
    # users:F+last:N: the same users, unseen by the encoder; the second stage takes their last N rows only
    fits, mask = split_masks(many, Holdout("users", 0.3, 1), seed=1)
    assert np.array_equal(np.unique(many[mask]), held) and mask.sum() == 3
    assert not fits[np.isin(many, held)].any() and fits[~np.isin(many, held)].all()


def test_prefix_windows_chain_into_users():
    pad = 9
    seq = np.array(
        [
            [1, 2, 3, pad],  # user A: 1 2 3 -> 4
            [1, 2, 3, 4],  # 1 2 3 4 -> 5
            [2, 3, 4, 5],  # the window slides: 2 3 4 5 -> 6
            [7, 8, 1, pad],  # user B
            [7, 8, 1, 2],
        ]
    )
    lens = np.array([3, 4, 4, 3, 4])
    nxt = np.array([4, 5, 6, 2, 3])
    assert chain_users(seq, lens, nxt).tolist() == [0, 0, 0, 1, 1]


def _prepared(home, name="cyc", holdout=None, users=True):
    src = cycle_source(n_items=30, n_users=40, length=12)
    if not users:  # a format without user ids, like the LLaRA files
        src.splits["train"].user = None
    write_prepared(src, name, home / "datasets" / name, n_candidates=6, draws=2, seed=3, holdout=holdout)
    return PreparedDataset(home / "datasets" / name)


def test_prepare_records_the_holdout_and_partition_matches_with_or_without_user_ids(tmp_path):
    with_ids = _prepared(tmp_path, "a")
    without = _prepared(tmp_path, "b", users=False)
    meta = with_ids.meta["holdout"]
    assert meta["spec"] == DEFAULT_HOLDOUT == "users:0.2+last:5" and meta["users"] == 32
    # 6 of the 32 users (9 rows each) held out: the encoder fits the other 26 users' rows, the second stage
    # takes the held users' last 5 rows, and their first 4 rows go to neither
    assert (meta["encoder_rows"], meta["second_stage_rows"]) == (26 * 9, 6 * 5)
    a, b = partition(with_ids, None), partition(without, None)
    assert a.users_from == "user ids" and b.users_from.startswith("reconstructed")
    # the same users, found two ways: the same rows on each side
    assert np.array_equal(a.second_stage_rows, b.second_stage_rows)
    assert len(a.second_stage_rows) == meta["second_stage_rows"]
    assert np.intersect1d(a.encoder_rows, a.second_stage_rows).size == 0
    whole = partition(with_ids, "users:0.2")  # all the held users' rows: the complement of the encoder's
    assert np.array_equal(whole.encoder_rows, a.encoder_rows) and set(a.second_stage_rows) < set(
        whole.second_stage_rows
    )
    assert len(whole.encoder_rows) + len(whole.second_stage_rows) == with_ids.meta["splits"]["train"]
    other = _prepared(tmp_path, "c", holdout="last:2")
    assert other.meta["holdout"]["spec"] == "last:2" and other.meta["holdout"]["second_stage_rows"] == 2 * 32
    none = partition(with_ids, "none")
    assert np.array_equal(none.encoder_rows, none.second_stage_rows)


def test_a_holdout_that_leaves_nothing_to_a_stage_is_refused(tmp_path):
    src = cycle_source(n_items=30, n_users=5, length=12)  # 4 training users
    with pytest.raises(UserError, match="holdout last:20 leaves 0 training rows to the encoder"):
        write_prepared(src, "tiny", tmp_path / "tiny", n_candidates=6, draws=1, seed=3, holdout="last:20")


def test_encode_fits_only_its_rows_and_train_learns_on_the_others(tiny_world, monkeypatch):
    """The tiny world's encoder was trained with the default holdout; a run trains on exactly the rows it left out.
    (That an encoder scores the rows it fitted far better than the held-out ones, and those as well only when it
    fitted them too, is checked where fitting shows, in test_an_encoder_scores_well_the_rows_it_fitted_and_only_those:
    this encoder of 2 epochs on cycles has learnt too little to tell its rows from the others.)"""
    from ilora_cli.encoders.io import load_encoder

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    dataset = PreparedDataset.open("cyc")
    _, info = load_encoder("cyc-sasrec")
    part = partition(dataset, None)
    assert info["holdout"]["spec"] == DEFAULT_HOLDOUT
    assert info["holdout"]["second_stage_sha256"] == rows_checksum(part.second_stage_rows)
    assert info["training"]["train_rows"] == len(part.encoder_rows)
    rows, record = second_stage_rows(dataset, info, None)
    assert np.array_equal(rows, part.second_stage_rows) and record["encoder_saw_training_rows"] is False
    all_rows, record = second_stage_rows(dataset, info, "none")
    assert len(all_rows) == dataset.meta["splits"]["train"] and record["encoder_saw_training_rows"] is True
    # a spec whose rows the encoder left out is accepted (the held users' last rows), one it fitted is not
    late, record = second_stage_rows(dataset, info, "users:0.2+last:2")
    assert set(late) <= set(part.second_stage_rows) and len(late) == 2 * part.second_stage_users
    assert record["spec"] == "users:0.2+last:2" and record["encoder_spec"] == DEFAULT_HOLDOUT
    whole, _ = second_stage_rows(dataset, info, "users:0.2")  # every row of the held users: none fitted either
    assert len(whole) == 9 * part.second_stage_users
    with pytest.raises(UserError, match="fitted .* of the rows holdout last:1 gives"):
        second_stage_rows(dataset, info, "last:1")
    old = {k: v for k, v in info.items() if k != "holdout"}  # an encoder of an older version: fitted every row
    _, record = second_stage_rows(dataset, old, None)
    assert record == {
        "spec": "none",
        "encoder_spec": "none",
        "train_rows_from": "every training row",
        "rows": dataset.meta["splits"]["train"],
        "encoder_saw_training_rows": True,
    }
    # the encoder records a checksum of the rows it left out: other rows are refused
    moved = dict(info, holdout=dict(info["holdout"], second_stage_sha256="0" * 64))
    with pytest.raises(UserError, match="not the ones this dataset gives now"):
        second_stage_rows(dataset, moved, None)


def _random_walks(home, n_items=30, n_users=40, length=12):
    """A dataset whose next items only a model that fitted them can know (each user a random permutation of the
    items) and without a val split, so that the encoder keeps the weights of its last epoch."""
    from ilora_cli.data.source import SourceData, splits_from_sequences

    rng = np.random.default_rng(0)
    splits = splits_from_sequences([rng.permutation(n_items)[:length] for _ in range(n_users)], n_items, seed=0)
    del splits["val"]
    src = SourceData(titles=[f"Item {i}" for i in range(n_items)], splits=splits, n_users=n_users)
    write_prepared(src, "walks", home / "datasets" / "walks", n_candidates=6, draws=1, seed=3)
    return PreparedDataset.open("walks")


def test_an_encoder_scores_well_the_rows_it_fitted_and_only_those(ilora_home):
    """On rows only memorising can predict, the encoder trained with the default holdout ranks the next item first on
    most of the rows it fitted and on almost none of the held-out rows; one trained on every row (holdout none) ranks
    those held-out rows as well as the others: the holdout, not the rows themselves, makes the difference."""
    import torch

    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.encoders.train import EncodeConfig, encode

    dataset = _random_walks(ilora_home)
    part = partition(dataset, None)
    settings = dict(dataset="walks", hidden_size=32, dropout=0.0, epochs=20, batch_size=64, lr=1e-2, quiet=True)
    encode(EncodeConfig(name="held", **settings))
    encode(EncodeConfig(name="every", holdout="none", **settings))
    train = dataset.split("train")

    def top1(name: str, rows: np.ndarray) -> float:
        """The fraction of ``rows`` whose next item the encoder scores highest of the whole catalogue."""
        model, _ = load_encoder(name)
        part_rows = train.select(rows)
        with torch.no_grad():
            users = model(torch.as_tensor(part_rows.seq), torch.as_tensor(part_rows.len_seq))  # (n, d)
            scores = users @ model.item_embeddings().T  # (n, n_items)
        return float((scores.argmax(1).numpy() == part_rows.next).mean())

    fitted, held_out = top1("held", part.encoder_rows), top1("held", part.second_stage_rows)
    assert fitted > 0.6 and held_out < 0.15, (fitted, held_out)
    assert top1("every", part.second_stage_rows) > held_out + 0.3
    # the encoder's own record says the same of its rows (sampled metrics, one draw of 6 candidates)
    _, info = load_encoder("held")
    record = info["training"]["metrics"]
    assert record["fitted"]["hr@1"]["mean"] > record["second_stage"]["hr@1"]["mean"] + 0.3, record


def test_the_encoder_is_the_same_whichever_rows_the_second_stage_takes(tiny_world, tmp_path, monkeypatch):
    """Holdouts that hold out the same users but give the second stage other rows of theirs (all of them, the last 5:
    the tiny world's encoder, the last 2) leave the encoder's rows, and so its weights, exactly as they are."""
    import torch
    from safetensors.torch import load_file

    from ilora_cli.encoders.train import EncodeConfig, encode

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    # the tensors, not the file's bytes: safetensors may write the same metadata in another order
    world = load_file(tiny_world / "encoders" / "cyc-sasrec" / "encoder.safetensors")
    record = json.loads((tiny_world / "encoders" / "cyc-sasrec" / "encoder.json").read_text())
    second_stage = {record["holdout"]["second_stage_rows"]}
    for spec in ("users:0.2", "users:0.2+last:2"):
        out = tmp_path / spec.replace(":", "-").replace("+", "-")
        encode(EncodeConfig(dataset="cyc", hidden_size=16, epochs=2, holdout=spec, output=out, quiet=True))
        second_stage.add(json.loads((out / "encoder.json").read_text())["holdout"]["second_stage_rows"])
        weights = load_file(out / "encoder.safetensors")
        assert weights.keys() == world.keys() and all(torch.equal(weights[k], world[k]) for k in world), spec
    assert len(second_stage) == 3  # the second stage's rows did change


def test_train_records_its_rows_and_eval_says_when_the_encoder_saw_them(tiny_world, monkeypatch):
    from ilora_cli.training.loop import TrainConfig, train

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    encoder_file = tiny_world / "encoders" / "cyc-sasrec" / "encoder.safetensors"
    encoder_bytes = encoder_file.read_bytes()
    backbone = str(tiny_world / "tiny-backbone")
    common = dict(dataset="cyc", backbone=backbone, batch_size=4, candidates=6, max_steps=1, quiet=True)
    honest = train(TrainConfig(name="ho-default", **common))
    info = json.loads((tiny_world / "runs" / "ho-default" / "ilora.json").read_text())
    part = partition(PreparedDataset.open("cyc"), None)
    users = train_users(PreparedDataset.open("cyc"))[0]
    kept, apart = set_apart(part.second_stage_rows, users, 0.2, 42)  # the default apart_users, the default seed
    assert len(apart) > 0 and len(kept) + len(apart) == len(part.second_stage_rows)
    assert info["holdout"] == {
        "spec": DEFAULT_HOLDOUT,
        "encoder_spec": DEFAULT_HOLDOUT,
        "train_rows_from": "rows the encoder left out",
        "rows": len(part.second_stage_rows),
        "encoder_saw_training_rows": False,
        "train_rows": len(kept),
        "apart_rows": len(apart),
        "apart_users": len(np.unique(users[apart])),
    }
    assert honest["complete"]
    train(TrainConfig(name="ho-none", holdout="none", **common))
    info = json.loads((tiny_world / "runs" / "ho-none" / "ilora.json").read_text())
    assert info["holdout"]["encoder_saw_training_rows"] is True
    r = run_cli("eval", "--run", "ho-none", "--max-samples", "2", "draws=1", "--json", home=tiny_world)
    assert r.returncode == 0, r.stderr
    assert "was fitted on the rows the run trained on" in r.stderr
    assert json.loads(r.stdout)["results"]["ho-none"]["holdout"]["encoder_saw_training_rows"] is True
    r = run_cli("eval", "--run", "ho-default", "--max-samples", "2", "draws=1", home=tiny_world)
    assert r.returncode == 0 and "fitted on the rows" not in r.stderr
    # two second stages on other rows (the held-out ones, every one): the encoder stays what it was, in both runs
    assert encoder_file.read_bytes() == encoder_bytes
    for run in ("ho-default", "ho-none"):
        assert (tiny_world / "runs" / run / "encoder" / "encoder.safetensors").read_bytes() == encoder_bytes, run


def test_eval_names_another_encoder_beside_the_runs(tiny_world, monkeypatch):
    """`eval --encoder NAME` adds that encoder (e.g. one fitted on every row) on the same rows and draws; a bare
    `--encoder` still means the run's own."""
    from ilora_cli.encoders.train import EncodeConfig, encode
    from ilora_cli.training.loop import TrainConfig, train

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    if not (tiny_world / "encoders" / "cyc-full" / "encoder.json").exists():
        encode(EncodeConfig(dataset="cyc", name="cyc-full", hidden_size=16, epochs=2, holdout="none", quiet=True))
    train(TrainConfig(name="named-enc", dataset="cyc", backbone=str(tiny_world / "tiny-backbone"), max_steps=1,
                      batch_size=4, candidates=6, quiet=True))  # fmt: skip
    r = run_cli("eval", "--run", "named-enc", "--encoder", "cyc-full", "--max-samples", "4", "--json", home=tiny_world)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["results"]
    assert set(results) == {"named-enc", "encoder", "encoder:cyc-full", "popularity"}
    assert results["encoder:cyc-full"]["metrics"]["mrr"]["n_draws"] == 2
    r = run_cli("eval", "--run", "named-enc", "--encoder", "--max-samples", "4", "--json", home=tiny_world)
    assert r.returncode == 0 and set(json.loads(r.stdout)["results"]) == {"named-enc", "encoder", "popularity"}
    r = run_cli("eval", "--dataset", "cyc", "--encoder", "cyc-full", "draws=1", "--json", home=tiny_world)
    assert r.returncode == 0 and set(json.loads(r.stdout)["results"]) >= {"encoder"}
    r = run_cli("eval", "--run", "named-enc", "--encoder", "nope", home=tiny_world)
    assert r.returncode == 2 and "No encoder named 'nope'" in r.stderr
