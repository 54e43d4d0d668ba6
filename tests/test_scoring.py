"""Candidate scoring (all candidates packed behind one prompt) against one full forward per candidate."""

from __future__ import annotations

import pytest
import torch

from ilora_cli.llm.scoring import candidate_logprobs
from test_experts import N_ITEMS, _setup


def _naive(model, builder, hist, cands):
    """Score each candidate with a full forward of prompt + answer (the slow reference)."""
    out = []
    for h, cs in zip(hist, cands):
        row = []
        for c in cs:
            b = builder.batch([h], [cs], [c], pad_id=N_ITEMS)
            o, _ = model(b)
            logp = torch.log_softmax(o.logits[0, :-1].float(), -1)  # predicts tokens 1..T-1
            labels = b.labels[0, 1:]
            keep = labels != -100
            row.append(logp[keep].gather(1, labels[keep, None]).sum())
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("gate,experts", [("user", 4), ("token", 4), ("user", 1)])
def test_packed_scores_equal_full_forwards(gate, experts):
    model, builder = _setup(experts=experts, rank=8, gate=gate)
    hist = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]]
    cands = [[3, 4, 5, 6], [0, 1, 2, 11], [1, 2, 3, 0]]
    prefix = builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")
    with torch.no_grad():
        fast, gates = candidate_logprobs(model, builder, prefix, torch.tensor(cands))
        slow = _naive(model, builder, hist, cands)
    assert fast.shape == (3, 4) and gates.shape == (3, experts)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_mean_normalisation_divides_by_answer_length():
    model, builder = _setup()
    hist, cands = [[0, 1, 2]], [[3, 4, 5]]
    prefix = builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")
    with torch.no_grad():
        s, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands), "sum")
        m, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands), "mean")
    lengths = torch.tensor([len(builder.answer_ids(c)) for c in cands[0]], dtype=torch.float)
    torch.testing.assert_close(m[0], s[0] / lengths)


def test_scores_have_gradients_for_the_rank_objective():
    model, builder = _setup()
    model.train()
    prefix = builder.batch([[0, 1, 2]], [[3, 4, 5]], pad_id=N_ITEMS, padding_side="left")
    scores, _ = candidate_logprobs(model, builder, prefix, torch.tensor([[3, 4, 5]]))
    torch.nn.functional.cross_entropy(scores, torch.tensor([0])).backward()
    assert all(p.grad is not None for p in model.trainable_parameters()["gate"])
    assert all(p.grad is not None for p in model.trainable_parameters()["projector"])


def test_logits_to_keep_returns_the_last_positions_of_a_full_forward():
    model, builder = _setup()
    model.eval()
    batch = builder.batch([[0, 1, 2], [3, 4]], [[3, 4, 5], [0, 1, 2]], pad_id=N_ITEMS, padding_side="left")
    with torch.no_grad():
        full = model(batch)[0].logits
        last = model(batch, logits_to_keep=3)[0].logits
    assert last.shape[1] == 3
    torch.testing.assert_close(last, full[:, -3:])


def test_packed_scoring_with_eager_attention():
    model, builder = _setup()
    model.llm.get_base_model().set_attn_implementation("eager")
    hist = [[0, 1, 2], [3, 4, 5, 6, 7]]
    cands = [[3, 4, 5, 6], [0, 1, 2, 11]]
    prefix = builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")
    with torch.no_grad():
        fast, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands))
        slow = _naive(model, builder, hist, cands)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_packed_scoring_on_a_gpt2_backbone():
    """Learned absolute positions and Conv1D projections: another family than Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ilora_cli.encoders.sasrec import SASRec, SASRecConfig
    from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
    from ilora_cli.llm.prompt import PromptBuilder, add_placeholder_tokens
    from test_experts import TITLES

    from tiny import word_tokenizer

    tok = word_tokenizer(TITLES)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok) + 2,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    ).eval()
    add_placeholder_tokens(tok, base)
    cfg = ExpertConfig(experts=2, rank=4, alpha=8, dropout=0.0)
    llm = attach_lora(base, cfg, init_lora_weights=False)
    model = ILoraModel(llm, tok, SASRec(SASRecConfig(hidden_size=16), N_ITEMS), cfg).eval()
    builder = PromptBuilder(tok, TITLES, "music")
    hist, cands = [[0, 1, 2], [3, 4, 5, 6, 7]], [[3, 4, 5], [0, 1, 11]]
    prefix = builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")
    with torch.no_grad():
        fast, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands))
        slow = _naive(model, builder, hist, cands)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_and_answers_hold_each_rows_tokens_in_place(side):
    from ilora_cli.llm.scoring import pad_answers

    _, builder = _setup()
    hist, cands, targets = [[0, 1, 2], [3, 4, 5, 6, 7], [8]], [[3, 4, 5], [0, 1, 2], [1, 9, 3]], [3, 0, 9]
    b = builder.batch(hist, cands, targets, pad_id=N_ITEMS, padding_side=side)
    for i, (h, c, t) in enumerate(zip(hist, cands, targets)):
        row = builder.prompt_ids(h, c) + builder.answer_ids(t)
        real = b.attention_mask[i].bool()
        assert b.input_ids[i][real].tolist() == row
        assert (b.input_ids[i][~real] == builder.pad_id).all()
        assert real.nonzero().flatten().tolist() == (
            list(range(len(row)))
            if side == "right"
            else list(range(b.input_ids.shape[1] - len(row), b.input_ids.shape[1]))
        )
        assert b.history[i, : len(h)].tolist() == h and (b.history[i, len(h) :] == N_ITEMS).all()
    ids, mask = pad_answers(builder, cands)
    for k, item in enumerate(c for row in cands for c in row):
        answer = builder.answer_ids(item)
        assert ids[k, : len(answer)].tolist() == answer and mask[k].sum() == len(answer)
        assert (ids[k, len(answer) :] == builder.pad_id).all()


def test_backbones_that_transform_their_logits_are_scored_through_their_own_output():
    """A backbone whose config scales or caps its logits (Granite, Cohere, Gemma 2) is scored from its own
    logits, not from its output layer applied to the hidden states; both paths equal full forwards."""
    from ilora_cli.llm.model import _plain_output_layer

    model, builder = _setup()
    assert _plain_output_layer(model.llm.config)
    hist, cands = [[0, 1, 2], [3, 4, 5, 6, 7]], [[3, 4, 5, 6], [0, 1, 2, 11]]
    prefix = builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")
    with torch.no_grad():
        fast, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands))
        model.llm.config.logits_scaling = 2.0  # Llama ignores it: the same logits, through the other path
        assert not _plain_output_layer(model.llm.config)
        own, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands))
        slow = _naive(model, builder, hist, cands)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(own, slow, rtol=1e-4, atol=1e-4)


def test_fused_log_probabilities_give_autograd_gradients():
    """Title scores through the chunked log-probabilities with their closed-form backward (llm/logprobs.py) give the
    scores and LoRA gradients of the plain autograd path (taken when the output layer is trainable)."""
    from ilora_cli.llm.logprobs import fused_applicable

    model, builder = _setup()
    model.train()
    hist, cands = [[0, 1, 2], [3, 4, 5, 6, 7]], [[3, 4, 5, 6], [0, 1, 2, 11]]
    prefix = builder.batch(hist, cands, pad_id=N_ITEMS, padding_side="left")
    lora = model.trainable_parameters()["lora"]
    output = model.llm.get_output_embeddings()
    results = []
    for trainable_output in (False, True):
        output.weight.requires_grad_(trainable_output)
        assert fused_applicable(output) is not trainable_output
        scores, _ = candidate_logprobs(model, builder, prefix, torch.tensor(cands), "mean")
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor([1, 3]))
        results.append((scores.detach(), torch.autograd.grad(loss, lora)))
    output.weight.requires_grad_(False)
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert any(g.abs().max() > 0 for g in plain_grads)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
