"""Raw source formats (ml-100k, hetrec-lastfm, steam, interactions) on tiny fixtures in their real layouts."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ilora_cli.data.formats import loader
from ilora_cli.data.prepare import PrepareConfig, prepare
from ilora_cli.data.prepared import PreparedDataset
from ilora_cli.data.source import SourceData
from ilora_cli.errors import UserError

N_GENRES = 19


# ---------------------------------------------------------------------------------------------- helpers


def check_splits(data: SourceData, sequences: list[list[int]], max_history: int = 10) -> None:
    """Every row is a window of its user's sequence; train = all prefixes, val/test = the last item."""
    n_items = len(data.titles)
    assert data.n_users == len(sequences)
    owners = {}
    for split, rows in data.splits.items():
        users = set(rows.user.tolist())
        for other, seen in owners.items():
            assert not users & seen, f"{split} and {other} share users"
        owners[split] = users
        for i in range(len(rows)):
            seq = sequences[rows.user[i]]
            n = int(rows.len_seq[i])
            hist = rows.seq[i, :n].tolist()
            assert (rows.seq[i, n:] == n_items).all()  # right-padded with PAD = n_items
            t = next(t for t in range(1, len(seq)) if seq[t] == rows.next[i] and seq[max(0, t - n) : t] == hist)
            assert n == min(t, max_history)
            if split != "train":
                assert t == len(seq) - 1
        per_user = [len(sequences[u]) - 1 if split == "train" else 1 for u in users]
        assert len(rows) == sum(per_user)
    assert set().union(*owners.values()) == {u for u, s in enumerate(sequences) if len(s) >= 2}
    n = len(sequences)
    assert len(owners["train"]) == round(0.8 * n) and len(owners["val"]) == round(0.1 * n)


def load(fmt: str, **kwargs) -> SourceData:
    return loader(fmt)(PrepareConfig(format=fmt, **kwargs))


# ---------------------------------------------------------------------------------------------- ml-100k

ML_TITLES = {
    1: "Toy Story (1995)",
    2: "Usual Suspects, The (1995)",
    3: "unknown",
    4: "Land Before Time III: The Time of the Great Giving (1995) (V)",
    5: "Hamlet (1996)",
    6: "Hamlet (1948)",
    7: "Misérables, Les (1995)",
}
ML_ITEMS = 30  # the last ones are never rated


def ml_ratings(n_users: int = 20, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for user in range(1, n_users + 1):
        movies = rng.choice(np.arange(1, ML_ITEMS - 3), size=int(rng.integers(3, 14)), replace=False)
        for movie in movies:
            # Coarse times give ties, which must be broken by movie id.
            out.append((user * 7 % 23 + 1, int(movie), int(rng.integers(1, 6)), 880000000 + int(rng.integers(0, 6))))
    return out


def write_ml100k(root: Path, ratings=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ratings = ml_ratings() if ratings is None else ratings
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings), encoding="latin-1")
    lines = []
    for movie in range(1, ML_ITEMS + 1):
        title = ML_TITLES.get(movie, f"Movie {movie} (19{movie + 40})")
        date = "" if title == "unknown" else "01-Jan-1995"
        flags = ["0"] * N_GENRES
        flags[movie % N_GENRES] = "1"
        lines.append("|".join([str(movie), title, date, "", "http://example.org", *flags]) + "\n")
    (root / "u.item").write_bytes("".join(lines).encode("latin-1"))
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary"]
    genres += ["Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi"]
    genres += ["Thriller", "War", "Western"]
    (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n", encoding="latin-1")
    return root


def ml_sequences(ratings) -> list[list[int]]:
    by_user: dict[int, list[tuple[int, int]]] = {}
    for u, i, _, t in ratings:
        by_user.setdefault(u, []).append((t, i - 1))
    return [[i for _, i in sorted(by_user[u])] for u in sorted(by_user)]


def test_ml100k_items_titles_and_splits(tmp_path):
    root = write_ml100k(tmp_path / "ml-100k")
    data = load("ml-100k", input=root)
    assert len(data.titles) == ML_ITEMS  # unrated movies are items too
    assert data.domain == "movies"
    assert data.titles[0] == "Toy Story"
    assert data.titles[1] == "The Usual Suspects"
    assert data.titles[2] == "unknown"
    assert data.titles[3].endswith("(V)")
    assert data.titles[4] == data.titles[5] == "Hamlet"
    assert data.titles[6] == "Les Misérables"
    assert data.title_hints[4:6] == ["1996", "1948"]
    assert data.title_hints[2] is None
    assert data.source_ids[:2] == ["1", "2"]
    assert data.metadata[1]["genres"] == ["Adventure"]  # flag 2 % 19
    assert data.source["format"] == "ml-100k"
    assert set(data.source["files"]) == {"u.data", "u.item", "u.genre"}
    assert data.source["split_seed"] == 42
    check_splits(data, ml_sequences(ml_ratings()))


def test_ml100k_accepts_a_file_inside_the_directory_and_a_max_history(tmp_path):
    root = write_ml100k(tmp_path / "ml-100k")
    data = load("ml-100k", input=root / "u.data", max_history=4, seed=7)
    assert data.splits["train"].seq.shape[1] == 4
    assert data.source["split_seed"] == 7
    check_splits(data, ml_sequences(ml_ratings()), max_history=4)


def test_ml100k_from_a_parent_directory_or_an_archive(tmp_path, ilora_home):
    write_ml100k(tmp_path / "data" / "ml-100k")
    data = load("ml-100k", input=tmp_path / "data")
    assert len(data.titles) == ML_ITEMS
    archive = shutil.make_archive(str(tmp_path / "ml-100k"), "zip", root_dir=tmp_path / "data")
    data = load("ml-100k", input=Path(archive))
    assert len(data.titles) == ML_ITEMS and data.source["input"] == archive
    assert (ilora_home / "cache" / "downloads" / "ml-100k" / "unpacked").is_dir()


def test_prepare_writes_a_dataset_that_reads_back(tmp_path):
    root = write_ml100k(tmp_path / "ml-100k")
    out = tmp_path / "prepared"
    meta = prepare(
        PrepareConfig(dataset="ml", format="ml-100k", input=root, output=out, candidates=8, draws=2, min_history=1)
    )
    ds = PreparedDataset.open(out)
    assert ds.n_items == ML_ITEMS and meta["n_users"] == 20
    assert ds.domain == "movies"
    assert ds.titles[4] == "Hamlet (1996)" and ds.titles[5] == "Hamlet (1948)"
    assert ds.meta["source"]["format"] == "ml-100k"
    for split in ("train", "val", "test"):
        part = ds.split(split)
        assert len(part) == meta["splits"][split] > 0
    test = ds.split("test")
    assert test.candidates.shape == (len(test), 2, 8)
    assert all(test.next[i] in test.candidates[i, d] for i in range(len(test)) for d in range(2))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-item", "u.item"),
        ("commas", "comma"),
        ("bad-user", "user id"),
        ("empty", "no ratings"),
        ("unknown-movie", "movie 99"),
        ("item-gap", "id 2 is missing"),
    ],
)
def test_ml100k_bad_input(tmp_path, case, message):
    root = write_ml100k(tmp_path / "ml-100k")
    if case == "no-item":
        (root / "u.item").unlink()
    elif case == "commas":
        (root / "u.data").write_text("1,1,5,880000000\n1,2,4,880000001\n")
    elif case == "bad-user":
        (root / "u.data").write_text("1\t1\t5\t880000000\nx7\t2\t4\t880000001\n")
    elif case == "empty":
        (root / "u.data").write_text("\n")
    elif case == "unknown-movie":
        (root / "u.data").write_text("1\t99\t5\t880000000\n")
    elif case == "item-gap":
        lines = (root / "u.item").read_text(encoding="latin-1").splitlines(keepends=True)
        (root / "u.item").write_text("".join(lines[:1] + lines[2:]), encoding="latin-1")
    with pytest.raises(UserError, match=message):
        load("ml-100k", input=root)


def test_raw_formats_need_input_or_download(tmp_path):
    with pytest.raises(UserError, match="--input .*--download"):
        load("ml-100k")
    with pytest.raises(UserError, match="does not exist"):
        load("hetrec-lastfm", input=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- hetrec-lastfm

ARTISTS = {2: "Diary of Dreams", 5: "Mötley Crüe", 51: "Duran Duran", 52: "Sigur Rós", 70: "Never Tagged"}
ARTISTS.update({100 + k: f"Artist {k}" for k in range(20)})


def hetrec_tags(n_users: int = 10, seed: int = 1) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    tagged = [a for a in ARTISTS if a != 70]
    out = []
    for user in range(2, 2 + n_users):
        for artist in rng.choice(tagged, size=int(rng.integers(2, 9)), replace=False):
            # Each artist tagged two or three times: only the first time counts.
            for _ in range(int(rng.integers(2, 4))):
                out.append(
                    (
                        user,
                        int(artist),
                        int(rng.integers(1, 80)),
                        1_200_000_000_000 + int(rng.integers(0, 50)) * 1000,
                    )
                )
    out.append((99, 9999, 1, 1_200_000_000_000))  # an artist without a name: dropped
    out.append((99, 9999, 1, 1_200_000_001_000))
    return out


def write_hetrec(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["userID\tartistID\ttagID\ttimestamp"] + ["\t".join(map(str, r)) for r in hetrec_tags()]
    (root / "user_taggedartists-timestamps.dat").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    lines = ["id\tname\turl\tpictureURL"]
    lines += [f"{a}\t{name}\thttp://www.last.fm/music/{a}\thttp://img/{a}.jpg" for a, name in ARTISTS.items()]
    (root / "artists.dat").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def hetrec_sequences() -> tuple[list[int], list[list[int]]]:
    rows = [r for r in hetrec_tags() if r[1] in ARTISTS]
    used = sorted({a for _, a, _, _ in rows})
    first: dict[int, dict[int, int]] = {}
    for u, a, _, t in rows:
        first.setdefault(u, {})
        first[u][a] = min(t, first[u].get(a, t))
    seqs = [[used.index(a) for t, a in sorted((t, a) for a, t in first[u].items())] for u in sorted(first)]
    return used, seqs


def test_hetrec_items_in_source_id_order(tmp_path):
    data = load("hetrec-lastfm", input=write_hetrec(tmp_path / "hetrec"))
    used, seqs = hetrec_sequences()
    assert data.source_ids == [str(a) for a in used]
    assert "70" not in data.source_ids and "9999" not in data.source_ids
    assert data.titles[:4] == ["Diary of Dreams", "Mötley Crüe", "Duran Duran", "Sigur Rós"]
    assert data.domain == "music"
    assert data.metadata[0] == {"url": "http://www.last.fm/music/2"}
    assert any("9999" in note for note in data.notes)
    check_splits(data, seqs)


@pytest.mark.parametrize(
    "case, message",
    [
        ("latin1", "artists.dat is not UTF-8"),
        ("commas", "not tab-separated"),
        ("no-artists", "artists.dat is missing"),
        ("bad-id", "artist id 'x'"),
        ("empty", "no tag assignments"),
    ],
)
def test_hetrec_bad_input(tmp_path, case, message):
    root = write_hetrec(tmp_path / "hetrec")
    tags = root / "user_taggedartists-timestamps.dat"
    if case == "latin1":
        (root / "artists.dat").write_bytes("id\tname\turl\tpictureURL\n5\tMötley Crüe\tu\tp\n".encode("latin-1"))
    elif case == "commas":
        tags.write_text("userID,artistID,tagID,timestamp\n2,5,1,1200000000000\n")
    elif case == "no-artists":
        (root / "artists.dat").unlink()
    elif case == "bad-id":
        tags.write_text("userID\tartistID\ttagID\ttimestamp\n2\tx\t1\t1200000000000\n")
    elif case == "empty":
        tags.write_text("userID\tartistID\ttagID\ttimestamp\n")
    with pytest.raises(UserError, match=message):
        load("hetrec-lastfm", input=root)


# ---------------------------------------------------------------------------------------------- steam


def steam_reviews() -> list[dict]:
    rng = np.random.default_rng(2)
    games = ["10", "20", "30", "40", "70", "80", "240", "300", "1001", "1002", "1003", "1004", "999"]
    out = []
    for k in range(10):
        for g in rng.choice(games, size=int(rng.integers(2, 7)), replace=False):
            day = int(rng.integers(1, 6))
            out.append(
                {
                    "username": f"user {k}'s" if k != 2 else 'back\\slash "quoted"',
                    "hours": 1.5,
                    "product_id": str(g),
                    "page_order": 0,
                    "date": f"2017-0{day}-0{day}",
                    "text": 'it\'s "great"\n',
                    "early_access": False,
                }
            )
    out.append(dict(out[0]))  # the same game reviewed twice by one user: kept once
    return out


def steam_games() -> list[dict]:
    games = [
        {"id": g, "app_name": f"Game {g}", "release_date": "2015-03-01", "genres": ["Action"]}
        for g in ("10", "20", "30", "40", "70", "80", "300", "1001", "1002", "1003", "1004", "5000")
    ]
    games.append({"id": "240", "title": "Counter-Strike:  Source"})  # title only, extra space
    games.append({"app_name": "No Id At All"})
    return games  # game 999 has no entry: its reviews are dropped


def write_steam(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "steam_reviews.json.gz", "wt", encoding="utf-8") as f:
        for i, r in enumerate(steam_reviews()):
            # Most lines in the released key order; some in another order, one as JSON.
            line = repr(dict(reversed(r.items()))) if i % 5 == 0 else json.dumps(r) if i == 1 else repr(r)
            f.write(line + "\n")
    with gzip.open(root / "steam_games.json.gz", "wt", encoding="utf-8") as f:
        for i, g in enumerate(steam_games()):
            # One line as JSON (true/null are not Python literals): the fallback must read it.
            f.write((json.dumps(dict(g, early_access=True, price=None)) if i == 1 else repr(g)) + "\n")
    return root


def steam_expected() -> tuple[list[str], list[list[int]]]:
    titled = {g["id"] for g in steam_games() if "id" in g}
    reviews = [r for r in steam_reviews() if r["product_id"] in titled]
    named = sorted({r["product_id"] for r in reviews}, key=int)
    by_user: dict[str, list[tuple[str, int, str]]] = {}
    for k, r in enumerate(reviews):
        by_user.setdefault(r["username"], []).append((r["date"], k, r["product_id"]))
    seqs = []
    for user in sorted(by_user):
        seq: list[int] = []
        for _, _, g in sorted(by_user[user]):
            if named.index(g) not in seq:
                seq.append(named.index(g))
        seqs.append(seq)
    return named, seqs


def test_steam_python_literals(tmp_path):
    data = load("steam", input=write_steam(tmp_path / "steam"))
    named, seqs = steam_expected()
    assert data.source_ids == named
    assert "999" not in named and "5000" not in named
    assert data.titles[named.index("240")] == "Counter-Strike: Source"
    assert data.titles[named.index("20")] == "Game 20"  # the JSON line
    assert data.title_hints[0] == "2015"
    assert data.metadata[0]["genres"] == ["Action"]
    assert data.domain == "games"
    assert any("repeated" in n for n in data.notes) and any("no title" in n for n in data.notes)
    check_splits(data, seqs)


def test_steam_review_prefix_reading_matches_full_evaluation(tmp_path):
    from ilora_cli.data.formats.steam import _REVIEW_PREFIX, review_fields

    root = write_steam(tmp_path / "steam")
    reviews = steam_reviews()
    assert _REVIEW_PREFIX.match(repr(reviews[2])) and _REVIEW_PREFIX.match(repr(reviews[3]))
    fast = list(review_fields(root / "steam_reviews.json.gz"))
    assert fast == [(k + 1, r["username"], r["product_id"], r["date"]) for k, r in enumerate(reviews)]


@pytest.mark.parametrize(
    "case, message",
    [
        ("garbage", "line 2 is neither a Python dict literal nor JSON"),
        ("date", "not YYYY-MM-DD"),
        ("no-games", "steam_games.json.gz is missing"),
        ("not-gzip", "not a readable gzip"),
        ("no-reviews", "no reviews"),
    ],
)
def test_steam_bad_input(tmp_path, case, message):
    root = write_steam(tmp_path / "steam")
    reviews = root / "steam_reviews.json.gz"
    if case == "garbage":
        reviews.write_bytes(
            gzip.compress(b"{'username': 'a', 'product_id': '10', 'date': '2017-01-01'}\n__import__('os')\n")
        )
    elif case == "date":
        reviews.write_bytes(gzip.compress(b"{'username': 'a', 'product_id': '10', 'date': 'Jan 1, 2017'}\n"))
    elif case == "no-games":
        (root / "steam_games.json.gz").unlink()
    elif case == "not-gzip":
        reviews.write_bytes(b"{'username': 'a'}\n")
    elif case == "no-reviews":
        reviews.write_bytes(gzip.compress(b"{'hours': 3}\n"))
    with pytest.raises(UserError, match=message):
        load("steam", input=root)


# ---------------------------------------------------------------------------------------------- interactions

ITEMS = [("b", "Beta", "rock"), ("a", "Alpha", "pop"), ("c", "Gamma", "jazz"), ("z", "Unused", "none")]


def interaction_rows() -> list[tuple[str, str, int]]:
    rng = np.random.default_rng(3)
    return [(f"u{k % 10}", str(rng.choice(["a", "b", "c"])), int(rng.integers(0, 5))) for k in range(60)]


def interactions_expected() -> list[list[int]]:
    order = [i for i, _, _ in ITEMS]
    by_user: dict[str, list[tuple[int, int, int]]] = {}
    for k, (u, i, t) in enumerate(interaction_rows()):
        by_user.setdefault(u, []).append((t, k, order.index(i)))
    return [[i for _, _, i in sorted(v)] for v in by_user.values()]


def write_interactions(root: Path, kind: str) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    if kind == "csv":
        inter, items = root / "events.csv", root / "items.csv"
        inter.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in interaction_rows()))
        items.write_text("item,title,genre\n" + "".join(f'{i},"{t}",{g}\n' for i, t, g in ITEMS))
    else:
        inter, items = root / "events.jsonl", root / "items.jsonl"
        inter.write_text(
            "".join(json.dumps({"user_id": u, "item_id": i, "timestamp": t}) + "\n" for u, i, t in interaction_rows())
        )
        items.write_text("".join(json.dumps({"item_id": i, "title": t, "genre": g}) + "\n" for i, t, g in ITEMS))
    return inter, items


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_interactions(tmp_path, kind):
    inter, items = write_interactions(tmp_path, kind)
    data = load("interactions", input=inter, items=items)
    assert data.titles == ["Beta", "Alpha", "Gamma", "Unused"]
    assert data.source_ids == ["b", "a", "c", "z"]
    assert data.metadata[0] == {"genre": "rock"}
    assert data.domain == "generic"
    assert set(data.source["files"]) == {inter.name, items.name}
    check_splits(data, interactions_expected())


def test_interactions_iso_dates_and_no_timestamp(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n1,One\n2,Two\n3,Three\n")
    inter = tmp_path / "events.csv"
    inter.write_text("user_id,item_id,timestamp\nu,3,2020-01-03\nu,1,2020-01-01T10:00:00\nu,2,2020-01-02\n")
    data = load("interactions", input=inter, items=items)
    assert data.n_users == 1 and len(data.splits["train"]) == 2
    assert data.splits["train"].next.tolist() == [1, 2]
    inter.write_text("user\titem\nu\t3\nu\t1\nu\t2\n")  # tab-separated, no timestamps: file order
    data = load("interactions", input=inter, items=items)
    assert data.splits["train"].next.tolist() == [0, 1]
    assert data.notes


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown-item", "item 'q'"),
        ("not-utf8", "events.csv is not UTF-8"),
        ("no-column", "columns user, item"),
        ("empty", "events.csv is empty"),
        ("no-items", "--items"),
        ("bad-time", "timestamp 'soon'"),
        ("duplicate-item", "lists item 'a' again"),
        ("bad-json", "line 2 is not a JSON object"),
    ],
)
def test_interactions_bad_input(tmp_path, case, message):
    inter, items = write_interactions(tmp_path, "csv")
    kwargs = {"input": inter, "items": items}
    if case == "unknown-item":
        inter.write_text("user,item,timestamp\nu1,a,1\nu1,q,2\nu2,r,3\n")
    elif case == "not-utf8":
        inter.write_bytes("user,item,timestamp\nJosé,a,1\n".encode("latin-1"))
    elif case == "no-column":
        inter.write_text("who,what,when\nu1,a,1\n")
    elif case == "empty":
        inter.write_text("")
    elif case == "no-items":
        kwargs["items"] = None
    elif case == "bad-time":
        inter.write_text("user,item,timestamp\nu1,a,soon\n")
    elif case == "duplicate-item":
        items.write_text("item,title\na,Alpha\nb,Beta\na,Again\n")
    elif case == "bad-json":
        inter = tmp_path / "events.jsonl"
        inter.write_text('{"user": "u", "item": "a", "timestamp": 1}\n{"user": "u", \n')
        kwargs["input"] = inter
    with pytest.raises(UserError, match=message):
        load("interactions", **kwargs)
