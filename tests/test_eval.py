"""ilora eval and recommend: scoring correctness, aggregation over draws, title resolution, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from ilora_cli import metrics
from ilora_cli.encoders.sasrec import SASRec, SASRecConfig
from ilora_cli.errors import UserError
from ilora_cli.evaluation.evaluate import EvalConfig, evaluate
from ilora_cli.evaluation.llm import match_answer, score_candidates
from ilora_cli.evaluation.recommend import ItemResolver
from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
from ilora_cli.llm.prompt import PromptBuilder, add_placeholder_tokens
from ilora_cli.training.loop import TrainConfig, train
from ilora_cli.training.run import LoadedRun

from conftest import run_main as run_cli  # in this process: see run_main
from tiny import tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def trained(tiny_world):
    import os

    os.environ["ILORA_HOME"] = str(tiny_world)
    try:
        for name, k in (("ev4", 4), ("ev1", 1)):
            train(
                TrainConfig(
                    dataset="cyc",
                    backbone=str(tiny_world / "tiny-backbone"),
                    name=name,
                    experts=k,
                    head="title",  # the paper's head: generate mode and retrieval (tests/test_heads.py: the item head)
                    max_steps=2,
                    batch_size=4,
                    candidates=6,
                    quiet=True,
                )
            )
    finally:
        os.environ.pop("ILORA_HOME", None)
    return tiny_world


@pytest.fixture
def world(trained, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(trained))
    return trained


def test_hand_built_model_prefers_the_shortest_title():
    """With the final norm zeroed, every next-token distribution is uniform over the vocabulary V:
    log p(title) = -(tokens in title + end) · log V, so the shortest title wins and scores are known."""
    titles = ["Blue", "Red Sky", "A Very Long Green Title", "Old Town Road", "Sun"]
    tok = word_tokenizer(titles)
    base = tiny_llama(len(tok) + 2)
    add_placeholder_tokens(tok, base)
    with torch.no_grad():
        base.model.norm.weight.zero_()
    cfg = ExpertConfig(experts=2, rank=4)
    model = ILoraModel(attach_lora(base, cfg), tok, SASRec(SASRecConfig(hidden_size=8), 5), cfg).eval()
    builder = PromptBuilder(tok, titles, "music")
    run = LoadedRun(model, tok, builder, {"dataset": {"pad_id": 5, "max_history": 10}}, titles)
    cands = np.array([[2, 1, 0, 3], [3, 2, 1, 4]])
    scores, gates = score_candidates(run, [[4, 3], [0, 1, 2]], cands)
    vocab = base.get_output_embeddings().weight.shape[0]
    lengths = np.array([[len(builder.answer_ids(int(c))) for c in row] for row in cands])
    np.testing.assert_allclose(scores, -lengths * math.log(vocab), rtol=1e-5)
    assert cands[0, np.argmax(scores[0])] == 0 and cands[1, np.argmax(scores[1])] == 4
    assert gates.shape == (2, 2)
    mean, _ = score_candidates(run, [[4, 3]], cands[:1], normalize="mean")
    np.testing.assert_allclose(mean[0], -math.log(vocab), rtol=1e-5)


def test_match_answer_rule():
    titles = ["Blue", "Blue Moon", "Sun"]
    assert match_answer("The answer is SUN", titles) == 2
    assert match_answer("blue moon", titles) is None  # two titles occur: invalid
    assert match_answer("nothing here", titles) is None


@pytest.mark.slow
def test_eval_score_mode_aggregates_over_draws(world, tmp_path):
    pred = tmp_path / "p.jsonl"
    res = evaluate(EvalConfig(runs=["ev4"], predictions=pred, quiet=True))
    assert res["mode"] == "score" and res["protocol"] == "sampled, 6 candidates" and res["draws"] == 2
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(lines) == res["n_rows"] * 2 and all(len(line["gate"]) == 4 for line in lines)
    per_draw = []
    for d in (0, 1):
        rows = [x for x in lines if x["draw"] == d]
        scores = np.array([x["scores"] for x in rows])
        cols = np.array([x["candidates"].index(x["target"]) for x in rows])
        per_draw.append(metrics.ranking_metrics(metrics.rank_of_target(scores, cols)))
    expected = metrics.aggregate(per_draw)
    for k in ("hr@1", "ndcg@3", "mrr"):
        assert res["metrics"][k]["n_draws"] == 2
        assert res["metrics"][k]["mean"] == pytest.approx(expected[k]["mean"], abs=1e-4)
        assert res["metrics"][k]["std"] == pytest.approx(expected[k]["std"], abs=1e-4)
    again = evaluate(EvalConfig(runs=["ev4"], predictions=tmp_path / "q.jsonl", quiet=True))
    assert again["metrics"] == res["metrics"]  # deterministic
    # The default ranking is LLM + β · encoder; the LLM alone and the encoder alone are reported beside it.
    run = res["results"]["ev4"]
    f = run["fusion"]
    assert run["ranking"] == "fused" and set(f) == {"llm", "encoder"} and "encoder" in res["results"]
    for line in lines:
        fused = f["llm"] * np.array(line["llm_scores"]) + f["encoder"] * np.array(line["encoder_scores"])
        np.testing.assert_allclose(line["scores"], fused, atol=2e-4)
    for got, field in ((run["llm"]["metrics"], "llm_scores"), (res["results"]["encoder"]["metrics"], "encoder_scores")):
        per_draw = []
        for d in (0, 1):
            rows = [x for x in lines if x["draw"] == d]
            cols = np.array([x["candidates"].index(x["target"]) for x in rows])
            per_draw.append(metrics.ranking_metrics(metrics.rank_of_target(np.array([x[field] for x in rows]), cols)))
        assert got["mrr"]["mean"] == pytest.approx(metrics.aggregate(per_draw)["mrr"]["mean"], abs=1e-4), field


@pytest.mark.slow
def test_eval_side_by_side_generate_and_retrieve(world):
    res = evaluate(EvalConfig(runs=["ev4", "ev1"], encoder=True, quiet=True, max_samples=3))
    assert set(res["results"]) == {"ev4", "ev1", "encoder", "popularity"} and res["n_rows"] == 3
    gen = evaluate(EvalConfig(runs=["ev4"], mode="generate", quiet=True, max_samples=3, draws=1))
    assert {"valid_ratio", "hr@1", "hr@1_valid"} <= set(gen["metrics"])
    ret = evaluate(EvalConfig(runs=["ev4"], candidates="retrieve:5", encoder=True, quiet=True, max_samples=4))
    assert ret["protocol"].startswith("full ranking") and {"hr@1", "hr@5", "ndcg@5"} <= set(ret["metrics"])


@pytest.mark.slow
def test_cli_eval_json_and_errors(world):
    r = run_cli("eval", "--run", "ev4", "--max-samples", "2", "--json", "quiet=true", home=world)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "score" and {"mean", "std"} <= set(doc["metrics"]["hr@1"])
    assert "(sampled, 6 candidates; mean ± std over draws)" in r.stderr  # the protocol, in the table's title
    for args, msg in (
        (["--run", "nope"], "not a finished"),
        (["--run", "ev4", "--mode", "x"], "Unknown mode"),
        (["--run", "ev4", "--candidates", "retrieve:x"], "retrieve:N"),
        ([], "Nothing to evaluate"),
    ):
        r = run_cli("eval", *args, home=world)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


def test_item_resolver():
    res = ItemResolver(["Blue", "blue moon", "Sun", "SUN #2", "Moon", "moon"])
    assert res(2) == 2 and res("Sun") == 2 and res("BLUE MOON") == 1 and res({"title": "Blue"}) == 0
    assert res({"item_id": 4}) == 4
    with pytest.raises(UserError, match="ambiguous"):
        res("MOON")
    with pytest.raises(UserError, match="closest: 'Blue'"):
        res("Bleu")
    with pytest.raises(UserError, match="Unknown item id 99"):
        res(99)
    with pytest.raises(UserError, match="neither"):
        res(1.5)


@pytest.mark.slow
def test_cli_recommend_single_batch_and_bad_input(world, tmp_path):
    h = tmp_path / "h.json"
    h.write_text(json.dumps([0, "Item B1", "item c2"]))
    r = run_cli("recommend", "--run", "ev4", "--user-history", str(h), "--top-k", "3", "--json", home=world)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["recommendations"]) == 3 and len(doc["gate"]) == 4
    assert {"item_id", "title", "score", "llm_score", "encoder_score"} == set(doc["recommendations"][0])
    f = doc["fusion"]
    assert doc["ranking"] == "fused" and set(f) == {"llm", "encoder"}
    for x in doc["recommendations"]:  # the default ranking is the fused score
        assert x["score"] == pytest.approx(f["llm"] * x["llm_score"] + f["encoder"] * x["encoder_score"], abs=1e-4)
    assert not {x["item_id"] for x in doc["recommendations"]} & {0, 1, 2}
    scores = [x["score"] for x in doc["recommendations"]]
    assert scores == sorted(scores, reverse=True)
    c = tmp_path / "c.json"
    c.write_text(json.dumps([5, 6, "Item H7"]))
    r = run_cli("recommend", "--run", "ev4", "--user-history", str(h), "--candidates", str(c), "--json", home=world)
    assert r.returncode == 0 and {x["item_id"] for x in json.loads(r.stdout)["recommendations"]} == {5, 6, 7}
    many = tmp_path / "many.jsonl"
    many.write_text("[1, 2, 3]\n[4, 5, 6]\n[]\n")
    r = run_cli("recommend", "--run", "ev4", "--user-history", str(many), "--top-k", "2", home=world)
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 2 and len(out) == 3 and "empty" in out[2]["error"]
    long = tmp_path / "long.json"
    long.write_text(json.dumps(list(range(14))))
    r = run_cli("recommend", "--run", "ev4", "--user-history", str(long), "--json", home=world)
    assert r.returncode == 0 and "most recent 10" in r.stderr
    assert [x["item_id"] for x in json.loads(r.stdout)["history"]] == list(range(4, 14))
    cases = {
        "[]": "empty",
        "[1, 2": "not valid JSON",
        "[1, 2, 999]": "Unknown item id 999",
        '{"dataset": "ml100k", "history": [1, 2]}': "trained on 'cyc'",
        '["Item Zz"]': "Unknown title",
    }
    for text, msg in cases.items():
        h.write_text(text)
        r = run_cli("recommend", "--run", "ev4", "--user-history", str(h), home=world)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)
    broken = tmp_path / "broken-run"
    shutil.copytree(world / "runs" / "ev4", broken)
    info = json.loads((broken / "ilora.json").read_text())
    info["backbone"]["name"] = str(tmp_path / "no-such-backbone")
    (broken / "ilora.json").write_text(json.dumps(info))
    h.write_text("[1, 2, 3]")
    r = run_cli("recommend", "--run", str(broken), "--user-history", str(h), home=world)
    assert r.returncode == 2 and "backbone" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_a_run_trained_on_mean_scores_is_evaluated_on_mean_scores(world, tmp_path):
    from ilora_cli.training.run import load_run

    train(
        TrainConfig(
            dataset="cyc",
            backbone=str(world / "tiny-backbone"),
            name="ev-mean",
            head="title",
            normalize="mean",
            max_steps=1,
            batch_size=4,
            candidates=6,
            quiet=True,
        )
    )
    assert json.loads((world / "runs" / "ev-mean" / "ilora.json").read_text())["normalize"] == "mean"
    docs = {
        n: evaluate(
            EvalConfig(
                runs=["ev-mean"], normalize=n, max_samples=4, draws=1, predictions=tmp_path / f"{n}.jsonl", quiet=True
            )
        )
        for n in (None, "sum")
    }
    assert docs[None]["normalize"] == "mean" and docs["sum"]["normalize"] == "sum"
    preds = {
        n: [json.loads(x) for x in open(d["results"]["ev-mean"]["predictions"], encoding="utf-8")]
        for n, d in docs.items()
    }
    builder = load_run(world / "runs" / "ev-mean").builder
    for mean_line, sum_line in zip(preds[None], preds["sum"]):
        lengths = np.array([len(builder.answer_ids(c)) for c in sum_line["candidates"]])
        np.testing.assert_allclose(mean_line["llm_scores"], np.array(sum_line["llm_scores"]) / lengths, atol=1e-4)


# -- the default ranking is the one recorded in the run ---------------------------------------------------------------


def _with_fusion(world, tmp_path, name: str, fusion) -> str:
    """A copy of the run with other fusion weights, as if trained to them (its manifest records them)."""
    from ilora_cli.training.run import write_run_manifest

    run = tmp_path / name
    shutil.copytree(world / "runs" / "ev4", run)
    info = json.loads((run / "ilora.json").read_text())
    info["fusion"] = fusion
    (run / "ilora.json").write_text(json.dumps(info))
    write_run_manifest(run, info)
    return str(run)


@pytest.mark.slow
def test_the_fusion_weights_decide_the_order_in_recommend_and_eval(world, tmp_path):
    """After two training steps the learned LLM weight is about 0, so a recommend or eval that ignored the LLM
    would pass a check of the formula alone. Here the weights are set so that one side decides alone: the
    order (and the metrics) must follow that side, and the two orders differ."""
    from ilora_cli.api import recommend

    llm_run = _with_fusion(world, tmp_path, "llm-decides", {"llm": 1.0, "encoder": 0.0})
    enc_run = _with_fusion(world, tmp_path, "encoder-decides", {"llm": 0.0, "encoder": 1.0})
    cands = tmp_path / "c.json"
    cands.write_text(json.dumps(list(range(10, 20))))
    differs = 0
    for history in ([0, 1, 2], [5, 6, 7, 8], [20, 21, 22], [25, 26, 27, 28, 29]):
        by_llm = recommend(llm_run, [history], top_k=10, candidates=str(cands))[0]
        by_enc = recommend(enc_run, [history], top_k=10, candidates=str(cands))[0]
        for out, key in ((by_llm, "llm_score"), (by_enc, "encoder_score")):
            scores = [x[key] for x in out["recommendations"]]
            assert scores == sorted(scores, reverse=True) and out["ranking"] == "fused"
        differs += [x["item_id"] for x in by_llm["recommendations"]] != [
            x["item_id"] for x in by_enc["recommendations"]
        ]
    assert differs >= 2  # the test can tell one order from the other
    results = {
        name: evaluate(EvalConfig(runs=[run], draws=1, predictions=tmp_path / f"{name}.jsonl", quiet=True))
        for name, run in (("llm", llm_run), ("encoder", enc_run))
    }
    by_llm = results["llm"]["results"]["llm-decides"]
    by_enc = results["encoder"]["results"]["encoder-decides"]
    assert by_llm["metrics"] == by_llm["llm"]["metrics"]  # the default ranking is the LLM's here ...
    encoder_alone = results["encoder"]["results"]["encoder"]["metrics"]  # (which adds the full-catalogue metrics)
    assert by_enc["metrics"] == {k: v for k, v in encoder_alone.items() if not k.startswith("full_")}  # the encoder's
    assert by_llm["metrics"]["mrr"]["mean"] != by_enc["metrics"]["mrr"]["mean"]
    for name, field in (("llm", "llm_scores"), ("encoder", "encoder_scores")):
        for line in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines()):
            assert line["prediction"] == line["candidates"][int(np.argmax(line[field]))]


@pytest.mark.slow
def test_a_run_without_fusion_is_evaluated_and_recommended_by_the_llm_alone(world, tmp_path):
    from ilora_cli.api import recommend

    train(
        TrainConfig(dataset="cyc", backbone=str(world / "tiny-backbone"), name="ev-none", fusion="none",
                    max_steps=2, batch_size=4, candidates=6, quiet=True)
    )  # fmt: skip
    assert json.loads((world / "runs" / "ev-none" / "ilora.json").read_text())["fusion"] is None
    pred = tmp_path / "none.jsonl"
    res = evaluate(EvalConfig(runs=["ev-none"], draws=1, max_samples=6, predictions=pred, quiet=True))
    run = res["results"]["ev-none"]
    assert run["ranking"] == "llm" and run["fusion"] is None and "llm" not in run
    for line in map(json.loads, pred.read_text().splitlines()):
        assert line["scores"] == line["llm_scores"]
    out = recommend("ev-none", [[0, 1, 2]], top_k=5)[0]
    assert out["ranking"] == "llm" and out["fusion"] is None
    assert all(x["score"] == x["llm_score"] for x in out["recommendations"])


def _encoder_top(run_dir, histories: list[list[int]], n: int) -> list[set[int]]:
    """Each history's n best items by the run's encoder copy, computed here from its full score table."""
    from ilora_cli.encoders.io import load_encoder

    encoder, info = load_encoder(run_dir / "encoder")
    pad = int(info["n_items"])
    width = max(len(h) for h in histories)
    seq = torch.tensor([h + [pad] * (width - len(h)) for h in histories])
    with torch.no_grad():
        scores = encoder.score_all(seq, torch.tensor([len(h) for h in histories])).numpy()  # (N, n_items)
    out = []
    for row, history in zip(scores, histories):
        row = row.copy()
        row[history] = -np.inf
        out.append(set(np.argsort(-row, kind="stable")[:n].tolist()))
    return out


@pytest.mark.slow
def test_retrieved_candidates_are_the_encoders_top_items_outside_the_history(world, tmp_path):
    """--candidates retrieve:N and recommend without --candidates rerank the encoder's N best items of the whole
    catalogue, the history excluded: checked item by item, not only by the keys of the output."""
    from ilora_cli.api import recommend
    from ilora_cli.data.prepared import PreparedDataset

    pred = tmp_path / "r.jsonl"
    evaluate(EvalConfig(runs=["ev4"], candidates="retrieve:5", predictions=pred, quiet=True))
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    histories = PreparedDataset.open("cyc").split("val").histories()
    assert len(lines) == len(histories) == 4
    for line, history, top in zip(lines, histories, _encoder_top(world / "runs" / "ev4", histories, 5)):
        assert set(line["candidates"]) == top and not set(line["candidates"]) & set(history)
    history = [3, 4, 5, 6]
    out = recommend("ev4", [history], top_k=20)[0]
    assert out["candidates"] == "encoder top-20"
    assert {x["item_id"] for x in out["recommendations"]} == _encoder_top(world / "runs" / "ev4", [history], 20)[0]


@pytest.mark.slow
def test_eval_reads_a_llara_test_file(world, tmp_path):
    """--test-file: the rows of a LLaRA .df split are scored in place of the dataset's split (read only with
    --trust-pickle); the predictions follow the file's rows and targets."""
    import pandas as pd

    from ilora_cli.data.prepared import PreparedDataset

    val = PreparedDataset.open("cyc").split("val")
    rows = [{"seq": s.tolist(), "len_seq": int(n), "next": int(t)} for s, n, t in zip(val.seq, val.len_seq, val.next)]
    rows.reverse()  # another order than the dataset's: the file decides
    test_file = tmp_path / "Test_data.df"
    pd.DataFrame(rows).to_pickle(test_file)
    r = run_cli("eval", "--run", "ev4", "--test-file", str(test_file), home=world)
    assert r.returncode == 2 and "--trust-pickle" in r.stderr
    pred = tmp_path / "t.jsonl"
    res = evaluate(EvalConfig(runs=["ev4"], test_file=test_file, trust_pickle=True, predictions=pred, quiet=True))
    assert res["split"] == "test-file" and res["n_rows"] == len(rows) == 4 and res["draws"] == 2
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [x["target"] for x in lines if x["draw"] == 0] == [r["next"] for r in rows]
    assert all(x["target"] in x["candidates"] and len(x["candidates"]) == 6 for x in lines)
