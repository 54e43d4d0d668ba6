"""Training and fusing for the catalogue: the catalogue softmax without the history, sampled negatives with the logQ
correction, the residual query, and the fusion fitted on rows set apart (training/loss.py, fusion_fit.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ilora_cli.llm.heads import scorer
from ilora_cli.training.loop import TrainConfig, batch_loss
from ilora_cli.training.loss import history_mask
from test_heads import CANDS, HIST, _item_setup, _prefix

FAST = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=50, quiet=True, seed=5)


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


def _cfg(world, **kw):
    return TrainConfig(backbone=str(world / "tiny-backbone"), **{**FAST, **kw})


def test_the_history_mask_marks_each_rows_history_and_never_its_target():
    history = torch.tensor([[0, 1, 2, 9], [3, 3, 9, 9], [5, 6, 7, 8]])  # right-padded with 9 = n_items
    lengths = torch.tensor([3, 2, 4])
    target = torch.tensor([4, 0, 7])  # row 2's target is in its history (a repeat): it stays rankable
    mask = history_mask(history, lengths, target, 9)
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[0, [0, 1, 2]] = True
    expected[1, 3] = True
    expected[2, [5, 6, 8]] = True
    assert torch.equal(mask, expected)


def _targets(target_index):
    return torch.tensor([CANDS[b][int(i)] for b, i in enumerate(target_index)])


def _catalogue_ce(queries, items, histories, targets):
    """The slow way: per row, the softmax over every item outside the history (the target always in)."""
    losses = []
    for q, hist, y in zip(queries, histories, targets):
        keep = [j for j in range(items.shape[0]) if j == int(y) or j not in hist]
        scores = items[keep] @ q  # (n_kept,)
        losses.append(torch.logsumexp(scores, 0) - scores[keep.index(int(y))])
    return torch.stack(losses).mean()


def test_the_catalogue_loss_leaves_each_rows_history_out_of_the_softmax():
    """loss_over=catalogue is the cross-entropy over the items outside each row's history: what recommend ranks."""
    model, builder = _item_setup()
    prefix = _prefix(builder)
    target_index = torch.tensor([0, 2, 1])
    config = TrainConfig(head="item", loss_over="catalogue", fusion="none")
    config.validate()
    with torch.no_grad():
        loss, terms, _ = batch_loss(model, model, scorer("item"), builder, prefix, target_index, config)
        queries, _ = model(prefix, query=True)
    items = model.encoder.item_embeddings()
    expected = _catalogue_ce(queries, items, HIST, _targets(target_index))
    with_history = torch.nn.functional.cross_entropy(queries @ items.T, _targets(target_index))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(loss) - float(with_history)) > 1e-4  # the history matters here: the test can tell
    assert set(terms) == {"listwise", "hr@1", "mrr"}


def test_catalogue_plus_candidates_adds_the_two_softmaxes_of_the_same_query():
    model, builder = _item_setup()
    prefix = _prefix(builder)
    target_index = torch.tensor([0, 2, 1])
    config = TrainConfig(head="item", loss_over="catalogue+candidates", fusion="none")
    config.validate()
    with torch.no_grad():
        loss, terms, _ = batch_loss(model, model, scorer("item"), builder, prefix, target_index, config)
        queries, _ = model(prefix, query=True)
    items = model.encoder.item_embeddings()
    catalogue = _catalogue_ce(queries, items, HIST, _targets(target_index))
    cand_scores = torch.einsum("bd,bcd->bc", queries, items[torch.tensor(CANDS)])
    candidates = torch.nn.functional.cross_entropy(cand_scores, target_index)
    assert float(loss) == pytest.approx(float(catalogue + candidates), rel=1e-5)
    assert float(terms["listwise_candidates"]) == pytest.approx(float(candidates), rel=1e-5)


def test_the_logq_correction_subtracts_each_candidates_log_probability():
    """Popularity-drawn negatives: the softmax is over s_c − log q_c (Bengio & Senécal); uniform q changes nothing."""
    model, builder = _item_setup()
    prefix = _prefix(builder)
    target_index = torch.tensor([0, 2, 1])
    config = TrainConfig(head="item", loss_over="candidates", fusion="none")
    config.validate()
    n_items = model.encoder.n_items
    log_q = torch.log(torch.linspace(1, 3, n_items) / torch.linspace(1, 3, n_items).sum())
    with torch.no_grad():
        plain, _, _ = batch_loss(model, model, scorer("item"), builder, prefix, target_index, config)
        corrected, _, _ = batch_loss(model, model, scorer("item"), builder, prefix, target_index, config, log_q)
        uniform, _, _ = batch_loss(
            model, model, scorer("item"), builder, prefix, target_index, config, torch.full((n_items,), -3.0)
        )
        scores, _ = model(prefix, items=prefix.candidates)
    expected = torch.nn.functional.cross_entropy(scores - log_q[prefix.candidates], target_index)
    assert float(corrected) == pytest.approx(float(expected), rel=1e-5)
    assert float(uniform) == pytest.approx(float(plain), rel=1e-5) and abs(float(corrected) - float(plain)) > 1e-4


def test_popularity_negatives_follow_the_targets_frequencies_outside_the_history():
    from ilora_cli.data.prepared import SplitData
    from ilora_cli.training.samples import TrainSamples

    n_items, rows = 12, 40
    seq = np.full((rows, 3), n_items)
    seq[:, :2] = [[0, 1]] * rows
    targets = np.r_[np.full(30, 2), np.arange(10) % n_items]  # item 2 is the target of 30 rows of 40
    split = SplitData("train", np.arange(rows), seq, np.full(rows, 2), targets, None)
    samples = TrainSamples(split, n_items, 6, seed=1)
    samples.use_popularity(targets)
    q = np.exp(samples.log_q)
    assert q.sum() == pytest.approx(1.0) and q[2] == pytest.approx((31 + 1) / (40 + n_items))  # counts plus one each
    drawn = np.concatenate([[c for c in samples.sample(r, 0).candidates if c != targets[r]] for r in range(30, 40)])
    assert not np.isin(drawn, [0, 1]).any()  # never the history
    counts = np.bincount(
        np.concatenate([samples.sample(r, e).candidates for r in range(30, 40) for e in range(60)]), minlength=n_items
    )
    others = np.delete(np.arange(n_items), [0, 1])
    share = counts[2] / counts[others].sum()
    assert share > 0.4  # item 2 holds 31 of the 50 weights outside the history (plus its own targets): popular


def test_the_residual_query_starts_as_the_encoders_ranking():
    """query=residual with W = 0: the language model's scores are the encoder's, on the candidates and on the
    catalogue; a gradient reaches W from the first step."""
    model, builder = _item_setup(head_init="zeros")
    model.config.query = "residual"
    prefix = _prefix(builder)
    with torch.no_grad():
        scores, _ = model(prefix, items=prefix.candidates)
        queries, _ = model(prefix, query=True)
    assert torch.allclose(scores, model.encoder_scores(prefix), atol=1e-6)
    everything = model.encoder.score_all(prefix.history, prefix.history_len)
    assert torch.allclose(model.catalogue_scores(queries), everything, atol=1e-5)
    config = TrainConfig(head="item", query="residual", loss_over="catalogue", fusion="none")
    config.validate()
    loss, _, _ = batch_loss(model, model, scorer("item"), builder, prefix, torch.tensor([0, 2, 1]), config)
    loss.backward()
    assert model.item_head.proj.weight.grad.abs().sum() > 0
    model.config.query = "direct"
    with torch.no_grad():
        assert torch.count_nonzero(model(prefix, items=prefix.candidates)[0]) == 0  # W = 0: nothing without u


def test_residual_settings_are_checked():
    from ilora_cli.errors import UserError

    cfg = TrainConfig(head="item", query="residual")
    cfg.validate()
    assert cfg.head_init == "zeros"
    with pytest.raises(UserError, match="head_init=fit"):
        TrainConfig(head="item", query="residual", head_init="fit").validate()
    with pytest.raises(UserError, match="head=item"):
        TrainConfig(head="title", query="residual").validate()
    with pytest.raises(UserError, match="choose one"):
        TrainConfig(head="item", negative_sampling="popularity", hard_negatives=0.5).validate()
    with pytest.raises(UserError, match="apart_users"):
        TrainConfig(apart_users=1.0).validate()


def test_the_fitted_fusion_minimises_the_listwise_loss():
    """fit_fusion against a brute-force grid of (a, b): no grid point has a lower cross-entropy."""
    from ilora_cli.training.fusion_fit import fit_fusion

    rng = np.random.default_rng(0)
    n, c = 60, 15
    target = rng.integers(c, size=n)
    signal = np.zeros((n, c))
    signal[np.arange(n), target] = 1.0
    encoder = 1.5 * signal + rng.normal(size=(n, c))
    llm = 0.8 * signal + rng.normal(size=(n, c))
    excluded = rng.random((n, c)) < 0.2
    excluded[np.arange(n), target] = False
    fit = fit_fusion(llm, encoder, target, excluded)

    def ce(a, b):
        z = np.where(excluded, -np.inf, a * llm + b * encoder)
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(n), target]))

    assert fit["loss"] == pytest.approx(ce(fit["llm"], fit["encoder"]), rel=1e-6)
    grid = [(a, b) for a in np.linspace(-1, 3, 41) for b in np.linspace(-1, 3, 41)]
    assert fit["loss"] <= min(ce(a, b) for a, b in grid) + 1e-9
    assert fit["llm"] > 0.2 and fit["encoder"] > 0.5  # both carry the signal
    noise = fit_fusion(rng.normal(size=(n, c)), encoder, target)
    assert abs(noise["llm"]) < 0.5 * fit["llm"]  # a language model that knows nothing gets little weight


def test_users_set_apart_are_whole_users_of_the_second_stage():
    from ilora_cli.data.holdout import set_apart

    users = np.repeat(np.arange(20), 5)  # 20 users of 5 rows
    rows = np.arange(100)[users >= 4]  # the second stage has users 4..19
    train_rows, apart = set_apart(rows, users, 0.25, seed=3)
    assert len(np.unique(users[apart])) == 4 and len(apart) == 20
    assert (
        not np.intersect1d(users[train_rows], users[apart]).size
        and np.union1d(train_rows, apart).tolist() == rows.tolist()
    )
    again = set_apart(rows, users, 0.25, seed=3)
    assert np.array_equal(again[1], apart) and not np.array_equal(set_apart(rows, users, 0.25, seed=4)[1], apart)
    assert set_apart(rows, users, 0.0, seed=3)[1].size == 0


@pytest.mark.slow
def test_the_fusion_is_fitted_on_rows_the_language_model_never_trained_on(world):
    """apart_users: the training rows and the rows set apart share no user; the run's fusion weights are the ones
    fitted on the set-apart rows' scores of the finished model (refitted from the reloaded run: the same)."""
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.training.fusion_fit import ApartRows
    from ilora_cli.training.run import load_run
    from ilora_cli.training.trainer import Trainer

    cfg = _cfg(world, name="apart", max_steps=3, experts=2, head="item", apart_users=0.3, loss_over="catalogue")
    trainer = Trainer(cfg)
    trainer.run()
    info = json.loads((world / "runs" / "apart" / "ilora.json").read_text())
    from ilora_cli.data.holdout import train_users

    users = train_users(PreparedDataset.open("cyc"))[0]
    apart_rows = trainer.apart.rows
    assert not np.intersect1d(users[trainer.samples.rows], users[apart_rows]).size
    assert info["fusion_fit"]["on"] == "apart" and info["fusion_fit"]["rows"] == len(apart_rows) > 0
    assert info["holdout"]["apart_rows"] == len(apart_rows) and info["holdout"]["apart_users"] >= 1
    run = load_run(world / "runs" / "apart")
    split = PreparedDataset.open("cyc").split("train")
    rows = ApartRows.build(split, apart_rows, True, int(run.info["dataset"]["n_items"]), 6, 5)
    weights, _ = rows.fit(run)
    assert info["fusion"]["llm"] == pytest.approx(weights["llm"], abs=1e-5)
    assert info["fusion"]["encoder"] == pytest.approx(weights["encoder"], abs=1e-5)
    assert info["fusion"] != {"llm": 0.0, "encoder": 1.0}
    log = [json.loads(x) for x in (world / "runs" / "apart" / "logs" / "train.jsonl").read_text().splitlines()]
    assert all("fusion" not in r and "loss_fused" not in r for r in log)  # nothing fitted on the batches


def test_the_fusion_line_says_when_few_rows_were_set_apart():
    from ilora_cli.training.notes import FEW_APART_ROWS, fusion_note

    def fit(rows):
        metrics = {k: {"ndcg@10": 0.1} for k in ("fused", "llm", "encoder")}
        return {
            "rows": rows,
            "users": 2,
            "over": "catalogue",
            "weights": {"llm": 17.3, "encoder": -17.0},
            **{"metrics": metrics},
        }

    assert "are few for two weights" in fusion_note(fit(5))
    assert "are few" not in fusion_note(fit(FEW_APART_ROWS)) and "a = 17.300" in fusion_note(fit(FEW_APART_ROWS))
