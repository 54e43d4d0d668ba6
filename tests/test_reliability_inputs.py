"""Bad settings and bad input files: every case ends in a result or one sentence (a UserError), never a
traceback, a hang, or an allocation sized by a number in the input instead of the input itself."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ilora_cli.config import resolve
from ilora_cli.data.prepare import PrepareConfig, prepare
from ilora_cli.encoders.train import EncodeConfig
from ilora_cli.errors import UserError
from ilora_cli.evaluation.evaluate import EvalConfig
from ilora_cli.evaluation.recommend import BadLine, RecommendConfig, read_histories
from ilora_cli.training.loop import TrainConfig

# -- settings: every command's numbers in range, NaN and infinities nowhere ------------------------------------------

BAD_SETTINGS = {
    TrainConfig: [
        "alpha=nan", "alpha=0", "alpha=inf", "lr=-1", "lr=nan", "lr=inf", "lora_dropout=5", "lora_dropout=-0.1",
        "threads=-3", "threads=0", "warmup_ratio=-2", "warmup_ratio=1.5", "min_lr_ratio=2", "max_grad_norm=0",
        "epochs=inf", "epochs=nan", "epochs=0", "weight_decay=-1", "gate_lr=-1", "projector_lr=nan",
        "distill_temperature=0", "distill_weight=nan", "fusion_lr=nan", "hard_negatives=2", "seed=-1",
        "batch_size=0", "experts=0", "rank=3", "gate=bogus", "candidates=1", "max_steps=0", "device=tpu",
    ],
    PrepareConfig: [
        "synthetic_items=5", "synthetic_items=100000", "synthetic_users=0", "synthetic_groups=0",
        "synthetic_groups=1000", "seed=-1", "candidates=1", "draws=0", "draws=1000000", "max_history=0",
        "min_history=0", "format=nope", "dataset=../x",
    ],
    EncodeConfig: [
        "hidden_size=0", "hidden_size=1000000", "lr=nan", "lr=0", "weight_decay=nan", "weight_decay=-1",
        "dropout=nan", "dropout=1", "seed=-1", "epochs=0", "batch_size=0", "name=../x",
    ],
    EvalConfig: [
        "draws=0", "draws=-1", "max_samples=-1", "max_samples=0", "batch_size=0", "candidates=retrieve:0",
        "candidates=retrieve:x", "device=tpu", "mode=x", "split=train", "num_beams=0",
    ],
    RecommendConfig: ["device=tpu", "device=cuda:x", "top_k=0", "retrieve=0", "normalize=x"],
}  # fmt: skip
REQUIRED = {EvalConfig: ["runs=[x]"], RecommendConfig: ["run=x", "user_history=h.json"]}
CASES = [(cls, bad) for cls, bads in BAD_SETTINGS.items() for bad in bads]


@pytest.mark.parametrize("cls,bad", CASES, ids=[f"{c.__name__}-{b}" for c, b in CASES])
def test_a_setting_out_of_range_is_one_sentence_naming_it(cls, bad):
    with pytest.raises(UserError) as exc:
        resolve(cls, overrides=[*REQUIRED.get(cls, []), bad])
    message, key = str(exc.value), bad.partition("=")[0]
    assert "\n" not in message
    assert key in message or key.replace("_", "-") in message, message  # the setting, or its flag


def test_train_refuses_an_output_that_is_a_file_and_unknown_target_modules(tiny_world, monkeypatch, tmp_path):
    from ilora_cli.training.loop import train

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    common = dict(dataset="cyc", backbone=str(tiny_world / "tiny-backbone"), batch_size=4, candidates=6, quiet=True)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train(TrainConfig(output=afile, max_steps=1, **common))
    with pytest.raises(UserError, match="target_modules"):
        train(TrainConfig(output=tmp_path / "r", target_modules="nonexistent_proj", max_steps=1, **common))


def test_retrieving_more_than_the_catalogue_is_refused(tiny_world, monkeypatch):
    from ilora_cli.evaluation.evaluate import evaluate

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    with pytest.raises(UserError, match="retrieve:"):
        evaluate(EvalConfig(encoder=True, dataset="cyc", candidates="retrieve:1000", quiet=True))


def test_fp16_on_a_gpu_trains_with_a_gradient_scaler():
    from ilora_cli.llm.backbone import mixed_precision

    assert mixed_precision("cuda", torch.float16) == "fp16"  # before: "no", plain fp16 without a scaler
    assert mixed_precision("cuda:1", torch.bfloat16) == "bf16"
    assert mixed_precision("cuda", torch.float32) == "no" and mixed_precision("cpu", torch.bfloat16) == "no"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_training_on_a_gpu_has_a_scaler_and_a_finite_loss(tiny_world, monkeypatch):
    from ilora_cli.training.loop import Trainer

    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    cfg = TrainConfig(
        dataset="cyc", backbone=str(tiny_world / "tiny-backbone"), name="fp16", dtype="float16", device="cuda",
        batch_size=4, candidates=6, max_steps=2, quiet=True,
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.accelerator.scaler is not None
    assert np.isfinite(trainer.run()["final_loss"])


# -- the packed-scoring probe ----------------------------------------------------------------------------------------


def test_a_backbone_that_ignores_position_ids_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MptConfig

    from ilora_cli.llm.backbone import check_packed_scoring, packed_scoring_error

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        attn_implementation="sdpa",
    ).eval()
    assert packed_scoring_error(llama) < 1e-5
    check_packed_scoring(llama, "llama")
    # MPT places tokens by ALiBi biases from the mask, not by position ids: packed answers would be misplaced
    mpt = AutoModelForCausalLM.from_config(
        MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4), attn_implementation="eager"
    ).eval()
    assert packed_scoring_error(mpt) > 1e-3
    with pytest.raises(UserError, match="not supported") as exc:
        check_packed_scoring(mpt, "tiny-mpt")
    assert "\n" not in str(exc.value)


def _tiny(kind: str):
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, GPTNeoXConfig

    torch.manual_seed(0)
    config, impl = {
        "gpt2": (GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1), "sdpa"),
        "gpt_neox": (GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64), "sdpa"),
        "bloom": (BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4), "eager"),  # no sdpa in Bloom
    }[kind]  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_the_packed_scoring_probe_accepts_gpt2_and_gpt_neox(kind):
    """docs/RELIABILITY.md: GPT-2 and GPT-NeoX honour position ids and a 4-D mask (they match to 0.0 in fp32)."""
    from ilora_cli.llm.backbone import check_packed_scoring, packed_scoring_error

    model = _tiny(kind)
    assert packed_scoring_error(model) < 1e-6
    check_packed_scoring(model, kind)


def test_the_packed_scoring_probe_refuses_bloom():
    """Bloom places tokens by ALiBi and cannot take the 4-D mask at all: the probe cannot run, so it is refused."""
    from ilora_cli.llm.backbone import check_packed_scoring, packed_scoring_error

    model = _tiny("bloom")
    assert packed_scoring_error(model) is None
    with pytest.raises(UserError, match="a probe cannot run it"):
        check_packed_scoring(model, "tiny-bloom")


# -- readers ---------------------------------------------------------------------------------------------------------


def _interactions(tmp_path: Path, rows: str, items: str = "item,title\na,Alpha\nb,Beta\nc,Gamma\n", suffix=".csv"):
    (tmp_path / f"events{suffix}").write_text(rows, encoding="utf-8")
    (tmp_path / "items.csv").write_text(items, encoding="utf-8")
    return PrepareConfig(
        dataset="x", format="interactions", input=tmp_path / f"events{suffix}", items=tmp_path / "items.csv"
    )


READER_CASES = {
    "csv field over 131072 characters": lambda d: _interactions(
        d, "user,item,timestamp\n", items="item,title\na," + "x" * 200_000 + "\n"
    ),
    "nan timestamp": lambda d: _interactions(d, "user,item,timestamp\nu,a,1\nu,b,nan\nu,c,3\n"),
    "inf timestamp": lambda d: _interactions(d, "user,item,timestamp\nu,a,1\nu,b,inf\nu,c,3\n"),
    "NaN timestamp in JSONL": lambda d: _interactions(
        d, '{"user": "u", "item": "a", "timestamp": NaN}\n', suffix=".jsonl"
    ),
    "huge timestamp in JSONL": lambda d: _interactions(
        d, '{"user": "u", "item": "a", "timestamp": 1' + "0" * 400 + "}\n", suffix=".jsonl"
    ),
    "JSONL nested 100k deep": lambda d: _interactions(d, "[" * 100_000 + "]" * 100_000 + "\n", suffix=".jsonl"),
    "interactions file is a folder": lambda d: (
        (d / "events.csv").mkdir(),
        PrepareConfig(dataset="x", format="interactions", input=d / "events.csv", items=d / "events.csv"),
    )[1],
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_a_bad_interactions_file_is_one_sentence(case, tmp_path, ilora_home):
    config = READER_CASES[case](tmp_path)
    with pytest.raises(UserError) as exc:
        prepare(config)
    assert "\n" not in str(exc.value)
    assert not (ilora_home / "datasets" / "x").exists()


def _ml100k(tmp_path: Path, udata: str) -> PrepareConfig:
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.item").write_text("".join(f"{i}|Movie {i} (1990)|01-Jan-1990||\n" for i in range(1, 31)))
    (d / "u.data").write_text(udata)
    return PrepareConfig(dataset="x", format="ml-100k", input=d)


@pytest.mark.parametrize(
    "udata",
    ["1\t2\t5\t" + "9" * 23 + "\n", "1" + "0" * 30 + "\t2\t5\t880000000\n", "1\t2\t5\t-" + "9" * 20 + "\n"],
    ids=["23-digit timestamp", "user id 10**30", "negative huge timestamp"],
)
def test_movielens_numbers_beyond_int64_are_one_sentence(udata, tmp_path, ilora_home):
    with pytest.raises(UserError, match="out of range"):
        prepare(_ml100k(tmp_path, udata))


def _llara(tmp_path: Path, id2name: str, val_width: int = 10) -> PrepareConfig:
    d = tmp_path / "llara"
    d.mkdir()
    rng = np.random.default_rng(0)

    def frame(n, width):
        rows = []
        for _ in range(n):
            items = rng.choice(40, size=4, replace=False).tolist()
            rows.append({"seq": items[:3] + [40] * (width - 3), "len_seq": 3, "next": items[3]})
        return pd.DataFrame(rows)

    frame(50, 10).to_pickle(d / "train_data.df")
    frame(10, val_width).to_pickle(d / "Val_data.df")
    (d / "id2name.txt").write_text(id2name, encoding="utf-8")
    return PrepareConfig(dataset="x", format="llara", input=d, trust_pickle=True)


def test_an_id2name_with_a_huge_id_allocates_nothing(tmp_path, ilora_home):
    names = "".join(f"{i}::Artist {i}\n" for i in range(40)) + "99999999999::B\n"
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="id 40 is missing"):  # before: a list over range(10**11), 19 GB
        prepare(_llara(tmp_path, names))
    assert time.perf_counter() - t0 < 1  # docs/RELIABILITY.md: well under a second (0.02 s measured)


def test_llara_splits_of_different_widths_are_one_sentence(tmp_path, ilora_home):
    names = "".join(f"{i}::Artist {i}\n" for i in range(40))
    with pytest.raises(UserError, match="slots"):
        prepare(_llara(tmp_path, names, val_width=12))


def test_a_huge_max_history_costs_what_the_data_holds(ilora_home):
    t0 = time.perf_counter()
    meta = prepare(PrepareConfig(dataset="big", max_history=1_000_000, synthetic_users=40))
    assert time.perf_counter() - t0 < 2  # before: minutes, a (rows, 10**6) table; docs: under 2 s (0.1-0.3 s here)
    assert meta["max_history"] == 23  # the longest history of the synthetic users (sequences of up to 24)


def test_an_archive_that_expands_too_far_is_refused(tmp_path):
    from ilora_cli.data.download import safe_extract

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("u.data", "w") as fh:
            zero = bytes(1 << 20)
            for _ in range(80):  # 80 MiB of zeros in a zip of about 80 KB
                fh.write(zero)
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(UserError, match="expands to more than"):
        safe_extract(archive, tmp_path / "out")


def test_a_deep_steam_line_is_one_sentence(tmp_path, ilora_home):
    import gzip

    d = tmp_path / "steam"
    d.mkdir()
    with gzip.open(d / "steam_reviews.json.gz", "wt") as fh:
        fh.write("[" * 100_000 + "]" * 100_000 + "\n")
    with gzip.open(d / "steam_games.json.gz", "wt") as fh:
        fh.write("{'id': '1', 'app_name': 'A'}\n")
    with pytest.raises(UserError, match="line 1"):
        prepare(PrepareConfig(dataset="x", format="steam", input=d))


# -- recommend histories ---------------------------------------------------------------------------------------------


def test_histories_bom_empty_deep_and_batch_lines(tmp_path):
    h = tmp_path / "h.json"
    h.write_bytes(b"\xef\xbb\xbf[1, 2, 3]")  # before: refused, while the interactions reader accepts a BOM
    assert read_histories(h) == ([[1, 2, 3]], False)
    h.write_text("  \n")
    with pytest.raises(UserError, match="empty"):  # before: the model loaded, then exit 0 and no output
        read_histories(h)
    h.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nested too deeply"):
        read_histories(h)
    with pytest.raises(UserError, match="folder"):
        read_histories(tmp_path)
    h.write_text('[1, 2]\n{"oops": 1}\n\n[3, 4\n' + "[" * 50_000 + "]" * 50_000 + "\n[5]\n")
    users, batch = read_histories(h)
    assert batch and users[0] == [1, 2] and users[-1] == [5]
    bad = [u for u in users if isinstance(u, BadLine)]
    assert [b.message.split(" line ")[1].split(" ")[0].rstrip(":") for b in bad] == ["2", "4", "5"]


def whole_file_histories(path: Path) -> tuple[list, bool] | str:
    """What recommend read before it streamed a batch (the whole file at once), as the reference a streamed read
    must equal: ``(users, batch)`` with each BadLine as its message, or the UserError's sentence."""
    import json

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text."
    if not text.strip():
        return f"The history file {path} is empty."
    try:
        doc = json.loads(text)
    except RecursionError:
        return f"{path} is nested too deeply to be a history."
    except json.JSONDecodeError:
        users = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    users.append(f"{path} line {lineno} is not valid JSON ({exc.msg})")
                    continue
                except RecursionError:
                    users.append(f"{path} line {lineno} is nested too deeply to be a history")
                    continue
                ok = isinstance(value, list) or (isinstance(value, dict) and isinstance(value.get("history"), list))
                users.append(
                    value if ok else f"{path} line {lineno}: a history must be a JSON list of item ids or titles"
                )
        return users, True
    if not (isinstance(doc, list) or (isinstance(doc, dict) and isinstance(doc.get("history"), list))):
        return f"{path}: a history must be a JSON list of item ids or titles."
    return [doc], False


def streamed_histories(path: Path) -> tuple[list, bool] | str:
    try:
        users, batch = read_histories(path)
    except UserError as exc:
        return str(exc)
    return [u.message if isinstance(u, BadLine) else u for u in users], batch


STREAM_CASES = {
    "one list": "[1, 2, 3]",
    "one list, blank lines after": "[1, 2]\n\n  \n",
    "one list over lines": "[1,\n 2,\n 3]\n",
    "an object over lines": '{"history":\n [1, 2]}\n',
    "two lines": "[1]\n[2]\n",
    "first line broken": "[1, 2\n[3]\n",
    "first line two values": "[1] [2]\n[3]\n",
    "CRLF": "[1]\r\n\r\n[2]\r\n",
    "lone CR": "[1]\r[2]\r",
    "form feed and U+2028 as line breaks": "[1]\x0c[2]\n[3]\u2028[4]\n",
    "U+2028 after one list": "[1, 2]\u2028\n",
    "a BOM, then a batch": "\ufeff[1]\n[2]\n",
    "deep first line": "[" * 50_000 + "]" * 50_000 + "\n[5]\n",
    "deep later line": "[5]\n" + "[" * 50_000 + "]" * 50_000 + "\n[6]\n",
    "a number, then a list": "1\n[2]\n",
    "only a number": "7\n",
    "blank first lines": "\n \t\n[1]\n[2]\n",
    "only whitespace": " \n\x0c\n",
    "not UTF-8 late": "[1]\n[2]\n\udcff\n",
}


@pytest.mark.parametrize("text", list(STREAM_CASES.values()), ids=list(STREAM_CASES))
def test_a_streamed_history_file_reads_as_the_whole_file_did(tmp_path, text):
    h = tmp_path / "h.jsonl"
    h.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert streamed_histories(h) == whole_file_histories(h)


def test_a_large_batch_is_answered_line_by_line_in_bounded_memory(tmp_path):
    """Before: `recommend --user-history` of a 250 MB JSONL held every parsed line (2.4 GB) and answered the first
    after 31 s. A batch of 20 MB is read here while at most one user is held and the first user comes before the
    rest is read: a later line changed after the first user was taken is read as changed."""
    import tracemalloc

    from ilora_cli.evaluation.recommend import iter_histories

    h = tmp_path / "big.jsonl"
    line = "[" + ", ".join(["12345"] * 2000) + "]\n"  # 14 KB a user
    n = 20_000_000 // len(line)
    with open(h, "w") as fh:
        fh.writelines(line for _ in range(n))
    tracemalloc.start()
    try:
        users, batch = iter_histories(h)
        first = next(users)
        with open(h, "r+b") as fh:  # the last user, changed in place: a reader that had read the file sees the old
            fh.seek(-len(line), 2)
            fh.write(("[" + ", ".join(["54321"] * 2000) + "]\n").encode())
        count, last = 1, None
        for user in users:  # one at a time: a list of them all would hold the file
            count, last = count + 1, user
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert batch and first == [12345] * 2000 and count == n and last == [54321] * 2000
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB held while reading a {h.stat().st_size / 2**20:.0f} MiB batch"
