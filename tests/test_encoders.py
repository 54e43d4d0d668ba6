"""Collaborative encoders: shapes, padding, causality, training, determinism, save/load, compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ilora_cli.config import resolve
from ilora_cli.data.prepared import PreparedDataset, write_prepared
from ilora_cli.encoders import ENCODERS, SequentialEncoder
from ilora_cli.encoders.base import clip_history
from ilora_cli.encoders.evaluate import evaluate_encoder
from ilora_cli.encoders.io import build_encoder, check_compatible, load_encoder
from ilora_cli.encoders.train import EncodeConfig, encode
from ilora_cli.errors import UserError

from conftest import cycle_source

N_ITEMS = 30
N_CANDIDATES = 10
SMALL = {"hidden_size": 16, "dropout": 0.1, "max_len": 10}
MODEL_CONFIGS = {
    "sasrec": {**SMALL, "num_blocks": 1, "num_heads": 2},
    "gru4rec": {**SMALL, "num_layers": 1},
    "caser": {**SMALL, "n_h": 4, "n_v": 2},
}
# A short, fast training run on the fixture; tests override what they check.
FAST = {
    "hidden_size": 16,
    "num_heads": 1,
    "batch_size": 64,
    "lr": 5e-3,
    "epochs": 2,
    "patience": 0,
    "quiet": True,
    "threads": 1,
}


@pytest.fixture
def home(ilora_home):
    """$ILORA_HOME holding "tiny": 160 users who each walk the catalogue i -> i + 1 (mod 30)."""
    write_prepared(
        cycle_source(n_users=160), "tiny", ilora_home / "datasets" / "tiny", n_candidates=N_CANDIDATES, draws=3
    )
    return ilora_home


def padded_batch(n_items: int = N_ITEMS, lengths=(1, 3, 10, 6), L: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    len_seq = torch.tensor(lengths)
    seq = torch.randint(0, n_items, (len(lengths), L), generator=g)
    seq = seq.masked_fill(torch.arange(L)[None, :] >= len_seq[:, None], n_items)
    return seq, len_seq


def fresh(kind: str) -> SequentialEncoder:
    torch.manual_seed(0)
    return build_encoder(kind, N_ITEMS, MODEL_CONFIGS[kind]).eval()


# ---- the modules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_shapes_and_interface(kind):
    model = fresh(kind)
    seq, len_seq = padded_batch()
    out = model(seq, len_seq)
    assert out.shape == (4, 16)
    assert model.item_embedding.num_embeddings == N_ITEMS + 1
    assert model.item_embedding.padding_idx == N_ITEMS == model.pad_id
    assert model.item_embeddings().shape == (N_ITEMS, 16)
    scores = model.score_all(seq, len_seq)
    assert scores.shape == (4, N_ITEMS)
    torch.testing.assert_close(scores, out @ model.item_embeddings().T)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_padding_is_ignored(kind):
    model = fresh(kind)
    seq, len_seq = padded_batch()
    other = seq.clone()
    pad = torch.arange(seq.shape[1])[None, :] >= len_seq[:, None]
    other[pad] = torch.randint(0, N_ITEMS, (int(pad.sum()),), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(seq, len_seq), model(other, len_seq))
    # Fewer padding columns change nothing either.
    torch.testing.assert_close(model(seq, len_seq)[:2], model(seq[:2, :3], len_seq[:2]))


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_last_real_item_matters(kind):
    model = fresh(kind)
    seq, len_seq = padded_batch()
    changed = seq.clone()
    rows = torch.arange(len(seq))
    changed[rows, len_seq - 1] = (seq[rows, len_seq - 1] + 1) % N_ITEMS
    assert not torch.isclose(model(seq, len_seq), model(changed, len_seq)).all(dim=1).any()


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_causal_prefix_outputs(kind):
    """The representation after k items is the same whatever real items follow them."""
    model = fresh(kind)
    seq, _ = padded_batch(lengths=(10, 10, 10, 10))
    for k in (1, 4, 9):
        prefix = seq.clone()
        prefix[:, k:] = N_ITEMS
        full_len = torch.full((4,), 10)
        short_len = torch.full((4,), k)
        torch.testing.assert_close(model(seq, short_len), model(prefix, short_len))
        assert not torch.allclose(model(seq, full_len), model(seq, short_len))


def test_sasrec_output_is_the_last_real_position():
    model = fresh("sasrec")
    seq, len_seq = padded_batch()
    hidden = {}
    model.ln_f.register_forward_hook(lambda mod, args, out: hidden.setdefault("h", out))
    out = model(seq, len_seq)
    torch.testing.assert_close(out, hidden["h"][torch.arange(4), len_seq - 1])


def test_long_histories_keep_the_most_recent_items():
    model = fresh("sasrec")
    seq, len_seq = padded_batch(lengths=(12, 4), L=12)
    clipped, kept = clip_history(seq, len_seq, 10, N_ITEMS)
    assert kept.tolist() == [10, 4]
    assert clipped[0].tolist() == seq[0, 2:].tolist()
    assert clipped[1].tolist() == seq[1, :10].tolist()
    torch.testing.assert_close(model(seq, len_seq), model(clipped, kept))


def test_sasrec_defaults_follow_the_method():
    config = ENCODERS["sasrec"][1]()
    assert (config.hidden_size, config.num_blocks, config.num_heads, config.max_len, config.dropout) == (
        64,
        1,
        1,
        10,
        0.1,
    )


# ---- evaluation -------------------------------------------------------------------------------------


class Oracle(SequentialEncoder):
    """Scores item (last + 1) mod N highest: a perfect model of the fixture's pattern."""

    kind = "oracle"

    def __init__(self, n_items: int):
        super().__init__(n_items, n_items)
        with torch.no_grad():
            self.item_embedding.weight.copy_(torch.eye(n_items + 1, n_items))

    def forward(self, seq, len_seq):
        last = seq[torch.arange(len(seq)), len_seq - 1]
        return torch.nn.functional.one_hot((last + 1) % self.n_items, self.n_items).float()


def test_evaluate_encoder_keys_and_a_perfect_model(home):
    split = PreparedDataset.open("tiny").split("val")
    result = evaluate_encoder(Oracle(N_ITEMS), split, N_ITEMS)
    assert result["protocol"] == f"sampled, {N_CANDIDATES} candidates"
    names = ["hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10", "mrr"]
    names += ["full_hr@10", "full_hr@20", "full_hr@50", "full_ndcg@10", "full_ndcg@20", "full_mrr"]
    assert sorted(k for k in result if k != "protocol") == sorted(names)
    for name in names:
        assert result[name]["mean"] == pytest.approx(1.0)
        assert result[name]["std"] == 0.0
    assert result["hr@1"]["n_draws"] == 3 and result["full_hr@10"]["n_draws"] == 1


# ---- training, saving, loading ---------------------------------------------------------------------


def test_sasrec_learns_the_pattern(home):
    result = encode(EncodeConfig(dataset="tiny", **{**FAST, "epochs": 4}))
    val = result["metrics"]["val"]
    assert val["hr@1"]["mean"] > 0.6  # random: 1 / 10
    # the rows it fitted and the rows it left to the second stage (the default holdout), one draw each
    assert set(result["metrics"]) == {"val", "test", "fitted", "second_stage"}
    held = result["holdout"]
    assert result["metrics"]["second_stage"]["rows"] == min(2000, held["second_stage_rows"])
    assert result["metrics"]["fitted"]["rows"] == min(2000, held["encoder_rows"]) == min(2000, result["train_rows"])
    assert result["metrics"]["fitted"]["hr@1"]["n_draws"] == 1
    assert result["encoder_dir"] == str(home / "encoders" / "tiny-sasrec")
    assert result["model"] == "sasrec" and 1 <= result["best_epoch"] <= result["epochs_run"] == 4
    assert result["seconds_per_epoch"] > 0
    info = json.loads((home / "encoders" / "tiny-sasrec" / "encoder.json").read_text())
    dataset = PreparedDataset.open("tiny")
    assert info["type"] == "sasrec" and info["n_items"] == N_ITEMS and info["pad_id"] == N_ITEMS
    assert info["max_len"] == 10 and info["model"]["hidden_size"] == 16
    assert info["dataset"] == {"name": "tiny", "checksum": dataset.checksum, "path": str(dataset.path)}
    assert info["best_epoch"] == result["best_epoch"]
    assert info["training"]["config"]["lr"] == FAST["lr"]


def test_training_is_deterministic(home):
    a = encode(EncodeConfig(dataset="tiny", name="a", **FAST))
    b = encode(EncodeConfig(dataset="tiny", name="b", **FAST))
    c = encode(EncodeConfig(dataset="tiny", name="c", **{**FAST, "seed": 7}))
    wa, wb, wc = (load_file(f"{r['encoder_dir']}/encoder.safetensors") for r in (a, b, c))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_save_load_roundtrip(home, kind):
    config = EncodeConfig(dataset="tiny", model=kind, **{**FAST, "epochs": 1, "loss": "bce", "negatives": 4})
    result = encode(config)
    model, info = load_encoder(f"tiny-{kind}")
    assert not model.training and all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert info["type"] == kind and info["path"] == result["encoder_dir"]
    # The same model as the one evaluated at the end of training: same scores, same metrics.
    dataset = PreparedDataset.open("tiny")
    assert evaluate_encoder(model, dataset.split("val"), N_ITEMS) == result["metrics"]["val"]
    again, _ = load_encoder(home / "encoders" / f"tiny-{kind}")
    seq, len_seq = padded_batch()
    torch.testing.assert_close(model.score_all(seq, len_seq), again.score_all(seq, len_seq), rtol=0, atol=0)
    check_compatible(info, dataset)


def test_existing_output_is_refused(home):
    encode(EncodeConfig(dataset="tiny", **{**FAST, "epochs": 1}))
    with pytest.raises(UserError, match="already exists"):
        encode(EncodeConfig(dataset="tiny", **{**FAST, "epochs": 1}))
    encode(EncodeConfig(dataset="tiny", overwrite=True, **{**FAST, "epochs": 1}))


def test_check_compatible_refuses_another_dataset(home):
    encode(EncodeConfig(dataset="tiny", **{**FAST, "epochs": 1}))
    _, info = load_encoder("tiny-sasrec")
    write_prepared(cycle_source(n_items=40), "bigger", home / "datasets" / "bigger", n_candidates=N_CANDIDATES)
    with pytest.raises(UserError, match="30 items.*'bigger' has 40"):
        check_compatible(info, PreparedDataset.open("bigger"))
    write_prepared(cycle_source(seed=1), "other", home / "datasets" / "other", n_candidates=N_CANDIDATES)
    with pytest.raises(UserError, match="different dataset"):
        check_compatible(info, PreparedDataset.open("other"))


def test_missing_encoder_is_a_user_error(home):
    with pytest.raises(UserError, match="No encoder named 'nope'"):
        load_encoder("nope")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model": "bert"}, "Unknown encoder"),
        ({"loss": "mse"}, "Unknown loss"),
        ({"monitor": "auc"}, "Unknown monitor"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"hidden_size": 10, "num_heads": 3}, "divisible"),
        ({"name": "../x"}, "not valid"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_bad_config_values_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        EncodeConfig(**override).validate()


def test_config_resolution_rejects_bad_types():
    with pytest.raises(UserError, match="epochs must be an integer"):
        resolve(EncodeConfig, overrides=["epochs=many"])
    assert resolve(EncodeConfig, overrides=["model=gru4rec", "lr=3e-4"]).lr == 3e-4


def test_unknown_dataset_is_a_user_error(home):
    with pytest.raises(UserError, match="No prepared dataset named 'missing'"):
        encode(EncodeConfig(dataset="missing", quiet=True))


def test_an_encoder_too_large_for_the_memory_is_refused_before_training(home):
    """Before: `ilora encode hidden_size=8192` (the largest width accepted) on 240 items allocated until it failed."""
    from ilora_cli.encoders.train import check_training_memory, training_memory

    from conftest import run_main

    wide = EncodeConfig(dataset="tiny", hidden_size=8192)
    wide.validate()
    need = training_memory(wide, 240, 10)
    assert 8 * 2**30 < need < 32 * 2**30  # 400 M parameters of one block, the Adam state and the best copy
    with pytest.raises(UserError, match=r"hidden_size=8192 .* 240 items would take about \d+\.\d GiB .* 8\.0 GiB"):
        check_training_memory(wide, 240, 10, available=8 * 2**30)
    check_training_memory(EncodeConfig(), 240, 10, available=1 * 2**30)  # the default: a few MiB
    # wider than any machine holds: refused on this one too, before anything is written
    r = run_main("encode", "--dataset", "tiny", "hidden_size=8192", "num_blocks=100", home=home)
    assert r.returncode == 2 and "GiB of memory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (home / "encoders").exists() or not list((home / "encoders").iterdir())
