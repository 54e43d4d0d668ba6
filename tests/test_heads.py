"""The item head: (W h) · e_c after a history-only prompt (llm/heads.py), against its definition on tiny tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ilora_cli.encoders.sasrec import SASRec, SASRecConfig
from ilora_cli.llm.heads import fit_item_head, scorer
from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
from ilora_cli.llm.prompt import CANDIDATE_TOKEN, PromptBuilder, add_placeholder_tokens
from test_experts import N_ITEMS, TITLES, _randomise_lora

from conftest import run_cli
from tiny import tiny_llama, word_tokenizer

HIST = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]]
CANDS = [[3, 4, 5], [0, 1, 2], [1, 2, 3]]


def _item_setup(experts=4, user_token=False, projector_norm="none", head_init="random", seed=0):
    tok = word_tokenizer(TITLES)
    base = tiny_llama(len(tok) + 3, seed=seed)
    add_placeholder_tokens(tok, base)
    torch.manual_seed(seed)
    encoder = SASRec(SASRecConfig(hidden_size=16), N_ITEMS)
    cfg = ExpertConfig(
        experts=experts,
        rank=8,
        alpha=16,
        dropout=0.0,
        head="item",
        user_token=user_token,
        projector_norm=projector_norm,
    )
    llm = attach_lora(base, cfg)
    _randomise_lora(llm)
    model = ILoraModel(llm, tok, encoder, cfg, head_init=head_init).eval()
    builder = PromptBuilder(
        tok, TITLES, "music", hybrid=True, templates="compact", user_token=user_token, list_candidates=False
    )
    return model, builder


def _prefix(builder, hist=HIST, cands=CANDS):
    return builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")


def test_item_prompts_hold_the_history_alone():
    model, builder = _item_setup()
    prefix = _prefix(builder)
    assert not (prefix.input_ids == model.candidate_id).any() and not prefix.candidates_listed
    text = builder.prompt_text(HIST[0], CANDS[0])
    assert CANDIDATE_TOKEN not in text and TITLES[CANDS[0][0]] not in text and "Candidates" not in text
    # the prompt, and so the query vector, does not depend on the candidates
    other = _prefix(builder, cands=[[9, 10, 11]] * 3)
    assert torch.equal(prefix.input_ids, other.input_ids)


@pytest.mark.parametrize("experts,user_token", [(4, False), (1, False), (4, True)])
def test_item_scores_are_the_query_times_the_encoders_item_embeddings(experts, user_token):
    model, builder = _item_setup(experts=experts, user_token=user_token)
    prefix = _prefix(builder)
    with torch.no_grad():
        scores, gates = model(prefix, items=prefix.candidates)  # (B, C)
        queries, _ = model(prefix, query=True)  # (B, d)
        # the slow way: the backbone's own causal-LM forward (under the same gates), its final hidden states
        embeds = model.embed(prefix)
        positions = (prefix.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        with model.gated(model.gates(prefix, embeds)):
            out = model.llm(
                inputs_embeds=embeds,
                attention_mask=prefix.attention_mask,
                position_ids=positions,
                output_hidden_states=True,
            )
        hidden = out.hidden_states[-1][:, -1]  # (B, H) the last layer's, normalised, at each prompt's end
        torch.testing.assert_close(model.llm.get_output_embeddings()(hidden), out.logits[:, -1])  # the same state
        torch.testing.assert_close(model.hidden_states(prefix), hidden)
    w = model.item_head.proj.weight  # (d, H)
    manual_queries = hidden @ w.T  # (B, d)
    torch.testing.assert_close(queries, manual_queries)
    e = model.encoder.item_embedding.weight  # (N + 1, d)
    for b, row in enumerate(CANDS):
        for c, item in enumerate(row):
            assert scores[b, c].item() == pytest.approx(float(manual_queries[b] @ e[item]), rel=1e-5, abs=1e-6)
    assert gates.shape == (3, experts)
    # the whole catalogue: the same numbers at the candidates' columns
    full = model.catalogue_scores(queries)  # (B, N)
    assert full.shape == (3, N_ITEMS)
    torch.testing.assert_close(full.gather(1, prefix.candidates), scores)


def test_hidden_state_is_the_last_real_token_under_left_padding():
    """Each row's query equals that of the row alone (per-sample gates, padding never read)."""
    model, builder = _item_setup()
    with torch.no_grad():
        together, _ = model(_prefix(builder), query=True)
        alone = torch.cat([model(_prefix(builder, [h], [c]), query=True)[0] for h, c in zip(HIST, CANDS)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_item_head_gradients_reach_head_lora_projector_and_gate_not_the_encoder():
    model, builder = _item_setup()
    model.train()
    prefix = _prefix(builder)
    scores, _ = model(prefix, items=prefix.candidates)
    torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1, 2])).backward()
    groups = model.trainable_parameters()
    for name in ("head", "lora", "projector", "gate"):
        assert groups[name] and all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name
    assert all(p.grad is None for p in model.encoder.parameters())
    # the vocabulary projection is never computed: the output layer gets no gradient even if it could
    out_layer = model.llm.get_output_embeddings().weight
    assert out_layer.grad is None


def test_zero_init_scores_nothing_and_the_title_scorer_has_no_catalogue():
    model, builder = _item_setup(head_init="zeros")
    prefix = _prefix(builder)
    with torch.no_grad():
        scores, _ = scorer("item").candidate_scores(model, builder, prefix)
    assert torch.equal(scores, torch.zeros(3, 3))
    assert scorer("title").ranks_catalogue is False and scorer("title").lists_candidates is True
    with pytest.raises(ValueError):
        scorer("words")


def test_fit_solves_the_ridge_normal_equations():
    """head_init=fit: W (H^T H + λ I) = U^T H for the rows' hidden states H and user representations U."""
    model, builder = _item_setup(user_token=True)
    prefixes = [_prefix(builder), _prefix(builder, [[1, 2], [7, 8, 9]], [[0], [1]])]
    fit = fit_item_head(model, prefixes, ridge=0.5)
    h = torch.cat([model.hidden_states(p) for p in prefixes]).double()  # (5, H)
    u = torch.cat([model.user_representation(p) for p in prefixes]).double()  # (5, d)
    w = model.item_head.proj.weight.double()  # (d, H)
    lhs = w @ (h.T @ h + 0.5 * torch.eye(h.shape[1], dtype=torch.float64))
    torch.testing.assert_close(lhs, u.T @ h, rtol=1e-4, atol=1e-4)
    assert fit["rows"] == 5 and 0 <= fit["relative_residual"] < 1


def test_projector_norm_token_puts_projected_vectors_on_the_token_scale():
    model, builder = _item_setup(user_token=True, projector_norm="token")
    prefix = _prefix(builder)
    with torch.no_grad():
        embeds = model.embed(prefix)  # (B, T, H)
    placeholder = (prefix.input_ids == model.history_id) | (prefix.input_ids == model.user_id)
    norms = embeds[placeholder].norm(dim=-1)
    tokens = model.llm.get_input_embeddings().weight[: model.history_id].norm(dim=-1).mean()
    torch.testing.assert_close(norms, torch.full_like(norms, float(tokens)), rtol=1e-5, atol=1e-5)
    plain, _ = _item_setup(user_token=True)
    with torch.no_grad():
        raw = plain.embed(prefix)[placeholder].norm(dim=-1)
    assert not torch.allclose(raw, torch.full_like(raw, float(tokens)), rtol=1e-2)


@pytest.fixture
def synthetic(tmp_path_factory):
    """A small synthetic dataset, its encoder and the tiny backbone (word tokenizer over its titles)."""
    from ilora_cli.data.prepare import PrepareConfig, prepare
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.encoders.train import EncodeConfig, encode

    home = tmp_path_factory.mktemp("synthetic-home")
    import os

    old = os.environ.get("ILORA_HOME")
    os.environ["ILORA_HOME"] = str(home)
    try:
        prepare(PrepareConfig(dataset="syn", synthetic_users=80, synthetic_items=40, draws=2))
        encode(EncodeConfig(dataset="syn", hidden_size=16, epochs=3, quiet=True))
        titles = PreparedDataset.open("syn").titles
        tok = word_tokenizer(titles)
        base = tiny_llama(len(tok), seed=0)
        base.save_pretrained(home / "tiny-backbone")
        tok.save_pretrained(home / "tiny-backbone")
    finally:
        if old is None:
            os.environ.pop("ILORA_HOME", None)
        else:
            os.environ["ILORA_HOME"] = old
    return home


@pytest.mark.slow
def test_item_head_end_to_end_on_synthetic_data(synthetic, tmp_path, monkeypatch):
    """train → eval (sampled and full catalogue) → recommend (whole catalogue, or given candidates) → export →
    the API, with the item head; generate mode and a damaged head are refused in one sentence."""
    from ilora_cli import evaluate, recommend
    from ilora_cli.training.loop import TrainConfig, train

    monkeypatch.setenv("ILORA_HOME", str(synthetic))
    home = synthetic
    r = train(
        TrainConfig(
            dataset="syn",
            name="item",
            backbone=str(home / "tiny-backbone"),
            head="item",
            head_init="fit",
            user_token=True,
            batch_size=4,
            max_steps=4,
            checkpoint_every=2,
            quiet=True,
        )
    )
    run_dir = home / "runs" / "item"
    assert r["complete"] and (run_dir / "head.safetensors").is_file()
    info = json.loads((run_dir / "ilora.json").read_text())
    assert info["experts"]["head"] == "item" and info["head"]["init"] == "fit" and info["head"]["fit"]["rows"] > 0

    ev = evaluate(runs=["item"], quiet=True)
    res = ev["results"]["item"]
    assert res["head"] == "item" and res["ranking"] == "fused"
    for ranking in (res["metrics"], res["llm"]["metrics"], ev["results"]["encoder"]["metrics"]):
        assert {"hr@1", "mrr", "full_hr@10", "full_ndcg@10"} <= set(ranking)
    # the sampled LLM scores are the catalogue scores at the candidates: the predictions file holds both views
    lines = [json.loads(x) for x in (run_dir / "predictions-val-score.jsonl").read_text().splitlines()]
    assert {x["draw"] for x in lines} == {0, 1}
    for x in lines:
        assert set(x["catalogue_rank"]) == {"llm", "fused", "encoder", "default"}
        assert x["catalogue_rank"]["default"] == x["catalogue_rank"]["fused"]  # a run with fusion weights
    _assert_one_query_gives_both_views(run_dir, lines, recommend)
    from ilora_cli import metrics

    for ranking, got in (("default", res["metrics"]), ("llm", res["llm"]["metrics"])):  # the catalogue view
        ranks = np.array([x["catalogue_rank"][ranking] for x in lines if x["draw"] == 0])
        for k in (10, 20, 50):
            assert got[f"full_hr@{k}"]["mean"] == pytest.approx(metrics.hit_ratio(ranks, k))
        assert got["full_ndcg@10"]["mean"] == pytest.approx(metrics.ndcg(ranks, 10))
        assert got["full_mrr"]["mean"] == pytest.approx(metrics.mrr(ranks))
    assert all(
        x["catalogue_rank"] == y["catalogue_rank"] for x, y in zip(lines[: len(lines) // 2], lines[len(lines) // 2 :])
    )
    assert res["tests"]["metric"] == "full_ndcg@10" and "p_value" in res["tests"]["default_vs_encoder"]
    below = res["below_encoder"]
    assert below["below"] == (below["default"] < below["encoder"]) and below["metric"] == "full_ndcg@10"
    assert "full_ndcg@20" in ev["results"]["popularity"]["metrics"]
    assert info["catalogue_check"]["split"] == "val" and info["catalogue_check"]["metric"] == "full_ndcg@10"

    history = [[0, 5, 9], [3, 4]]
    out = recommend(str(run_dir), history, top_k=40)
    for user, h in zip(out, history):
        assert user["candidates"] == "whole catalogue"
        assert user["below_encoder"]["below"] == info["catalogue_check"]["below"]  # a field, not a log line
        ids = [x["item_id"] for x in user["recommendations"]]
        assert not set(ids) & set(h) and len(ids) == 40 - len(set(h))  # every item but the history
        scores = [x["score"] for x in user["recommendations"]]
        assert scores == sorted(scores, reverse=True)
    fusion = info["fusion"]
    top = out[0]["recommendations"][0]
    assert top["score"] == pytest.approx(fusion["llm"] * top["llm_score"] + fusion["encoder"] * top["encoder_score"])
    given = tmp_path / "cands.json"
    given.write_text(json.dumps([1, 2, 3]))
    one = recommend(str(run_dir), [[0, 5, 9]], candidates=str(given), top_k=3)[0]
    assert one["candidates"] == "given" and sorted(x["item_id"] for x in one["recommendations"]) == [1, 2, 3]
    by_item = {x["item_id"]: x["llm_score"] for x in out[0]["recommendations"]}
    for x in one["recommendations"]:  # the same query vector scores a given set and the catalogue alike
        if x["item_id"] in by_item:
            assert x["llm_score"] == pytest.approx(by_item[x["item_id"]], rel=1e-5)

    r = run_cli("eval", "--run", "item", "--mode", "generate", home=home)
    assert r.returncode == 2 and "item head" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", "--run", "item", "--output", str(tmp_path / "copy"), home=home)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "copy" / "head.safetensors").is_file()
    r = run_cli("eval", "--run", str(tmp_path / "copy"), "--max-samples", "3", "draws=1", home=home)
    assert r.returncode == 0, r.stderr
    (tmp_path / "copy" / "head.safetensors").write_bytes(b"broken")
    r = run_cli("eval", "--run", str(tmp_path / "copy"), home=home)
    assert r.returncode == 2 and "damaged" in r.stderr and "head.safetensors" in r.stderr


def _assert_one_query_gives_both_views(run_dir, lines, recommend):
    """Each predictions line's sampled view (``llm_scores``, ``encoder_scores`` of its candidates) and catalogue view
    (``catalogue_rank``: the target's 0-based rank among every item outside the history) are those of the run's
    whole-catalogue ranking, which ``recommend`` computes from the user's history alone."""
    from ilora_cli.data.prepared import PreparedDataset

    dataset = PreparedDataset.open("syn")
    val = dataset.split("val")
    history_of = dict(zip(val.sample_id.tolist(), val.histories()))
    rows = sorted({x["sample_id"] for x in lines})
    ranked = recommend(str(run_dir), [history_of[i] for i in rows], top_k=dataset.n_items)
    by_row = {i: {r["item_id"]: r for r in user["recommendations"]} for i, user in zip(rows, ranked)}
    checked = 0
    for x in lines:
        items = by_row[x["sample_id"]]
        for j, c in enumerate(x["candidates"]):
            if c in items:  # recommend leaves the history out
                assert x["llm_scores"][j] == pytest.approx(items[c]["llm_score"], rel=1e-4, abs=1e-4)
                assert x["encoder_scores"][j] == pytest.approx(items[c]["encoder_score"], rel=1e-4, abs=1e-4)
        if x["target"] not in items:  # a target inside its own history: recommend does not rank it
            continue
        for ranking, field in (("llm", "llm_score"), ("encoder", "encoder_score"), ("fused", "score")):
            t = items[x["target"]][field]
            others = np.array([r[field] for i, r in items.items() if i != x["target"]])
            above, near = int((others > t + 1e-5).sum()), int((np.abs(others - t) <= 1e-5).sum())
            assert above <= x["catalogue_rank"][ranking] <= above + near, (x["sample_id"], ranking)
        checked += 1
    assert checked >= len(lines) // 2


def test_the_catalogue_loss_needs_the_item_head():
    """loss_over=catalogue scores every item (tests/test_catalogue.py: its softmax leaves the history out)."""
    from ilora_cli.training.loop import TrainConfig

    with pytest.raises(Exception, match="only the item head"):
        TrainConfig(head="title", loss_over="catalogue").validate()
