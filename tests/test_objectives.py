"""The terms of the rank objective against closed forms, hard negatives, the compact templates, encoder helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ilora_cli.data.prepared import SplitData
from ilora_cli.encoders.sasrec import SASRec, SASRecConfig
from ilora_cli.llm.model import Fusion
from ilora_cli.training.objectives import distillation_loss, fused_scores, listwise_loss, rank_loss
from ilora_cli.training.samples import TrainSamples
from test_experts import N_ITEMS, TITLES, _setup


def test_listwise_loss_closed_form():
    s = torch.tensor([[0.0, math.log(3.0), 0.0]])
    # -s_y + log Σ exp s = -ln 3 + ln(1 + 3 + 1)
    assert listwise_loss(s, torch.tensor([1])).item() == pytest.approx(math.log(5 / 3), rel=1e-6)


def test_distillation_closed_form_and_gradient():
    student = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # q = (1/4, 3/4)
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    kd = distillation_loss(student, teacher, temperature=1.0)
    # KL(p‖q) = ½ ln(½ / ¼) + ½ ln(½ / ¾) = ½ ln(4/3)
    assert kd.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    kd.backward()
    torch.testing.assert_close(student.grad, torch.tensor([[0.25 - 0.5, 0.75 - 0.5]]))  # q − p
    # τ = 2: both softmaxes at s/τ, and the τ² factor
    r = math.sqrt(3.0)
    q = (1 / (1 + r), r / (1 + r))
    expected = 4 * (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    assert distillation_loss(student.detach(), teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # the gradient at τ is τ · (q_τ − p_τ), so its size does not shrink with τ
    s2 = student.detach().clone().requires_grad_(True)
    distillation_loss(s2, teacher, 2.0).backward()
    torch.testing.assert_close(s2.grad, 2 * torch.tensor([[q[0] - 0.5, q[1] - 0.5]]))
    # a student that equals its teacher has nothing to learn
    same = torch.randn(3, 5)
    assert distillation_loss(same, same, 1.7).item() == pytest.approx(0.0, abs=1e-6)


def test_the_fused_term_trains_the_fusion_weights_only():
    torch.manual_seed(0)
    llm = torch.randn(4, 6, requires_grad=True)
    enc = torch.randn(4, 6)
    target = torch.tensor([0, 3, 5, 1])
    fusion = Fusion(0.3, 0.7)
    loss, terms = rank_loss(llm, enc, target, fusion=fusion)
    assert set(terms) == {"listwise", "fused"}
    loss.backward()
    alone = llm.detach().clone().requires_grad_(True)
    listwise_loss(alone, target).backward()
    torch.testing.assert_close(llm.grad, alone.grad)  # the LLM learns from its own ranking alone
    # d/da CE(a s + b e) = mean_b ( Σ_c p_c s_c − s_y ), and the same with e for b
    p = torch.softmax(fused_scores(llm.detach(), enc, 0.3, 0.7), dim=-1)
    rows = torch.arange(4)
    for weight, x in ((fusion.llm_weight, llm.detach()), (fusion.encoder_weight, enc)):
        expected = ((p * x).sum(-1) - x[rows, target]).mean()
        assert weight.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_fusion_starts_as_the_encoder_ranking():
    llm, enc = torch.randn(3, 5), torch.randn(3, 5)
    fusion = Fusion()
    torch.testing.assert_close(fusion(llm, enc), enc)
    assert fusion.weights() == {"llm": 0.0, "encoder": 1.0}


def test_rank_loss_adds_the_weighted_distillation_term():
    torch.manual_seed(1)
    llm, enc, target = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    loss, terms = rank_loss(llm, enc, target, distill_weight=0.5, temperature=2.0)
    expected = listwise_loss(llm, target) + 0.5 * distillation_loss(llm, enc, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and set(terms) == {"listwise", "distill"}
    plain, terms = rank_loss(llm, None, target)
    assert plain.item() == pytest.approx(listwise_loss(llm, target).item()) and set(terms) == {"listwise"}


def _encoder(n_items=40, seed=0):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(hidden_size=8), n_items).eval()


def _split(n_rows=12, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    seq = np.full((n_rows, 10), n_items, dtype=np.int64)
    lens = rng.integers(3, 11, size=n_rows)
    nxt = np.empty(n_rows, dtype=np.int64)
    for i in range(n_rows):
        items = rng.choice(n_items, size=lens[i] + 1, replace=False)
        seq[i, : lens[i]] = items[:-1]
        nxt[i] = items[-1]
    return SplitData("train", np.arange(n_rows), seq, lens, nxt, None)


def test_top_items_and_candidate_scores_agree_with_score_all():
    enc, split = _encoder(), _split()
    top = enc.top_items(split.seq, split.len_seq, 7, batch_size=5)  # batches of 5: the seams are covered
    with torch.no_grad():
        full = enc.score_all(torch.as_tensor(split.seq), torch.as_tensor(split.len_seq)).numpy()
    for i in range(len(split)):
        s = full[i].copy()
        s[split.seq[i, : split.len_seq[i]]] = -np.inf
        assert list(top[i]) == list(np.argsort(-s, kind="stable")[:7])
    cands = torch.as_tensor(top)
    with torch.no_grad():
        picked = enc.score_candidates(torch.as_tensor(split.seq), torch.as_tensor(split.len_seq), cands)
    np.testing.assert_allclose(picked.numpy(), np.take_along_axis(full, top, 1), rtol=1e-5, atol=1e-6)


def test_hard_negatives_come_from_the_encoder_top_and_stay_reproducible():
    enc, split = _encoder(), _split()
    samples = TrainSamples(split, 40, n_candidates=9, seed=3)
    samples.use_hard_negatives(enc, fraction=0.5, pool=6)
    assert samples.n_hard == 4
    pool = enc.top_items(split.seq, split.len_seq, 6)
    for row in range(len(split)):
        s = samples.sample(row, epoch=1)
        history = set(split.seq[row, : split.len_seq[row]].tolist())
        cands = s.candidates
        assert len(set(cands)) == 9 and cands[s.target_index] == s.target == split.next[row]
        assert not history & set(cands)
        hard = set(pool[row].tolist()) - {s.target}
        assert len(hard & set(cands)) >= 4
        assert samples.sample(row, epoch=1) == s  # a resumed run rebuilds the same sample
    uniform = TrainSamples(split, 40, n_candidates=9, seed=3)
    assert uniform.sample(0, 0) != samples.sample(0, 0)
    with pytest.raises(Exception, match="hard_pool"):
        TrainSamples(split, 40, n_candidates=9, seed=3).use_hard_negatives(enc, fraction=1.0, pool=5)


def test_compact_templates_carry_the_same_items_in_fewer_tokens():
    from ilora_cli.llm.prompt import PromptBuilder

    model, builder = _setup()
    compact = PromptBuilder(builder.tokenizer, TITLES, "music", hybrid=True, templates="compact")
    hist, cands = [[0, 1, 2], [3, 4, 5, 6, 7]], [[3, 4, 5], [0, 1, 2]]
    text = compact.prompt_text(hist[0], cands[0])
    assert TITLES[0] not in text and text.count("[HistoryEmb]") == 3  # the history as embeddings only
    assert f"[CansEmb] {TITLES[3]}" in text  # each candidate's embedding right before its title
    for h, c in zip(hist, cands):
        assert len(compact.prompt_ids(h, c)) < len(builder.prompt_ids(h, c))
    batch = compact.batch(hist, cands, [3, 0], pad_id=N_ITEMS)
    with torch.no_grad():
        out, _ = model(batch)  # the placeholders line up with the items (embed checks the counts)
    assert torch.isfinite(out.loss)
    text_only = PromptBuilder(builder.tokenizer, TITLES, "music", hybrid=False, templates="compact")
    assert TITLES[0] in text_only.prompt_text(hist[0], cands[0])  # text prompts keep the history titles
    with pytest.raises(ValueError, match="template set"):
        PromptBuilder(builder.tokenizer, TITLES, "music", templates="nope")
