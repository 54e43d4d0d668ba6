"""History entries as ``recommend``, its Python API and ``serve`` read them (``ItemResolver``, no model needed):
an object that names its item twice must name one item, and no entry is too deep or too large to be named in
the one sentence that refuses it."""

from __future__ import annotations

import pytest

from ilora_cli.errors import UserError, describe
from ilora_cli.evaluation.recommend import ItemResolver

TITLES = [f"Item {chr(65 + i % 26)}{i}" for i in range(30)]


def _nested(depth: int, inner=1):
    value = inner
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "entry,sentence",
    [
        (
            {"item_id": 1, "title": "Item H7"},
            "The history entry names different items: item_id 1 is 'Item B1' and title 'Item H7' is id 7; "
            "give one of them.",
        ),
        (
            {"id": 1, "item_id": 2},
            "The history entry names different items: item_id 2 is 'Item C2' and id 1 is 'Item B1'; give one of them.",
        ),
        (
            {"item_id": 1, "id": 1, "title": "Item C2"},
            "The history entry names different items: item_id 1 is 'Item B1', id 1 is 'Item B1' and title "
            "'Item C2' is id 2; give one of them.",
        ),
        ({"item_id": 1, "title": "Painted Orchard"}, "Unknown title 'Painted Orchard'."),
        ({"item_id": 1, "id": [2]}, "The history entry's id [2] is neither an item id nor a title."),
    ],
)
def test_an_entry_that_names_two_items_is_refused(entry, sentence):
    with pytest.raises(UserError) as refused:
        ItemResolver(TITLES)(entry)
    assert str(refused.value) == sentence


def test_an_entry_that_names_one_item_several_ways_is_read():
    resolve = ItemResolver(TITLES)
    assert resolve({"item_id": 1, "title": "Item B1"}) == 1
    assert resolve({"id": 3, "item_id": 3, "title": "item d3"}) == 3  # the title case-insensitively
    assert resolve({"id": 4, "rating": 5}) == 4  # other keys are not names
    assert resolve({"title": "Item F5"}) == 5
    assert resolve({"item_id": 2, "title": "Item C2"}, "candidate") == 2


@pytest.mark.parametrize(
    "entry,sentence",
    [
        (_nested(5000), "The history entry [[[[...]]]] is neither an item id nor a title."),
        ({"item_id": _nested(5000)}, "The history entry's item_id [[[[...]]]] is neither an item id nor a title."),
        (10**5000, "Unknown item id an integer of 16610 bits: ids run from 0 to 29."),
        ({1, 2}, "The history entry set is neither an item id nor a title."),
        (["x" * 100_000], 'The history entry ["' + "x" * 55 + '..."] is neither an item id nor a title.'),
    ],
    ids=["list-5000-deep", "item_id-5000-deep", "int-5000-digits", "set", "long-title"],
)
def test_any_entry_is_refused_in_one_short_sentence(entry, sentence):
    """json.dumps of an entry nested 950 deep raised RecursionError (a 500 from ilora serve)."""
    with pytest.raises(UserError) as refused:
        ItemResolver(TITLES)(entry)
    assert str(refused.value) == sentence


def test_describe_shows_json_cut_to_three_levels_and_three_items():
    deep: dict = {}
    node = deep
    for _ in range(10_000):
        node["a"] = node = {}
    assert describe(deep) == '{"a": {"a": {"a": {...}}}}'
    assert describe([1, "x", None, True]) == '[1, "x", null, ...]'
    assert describe({"name": "x"}) == '{"name": "x"}'
    assert describe([[], {}]) == "[[], {}]"
    assert describe(2**64) == "an integer of 65 bits"


def test_numpy_integer_ids_are_read_as_ids_and_numpy_booleans_and_floats_are_refused():
    """Before: `ilora_cli.api.recommend(RUN, [[numpy.int64(3)]])` did not take an id read from an array (a
    TypeError from the JSON output, or a refusal naming int64)."""
    import json

    import numpy as np

    resolve = ItemResolver(TITLES)
    for value in (np.int64(3), np.int32(3), np.uint8(3)):
        got = resolve(value)
        assert got == 3 and type(got) is int and json.dumps(got) == "3"
        assert resolve({"item_id": value, "title": "Item D3"}) == 3
    with pytest.raises(UserError, match="Unknown item id 30"):
        resolve(np.int64(30))
    for value, named in ((np.bool_(True), "bool"), (np.float64(3.0), "3.0"), (np.float32(3.0), "float32")):
        with pytest.raises(UserError, match=f"The history entry {named} is neither an item id nor a title"):
            resolve(value)
