"""Property-based tests: every reader, given arbitrary input, returns a result or raises a UserError (one
sentence, exit code 2 on the command line) — never another exception. Each property runs a fixed number of
generated cases (``EXAMPLES``), reproducibly (derandomized); set ILORA_PROPERTY_EXAMPLES for a longer search."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilora_cli.errors import UserError

EXAMPLES = int(os.environ.get("ILORA_PROPERTY_EXAMPLES", "60"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# Text that looks like the formats: their separators and digits often, anything else sometimes.
_PIECES = st.sampled_from(
    ["|", "\t", ",", ";", "::", "\n", "\r\n", '"', "'", "{", "}", "[", "]", ":", " ", "0", "1", "42", "-1",
     "99999999999999999999999", "nan", "inf", "1e400", "\ufeff", "\x00", "é", "title", "user", "item",
     "timestamp", "item_id", "user_id", "2017-12-17", "True", "None", "'username': ", "'product_id': ",
     "'date': ", "'id': ", "'app_name': "]
)  # fmt: skip
FORMAT_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=60).map("".join)
ANY_BYTES = st.binary(max_size=400)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


def _outcome(fn, *args):
    """Call a reader: a result or a UserError pass; anything else fails the property."""
    try:
        return fn(*args)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
        return None


def _file(data: str | bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ilora-prop-"))
    path = folder / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    elif isinstance(data, str):
        path.write_bytes(data.encode("utf-8", "surrogatepass"))
    else:
        path.write_bytes(data)
    return path


# -- raw formats ---------------------------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(FORMAT_TEXT, ANY_BYTES), st.one_of(FORMAT_TEXT, ANY_BYTES))
def test_movielens_readers(items, ratings):
    from ilora_cli.data.formats import movielens

    found = _outcome(movielens.read_items, _file(items, "u.item"), list(movielens.GENRES))
    n_items = len(found[0]) if found else 5
    _outcome(movielens.read_ratings, _file(ratings, "u.data"), n_items)
    _outcome(movielens.read_genres, _file(items, "u.genre"))


@PROPERTY
@given(st.one_of(FORMAT_TEXT, ANY_BYTES), st.one_of(FORMAT_TEXT, ANY_BYTES))
def test_hetrec_lastfm_readers(tags, artists):
    from ilora_cli.data.formats import hetrec_lastfm

    _outcome(hetrec_lastfm.read_tag_times, _file(tags, hetrec_lastfm.TAGS_FILE))
    _outcome(hetrec_lastfm.read_artists, _file(artists, hetrec_lastfm.ARTISTS_FILE))


@PROPERTY
@given(st.one_of(FORMAT_TEXT, ANY_BYTES, st.builds(lambda v: repr(v) + "\n", JSON_VALUES)), FORMAT_TEXT)
def test_steam_readers(reviews, games):
    from ilora_cli.data.formats import steam

    _outcome(steam.read_reviews, _file(reviews, steam.REVIEWS_FILE))
    _outcome(steam.read_games, _file(games, steam.GAMES_FILE))


@PROPERTY
@given(st.one_of(FORMAT_TEXT, ANY_BYTES), st.one_of(FORMAT_TEXT, ANY_BYTES), st.sampled_from([".csv", ".jsonl", ""]))
def test_interactions_readers(items, events, suffix):
    from ilora_cli.data.formats import interactions

    found = _outcome(interactions.read_items, _file(items, "items" + suffix))
    index = {s: i for i, s in enumerate(found[0])} if found else {"a": 0}
    _outcome(interactions.read_interactions, _file(events, "events" + suffix), index, "items")


@PROPERTY
@given(st.lists(JSON_VALUES, max_size=6), st.sampled_from([".jsonl", ".csv"]))
def test_interactions_jsonl_objects(rows, suffix):
    from ilora_cli.data.formats import interactions

    text = "".join(json.dumps(r) + "\n" for r in rows)
    _outcome(interactions.read_interactions, _file(text, "events" + suffix), {"1": 0, "a": 1}, "items")


# -- the LLaRA format ----------------------------------------------------------------------------------------------

_CELL = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.none(),
    st.text(max_size=3),
    st.floats(),
    st.tuples(st.integers()),
)


@PROPERTY
@given(
    st.lists(st.tuples(st.lists(_CELL, max_size=12), _CELL, _CELL), max_size=8),
    st.one_of(FORMAT_TEXT, ANY_BYTES),
)
def test_llara_rows_and_titles(rows, names):
    from ilora_cli.data.formats.llara import _read_id2name, _read_u_item, _rows

    frame = pd.DataFrame({"seq": [r[0] for r in rows], "len_seq": [r[1] for r in rows], "next": [r[2] for r in rows]})
    _outcome(_rows, frame, Path("train_data.df"), 10)
    _outcome(_read_id2name, _file(names, "id2name.txt"))
    _outcome(_read_u_item, _file(names, "u.item"))


@PROPERTY
@given(ANY_BYTES)
def test_the_restricted_unpickler_on_arbitrary_bytes(data):
    from ilora_cli.data.safe_pickle import load_dataframe

    _outcome(load_dataframe, _file(data, "train_data.df"))


# -- recommend histories, configs and overrides ------------------------------------------------------------------


@PROPERTY
@given(st.one_of(FORMAT_TEXT, ANY_BYTES, st.builds(json.dumps, JSON_VALUES)))
def test_recommend_histories_and_item_resolution(data):
    from ilora_cli.evaluation.recommend import BadLine, ItemResolver, read_histories

    found = _outcome(read_histories, _file(data, "history.json"))
    resolve = ItemResolver(["Alpha", "alpha beta", "Gamma"])
    for user in (found or ([], False))[0]:
        if isinstance(user, BadLine):
            continue
        entries = user["history"] if isinstance(user, dict) else user
        for entry in entries if isinstance(entries, list) else []:
            _outcome(resolve, entry)


@PROPERTY
@given(st.one_of(FORMAT_TEXT, ANY_BYTES), st.lists(FORMAT_TEXT, max_size=4))
def test_yaml_configs_and_overrides(config_text, overrides):
    from ilora_cli.config import resolve
    from ilora_cli.data.prepare import PrepareConfig
    from ilora_cli.encoders.train import EncodeConfig
    from ilora_cli.evaluation.evaluate import EvalConfig
    from ilora_cli.training.loop import TrainConfig

    path = _file(config_text, "config.yaml")
    for cls in (TrainConfig, PrepareConfig, EncodeConfig, EvalConfig):
        _outcome(resolve, cls, path, None, overrides)


_KEYS = st.sampled_from(["lr", "alpha", "experts", "rank", "epochs", "seed", "draws", "hidden_size", "max_history"])


@PROPERTY
@given(st.lists(st.tuples(_KEYS, st.one_of(FORMAT_TEXT, st.floats().map(str), st.integers().map(str))), max_size=4))
def test_numeric_overrides(pairs):
    from ilora_cli.config import resolve
    from ilora_cli.data.prepare import PrepareConfig
    from ilora_cli.encoders.train import EncodeConfig
    from ilora_cli.training.loop import TrainConfig

    for cls in (TrainConfig, PrepareConfig, EncodeConfig):
        known = [f"{k}={v}" for k, v in pairs if k in cls.__dataclass_fields__]
        _outcome(resolve, cls, None, None, known)


# -- run directories: ilora.json documents -------------------------------------------------------------------------

_GOOD_INFO = {
    "backbone": {"name": "x", "dtype": "float32", "load_in_4bit": False},
    "experts": {"experts": 4, "rank": 16, "alpha": 32.0, "dropout": 0.05, "gate": "user",
                "target_modules": "all-linear", "hybrid": True, "user_token": False},
    "encoder": {"type": "sasrec", "name": "e", "sha256": "0" * 64},
    "dataset": {"name": "d", "checksum": "c", "n_items": 30, "domain": "music", "max_history": 10, "pad_id": 30},
    "fusion": {"llm": 0.0, "encoder": 1.0},
}  # fmt: skip


def _mutate(doc: dict, path: list[str], value) -> dict:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key] if isinstance(node.get(key), dict) else node.setdefault(key, {})
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()
_PATHS = st.sampled_from(
    [[s, k] for s, keys in _GOOD_INFO.items() for k in keys] + [[s] for s in _GOOD_INFO] + [["format_version"]]
)


@PROPERTY
@given(_PATHS, st.one_of(JSON_VALUES, st.just(_DELETE)))
def test_edited_ilora_json_is_read_or_refused(path, value):
    from ilora_cli.training.run import read_info

    run = _file(json.dumps(_mutate(_GOOD_INFO, path, value)), "ilora.json").parent
    info = _outcome(read_info, run)
    if info is not None:  # what passes the schema can build the expert config
        from ilora_cli.llm.model import ExpertConfig

        ExpertConfig(**info["experts"]).validate()


@pytest.mark.parametrize("seed", range(3))
def test_the_property_strategies_generate_varied_inputs(seed):
    """Guard against a strategy that silently generates nothing (which would make the properties vacuous)."""
    rng = np.random.default_rng(seed)
    samples = {FORMAT_TEXT.example() for _ in range(int(rng.integers(5, 10)))}
    assert len(samples) > 1
