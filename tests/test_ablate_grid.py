"""The grid of an ablation: cells, names, shared settings, refused combinations."""

from __future__ import annotations

import pytest

from ilora_cli.ablation.config import resolve_ablation
from ilora_cli.ablation.grid import expand, reference_cell
from ilora_cli.errors import UserError


def _config(overrides=None, **flags):
    return resolve_ablation(None, {"dataset": "cyc", **flags}, overrides)


def test_every_combination_is_a_cell_with_its_training_settings():
    config = _config(["max_train_samples=256", "lr=1e-3"], experts="1,2,4", gates="user,token")
    cells = expand(config)
    assert [c.name for c in cells] == [
        "k1_gate-user",
        "k1_gate-token",
        "k2_gate-user",
        "k2_gate-token",
        "k4_gate-user",
        "k4_gate-token",
    ]
    k4 = cells[4]
    assert k4.axes == {"experts": 4, "gates": "user"}
    assert k4.train == {"max_train_samples": 256, "lr": 1e-3, "seed": 42, "experts": 4, "gate": "user"}
    assert k4.train_key == k4.name and k4.encoder == "sasrec" and k4.train_fraction == 1.0
    assert reference_cell(cells, None).name == "k1_gate-user"
    assert reference_cell(cells, "k2_gate-token") is cells[3]
    with pytest.raises(UserError, match="No cell named 'k3'"):
        reference_cell(cells, "k3")


def test_evaluation_axes_share_one_training_run():
    cells = expand(_config(experts="1,4", candidates="20,40", seeds="1,2", train_fraction="1,0.5"))
    assert len(cells) == 16
    assert cells[0].name == "k1_users1_seed1_c20" and cells[1].name == "k1_users1_seed1_c40"
    assert cells[0].train_key == cells[1].train_key == "k1_users1_seed1"
    assert len({c.train_key for c in cells}) == 8
    assert {c.candidates for c in cells} == {20, 40} and {c.train["seed"] for c in cells} == {1, 2}
    assert {c.train_fraction for c in cells} == {1.0, 0.5}
    assert expand(_config())[0].name == "base"


def test_total_rank_stays_fixed_and_must_divide():
    with pytest.raises(UserError, match=r"Cell k3: rank \(16\) must be a positive multiple of experts \(3\)"):
        expand(_config(experts="1,3"))
    cells = expand(_config(["rank=8"], experts="1,2,8"))
    assert {c.train["rank"] for c in cells} == {8}


def test_key_value_pairs_go_to_the_ablation_or_to_training():
    config = _config(["eval_draws=2", "encode_epochs=3", "max_steps=4", "seed=7"], experts="1,2")
    assert config.eval_draws == 2 and config.encode_epochs == 3 and config.seed == 7
    assert config.train == {"max_steps": 4}
    assert [c.train["seed"] for c in expand(config)] == [7, 7]
    fixed = _config(["experts=2"], gates="user,mlp")  # a training axis fixed for every cell
    assert [c.train["experts"] for c in expand(fixed)] == [2, 2]


@pytest.mark.parametrize(
    "overrides, flags, message",
    [
        (["experts=4"], {"experts": "1,2"}, "experts is an axis of this ablation"),
        (["dataset=other"], {}, "The ablation sets dataset itself"),
        (["nonsense=1"], {}, "Unknown training setting nonsense; valid keys are: .*max_train_samples"),
        (["lr=fast"], {}, "lr must be a number"),
        ([], {"gates": "user,magic"}, "Unknown value 'magic' in --gates"),
        ([], {"experts": "2,2"}, "distinct"),
        ([], {"train_fraction": "1,1.5"}, r"Train fractions must be in \(0, 1\]"),
        ([], {"candidates": "1"}, "at least 2 candidates"),
        ([], {"split": "train"}, "Unknown split 'train'"),
    ],
)
def test_bad_ablations_are_refused_in_one_sentence(overrides, flags, message):
    with pytest.raises(UserError, match=message):
        _config(overrides, **flags)


def test_yaml_config_with_a_train_section(tmp_path):
    f = tmp_path / "abl.yaml"
    f.write_text("experts: [1, 2]\neval_rows: 10\ntrain:\n  max_train_samples: 32\n  batch_size: 4\n")
    config = resolve_ablation(f, {"dataset": "cyc"}, ["lr=2e-4"])
    assert config.experts == [1, 2] and config.eval_rows == 10
    assert config.train == {"max_train_samples": 32, "batch_size": 4, "lr": 2e-4}
    f.write_text("experts: [1, 2]\nbogus: 1\n")
    with pytest.raises(UserError, match="Unknown key bogus in the config file"):
        resolve_ablation(f, {"dataset": "cyc"}, None)


def test_default_directory_names_the_dataset_and_the_axes(tmp_path, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tmp_path))
    assert _config(experts="1,2", gates="user,mlp").directory() == tmp_path / "ablations" / "cyc-experts-gates"
    cross = resolve_ablation(None, {"dataset": "a", "eval_dataset": "b", "experts": "1"}, None)
    assert cross.directory().name == "a-experts-on-b"
    assert _config(name="mine").directory() == tmp_path / "ablations" / "mine"
