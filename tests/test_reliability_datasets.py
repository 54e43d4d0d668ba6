"""Prepared datasets under damage, and what preparing one may cost: a damaged or edited dataset is refused in one
sentence before it is used; sizes that would not fit the machine are refused before any work."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ilora_cli.data.prepare import PrepareConfig, prepare
from ilora_cli.data.prepared import PreparedDataset
from ilora_cli.encoders.train import EncodeConfig, encode
from ilora_cli.errors import UserError
from ilora_cli.training.loop import TrainConfig, train


@pytest.fixture
def home(tiny_world, tmp_path, monkeypatch):
    """A home with copies of the tiny world's dataset (to damage), its encoder and the backbone."""
    h = tmp_path / "home"
    for name in ("datasets/cyc", "encoders/cyc-sasrec", "tiny-backbone"):
        shutil.copytree(tiny_world / name, h / name, ignore=shutil.ignore_patterns("extra_candidates"))
    monkeypatch.setenv("ILORA_HOME", str(h))
    return h


def _meta(change):
    def apply(ds: Path) -> None:
        meta = json.loads((ds / "meta.json").read_text())
        change(meta)
        (ds / "meta.json").write_text(json.dumps(meta))

    return apply


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "meta.json truncated": lambda ds: _truncate(ds / "meta.json"),
    "meta.json a list": lambda ds: (ds / "meta.json").write_text("[1, 2]"),
    "draws edited": _meta(lambda m: m.__setitem__("draws", 3)),
    # the same numbers reshape to 1 draw of 12 candidates: only the checksum tells
    "draws and candidates edited to fit": _meta(lambda m: m.update(draws=1, n_candidates=12)),
    "pad_id edited": _meta(lambda m: m.__setitem__("pad_id", 5)),
    "row count edited": _meta(lambda m: m["splits"].__setitem__("train", 7)),
    "val deleted": lambda ds: shutil.rmtree(ds / "val"),
    "items deleted": lambda ds: shutil.rmtree(ds / "items"),
    "train arrow truncated": lambda ds: _truncate(next((ds / "train").glob("*.arrow"))),
    "test candidates replaced": lambda ds: _replace_candidates(ds / "test"),
}


def _replace_candidates(split: Path) -> None:
    """Rewrite a split with other (valid-looking) candidate ids of the same shapes, as an edit or another tool
    would: only the checksum can tell."""
    from datasets import load_from_disk

    table = load_from_disk(str(split))
    edited = table.map(
        lambda row: {"candidates": [[(c + 1) % 30 for c in d] for d in row["candidates"]]}, features=table.features
    )
    edited.save_to_disk(str(split.with_name("test-edited")))
    shutil.rmtree(split)
    split.with_name("test-edited").rename(split)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_prepared_dataset_is_refused_in_one_sentence(home, damage):
    """Before: JSONDecodeError, ValueError (reshape), FileNotFoundError or an OSError from pyarrow; an edited
    pad_id, and draws edited to numbers that still reshape, were used as they were."""
    DAMAGE[damage](home / "datasets" / "cyc")

    def use() -> None:
        ds = PreparedDataset.open("cyc")
        for name in ds.splits:
            ds.split(name)
        assert ds.titles

    with pytest.raises(UserError, match="damaged or was edited") as exc:
        use()
    assert "\n" not in str(exc.value)
    commands = [lambda: encode(EncodeConfig(dataset="cyc", name="e", hidden_size=8, epochs=1, quiet=True))]
    if damage != "test candidates replaced":  # training never reads the test split
        commands.append(
            lambda: train(TrainConfig(dataset="cyc", backbone=str(home / "tiny-backbone"), name="r", max_steps=1,
                                      batch_size=4, candidates=6, quiet=True))
        )  # fmt: skip
    for command in commands:
        with pytest.raises(UserError, match="damaged or was edited"):
            command()
    assert not (home / "runs" / "r").exists() and not (home / "encoders" / "e").exists()


def test_an_intact_dataset_reads_and_is_verified(home):
    ds = PreparedDataset.open("cyc")
    assert [len(ds.split(s)) for s in ds.splits] == [ds.meta["splits"][s] for s in ds.splits]
    assert len(ds.titles) == ds.n_items


def test_an_encoder_whose_dataset_is_a_string_is_one_sentence(home):
    """Before: AttributeError ('str' object has no attribute 'get') when train checked the encoder."""
    info = home / "encoders" / "cyc-sasrec" / "encoder.json"
    doc = json.loads(info.read_text())
    doc["dataset"] = "cyc"
    info.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="does not describe the dataset"):
        train(TrainConfig(dataset="cyc", backbone=str(home / "tiny-backbone"), name="r", max_steps=1, quiet=True))


@pytest.mark.timeout(60)
def test_synthetic_users_beyond_what_the_machine_prepares_are_refused_at_once(home):
    """Before: the range check allowed synthetic_users=10000000, which did not finish."""
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"synthetic_users must be in \[10, 100000\]"):
        prepare(PrepareConfig(dataset="huge", synthetic_users=10_000_000))
    assert time.perf_counter() - t0 < 2


@pytest.mark.timeout(60)
def test_a_candidate_table_too_large_is_refused_before_reading(home, tmp_path):
    """Before: ml-100k with --draws 1000 --candidates 1600 ran out of memory at 3.6 GB while drawing."""
    from ilora_cli.data.checks import check_candidate_table

    source = tmp_path / "ml"
    source.mkdir()
    (source / "u.item").write_text("".join(f"{i}|Movie {i} (1990)|01-Jan-1990||\n" for i in range(1, 1701)))
    (source / "u.data").write_text(
        "".join(f"{u}\t{1 + (u * 7 + k) % 1700}\t5\t{k}\n" for u in range(1, 30) for k in range(20))
    )
    with pytest.raises(UserError, match="1,600,000 candidates per val/test row; at most 100,000"):
        prepare(PrepareConfig(dataset="ml", format="ml-100k", input=source, draws=1000, candidates=1600))
    assert not (home / "datasets" / "ml").exists()
    # within the per-row limit, the table is still weighed against the memory available
    with pytest.raises(UserError, match="about 3.0 GiB of memory .* more than half of the 4.0 GiB available"):
        check_candidate_table(rows=1_000, draws=1_000, candidates=100, available=4 << 30)
    check_candidate_table(rows=1_000, draws=5, candidates=20, available=4 << 30)
