"""The maths of instance-wise LoRA: the fused mixture against plain LoRA and against its definition."""

from __future__ import annotations

import pytest
import torch

from ilora_cli.encoders.sasrec import SASRec, SASRecConfig
from ilora_cli.llm.experts import expand_gate, expert_gating, lora_a_modules
from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
from ilora_cli.llm.prompt import PromptBuilder, add_placeholder_tokens

from tiny import tiny_llama, word_tokenizer

N_ITEMS = 12
TITLES = [f"song {w}" for w in "alpha beta gamma delta omega zeta eta theta iota kappa lambda mu".split()]


def _randomise_lora(peft_model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2


def _setup(experts=4, rank=8, gate="user", hybrid=True, dropout=0.0, seed=0):
    tok = word_tokenizer(TITLES)
    base = tiny_llama(len(tok) + 2, seed=seed)
    add_placeholder_tokens(tok, base)
    torch.manual_seed(seed)
    encoder = SASRec(SASRecConfig(hidden_size=16), N_ITEMS)
    cfg = ExpertConfig(experts=experts, rank=rank, alpha=16, dropout=dropout, gate=gate, hybrid=hybrid)
    llm = attach_lora(base, cfg)
    _randomise_lora(llm)
    model = ILoraModel(llm, tok, encoder, cfg).eval()
    builder = PromptBuilder(tok, TITLES, "music", hybrid=hybrid)
    return model, builder


def _batch(builder, with_targets=True):
    hist = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]]
    cands = [[3, 4, 5], [0, 1, 2], [1, 2, 3]]
    targets = [3, 0, 2] if with_targets else None
    return builder.batch(hist, cands, targets, pad_id=N_ITEMS)


def test_expand_gate_shapes_and_beam_repeat():
    g = torch.tensor([[0.1, 0.9], [0.5, 0.5]])
    e = expand_gate(g, rank=4, batch=2)
    assert e.shape == (2, 1, 4)
    assert torch.allclose(e[0, 0], torch.tensor([0.2, 0.2, 1.8, 1.8]))
    beams = expand_gate(g, rank=4, batch=6)  # 3 beams per sequence, repeat_interleave order
    assert torch.equal(beams[:3], e[:1].expand(3, 1, 4)) and torch.equal(beams[3:], e[1:].expand(3, 1, 4))
    with pytest.raises(RuntimeError):
        expand_gate(g, rank=4, batch=3)


def _bare_peft(model: ILoraModel):
    """A peft LoRA model built afresh with ``model``'s weights and no gate hook anywhere: plain LoRA of rank r."""
    tok = word_tokenizer(TITLES)
    base = tiny_llama(len(tok) + 2, seed=0)
    add_placeholder_tokens(tok, base)
    cfg = model.config
    bare = attach_lora(base, ExpertConfig(experts=1, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)).eval()
    bare.load_state_dict(model.llm.state_dict())
    assert not any(m._forward_hooks for m in lora_a_modules(bare).values())
    return bare


def test_k1_equals_peft_lora_exactly():
    """K = 1 is plain LoRA: no gate hook is installed (the hooked path at K > 1 is checked against the expert
    sum in test_every_hooked_layer_computes_the_expert_sum_of_its_rows_gates)."""
    model, builder = _setup(experts=1, rank=8)
    assert not any(m._forward_hooks for m in lora_a_modules(model.llm).values())
    batch = _batch(builder)
    out, gates = model(batch)
    embeds = model.embed(batch)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    plain = _bare_peft(model)(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions).logits
    assert torch.equal(out.logits, plain)
    assert torch.equal(gates, torch.ones(3, 1))


def test_uniform_gate_equals_plain_lora_of_the_same_total_rank():
    """Through the model's gate hooks with g = 1/K, against the same weights in a peft model without them."""
    model, builder = _setup(experts=4, rank=8, gate="uniform")
    assert all(m._forward_hooks for m in lora_a_modules(model.llm).values())  # the hooked path is the one tested
    batch = _batch(builder)
    out, gates = model(batch)
    assert torch.allclose(gates, torch.full((3, 4), 0.25))
    embeds = model.embed(batch)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    bare = _bare_peft(model)
    plain = bare(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions).logits
    torch.testing.assert_close(out.logits, plain, rtol=1e-5, atol=1e-5)
    # and the LoRA is really active: without it the logits differ
    with bare.disable_adapter():
        base = bare(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions).logits
    assert not torch.allclose(base, plain, atol=1e-3)


@pytest.mark.parametrize("experts", [1, 2, 4])
def test_every_hooked_layer_computes_the_expert_sum_of_its_rows_gates(experts):
    """In the model's own forward (its installed hooks, the gates its forward computed), every adapted layer gives
    h_b = W x_b + s Σ_k g_bk B_k A_k x_b with s = α/(r/K) and row b's own gates: computed here the slow way, expert
    by expert and row by row, on the input each layer received."""
    model, builder = _setup(experts=experts, rank=8)
    layers = {name: model.llm.get_submodule(name) for name in lora_a_modules(model.llm)}
    seen = {}

    def capture(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())

        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            _, gates = model(_batch(builder))
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(layers)
    if experts > 1:  # per-row gates that differ, far from uniform: a mix-up of rows or experts shows
        assert (gates[0] - gates[1]).abs().max() > 0.05 and (gates - 1 / experts).abs().max() > 0.05
    s, width = 16 / (8 / experts), 8 // experts  # α / (r/K), the rank of one expert
    with torch.no_grad():
        for name, layer in layers.items():
            x, h = seen[name]  # (B, T, d_in), (B, T, d_out)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, d_in), (d_out, r)
            expected = layer.base_layer(x)  # (B, T, d_out)
            for b in range(x.shape[0]):
                for k in range(experts):
                    blk = slice(width * k, width * (k + 1))
                    expected[b] += s * gates[b, k] * (x[b] @ A[blk].T @ B[:, blk].T)  # (T, d_out)
            torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5, msg=lambda m, layer=name: f"{layer}: {m}")


def test_fused_form_matches_the_expert_sum_definition():
    """h = W x + s Σ_k g_k B_k A_k x with s = α/(r/K), on one adapted layer (a bare peft model)."""
    tok = word_tokenizer(TITLES)
    llm = attach_lora(tiny_llama(len(tok), seed=0), ExpertConfig(experts=4, rank=8, alpha=16, dropout=0.0))
    _randomise_lora(llm)
    layer_name, lora_a = next(iter(lora_a_modules(llm).items()))
    layer = llm.get_submodule(layer_name)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, d_in), (d_out, r)
    x = torch.randn(2, 5, A.shape[1])
    g = torch.softmax(torch.randn(2, 4), dim=-1)
    with torch.no_grad(), expert_gating(llm, 8, gate=g):
        fused = layer(x)
    base = layer.base_layer(x)
    s = 16 / (8 / 4)  # α / (r/K)
    expected = base.clone()
    for k in range(4):
        blk = slice(2 * k, 2 * k + 2)
        delta = x @ A[blk].T @ B[:, blk].T  # (2, 5, d_out)
        expected += s * g[:, k, None, None] * delta
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    # outside the context manager no hook is left behind
    assert not lora_a._forward_hooks


@pytest.mark.parametrize("gate", ["user", "mlp", "prompt", "token"])
def test_per_sample_gates_batch_equals_one_at_a_time(gate):
    model, builder = _setup(experts=4, rank=8, gate=gate)
    hist = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]]
    cands = [[3, 4, 5], [0, 1, 2], [1, 2, 3]]
    together = builder.batch(hist, cands, [3, 0, 2], pad_id=N_ITEMS, padding_side="left")
    out, gates = model(together)
    assert not torch.allclose(gates[0], gates[1]) or gate == "token"
    for i in range(3):
        alone = builder.batch(hist[i : i + 1], cands[i : i + 1], [[3, 0, 2][i]], pad_id=N_ITEMS, padding_side="left")
        o, g = model(alone)
        n = alone.input_ids.shape[1]
        torch.testing.assert_close(out.logits[i, -n:], o.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gates[i], g[0])


def test_gradients_reach_lora_projector_gate_and_nothing_frozen():
    model, builder = _setup(experts=4, rank=8, dropout=0.1)
    model.train()
    assert not model.encoder.training  # the encoder stays in eval mode
    out, _ = model(_batch(builder))
    out.loss.backward()
    groups = model.trainable_parameters()
    assert groups["lora"] and groups["projector"] and groups["gate"]
    for name, params in groups.items():
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = {id(p) for ps in groups.values() for p in ps}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad and p.grad is None, name
    for p in model.encoder.parameters():
        assert not p.requires_grad and p.grad is None


def test_placeholders_are_replaced_exactly():
    model, builder = _setup()
    batch = _batch(builder)
    plain = model.llm.get_input_embeddings()(batch.input_ids)
    mixed = model.embed(batch)
    changed = (plain != mixed).any(-1)  # (B, T)
    placeholder = (batch.input_ids == model.history_id) | (batch.input_ids == model.candidate_id)
    assert torch.equal(changed, placeholder)
    # the k-th history placeholder of row 1 carries projector(item_embedding(history[1, k]))
    rows = torch.nonzero(batch.input_ids[1] == model.history_id, as_tuple=True)[0]
    with torch.no_grad():
        want = model.projector(model.encoder.item_embedding(torch.tensor([3, 4, 5, 6, 7])))
    torch.testing.assert_close(mixed[1, rows], want)
    cand_pos = torch.nonzero(batch.input_ids[2] == model.candidate_id, as_tuple=True)[0]
    with torch.no_grad():
        want = model.projector(model.encoder.item_embedding(torch.tensor([1, 2, 3])))
    torch.testing.assert_close(mixed[2, cand_pos], want)


def test_text_only_prompt_has_no_placeholders_and_no_projector():
    model, builder = _setup(hybrid=False)
    batch = _batch(builder)
    assert model.projector is None
    assert not ((batch.input_ids == model.history_id) | (batch.input_ids == model.candidate_id)).any()
    out, _ = model(batch)
    assert torch.isfinite(out.loss)


def test_labels_cover_exactly_the_answer_and_eos():
    _, builder = _setup()
    batch = _batch(builder)
    for i, target in enumerate([3, 0, 2]):
        answer = builder.answer_ids(target)
        lab = batch.labels[i][batch.labels[i] != -100].tolist()
        assert lab == answer and answer[-1] == builder.eos_id
        prompt = builder.prompt_ids(
            *[[[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]][i]], [[3, 4, 5], [0, 1, 2], [1, 2, 3]][i]
        )
        assert batch.input_ids[i, : len(prompt)].tolist() == prompt
        assert (batch.labels[i, : len(prompt)] == -100).all()


def test_gating_never_depends_on_the_batch():
    model, builder = _setup(gate="mlp")
    model.train()  # even in train mode (no batch statistics anywhere)
    model.llm.eval()
    b = _batch(builder)
    _, g_all = model(b)
    sub = builder.batch([[0, 1, 2]], [[3, 4, 5]], [3], pad_id=N_ITEMS)
    _, g_one = model(sub)
    torch.testing.assert_close(g_all[0], g_one[0])


def _reference_for_gate(model, gate: torch.Tensor):
    """The model's LoRA with one fixed gate applied in the weights, layer by layer: each expert's rows of every
    ``lora_A`` scaled by K·g_k (the fused form z ⊙ K·g written into A), and the gate hooks taken off. An
    independent path to the same function, against which hooked generation is compared."""
    import copy

    ref = copy.deepcopy(model.llm)
    k, rank = model.config.experts, model.config.rank
    scale = (gate.float() * k).repeat_interleave(rank // k)  # (r,)
    with torch.no_grad():
        for lora_a in lora_a_modules(ref).values():
            lora_a._forward_hooks.clear()
            lora_a.weight.mul_(scale[:, None].to(lora_a.weight.dtype))  # (r, d_in)
    return ref.eval()


def _greedy(ref, embeds: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Greedy decoding by full forwards (no cache, no generate): the argmax token, appended, until the end token."""
    out = []
    e = embeds[None]  # (1, T, H)
    with torch.no_grad():
        for _ in range(steps):
            token = int(ref(inputs_embeds=e).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            e = torch.cat([e, ref.get_input_embeddings()(torch.tensor([[token]]))], dim=1)  # (1, T+1, H)
    return out


def test_generate_mode_applies_each_rows_gate_in_greedy_and_beam_search():
    """Generation runs inside ``gated(...)``: each row's LoRA mixture follows its own gate, repeated per beam.
    Without the gates (or with the beams' gates mixed up), the outputs differ from the per-gate reference."""
    from ilora_cli.evaluation.llm import generate_answers
    from ilora_cli.training.run import LoadedRun

    model, builder = _setup(experts=2, rank=4, seed=3)
    with torch.no_grad():  # the LoRA's effect must be large enough to change which tokens win
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.mul_(8.0)
    run = LoadedRun(model, builder.tokenizer, builder, {"dataset": {"pad_id": N_ITEMS, "max_history": 10}}, TITLES)
    histories, cands = [[0, 1, 2], [5, 6, 7]], torch.tensor([[3, 4, 5, 6], [8, 9, 10, 11]]).numpy()
    prefix = builder.batch(histories, cands.tolist(), None, None, N_ITEMS, 10, padding_side="left")
    assert bool(prefix.attention_mask.all())  # same lengths: no padding, so the reference needs none
    steps = max(len(builder.answer_ids(int(i))) for i in cands.flatten()) + 2

    def set_gate(bias: list[float], weight_from: torch.Tensor | None = None) -> torch.Tensor:
        """Gates from the user gate's own weights: a fixed gate (weight 0, bias), or one per user."""
        with torch.no_grad():
            model.gate.net.weight.zero_()
            if weight_from is not None:
                model.gate.net.weight.copy_(weight_from)
            model.gate.net.bias.copy_(torch.tensor(bias))
            return model.gates(prefix, model.embed(prefix))  # (B, K)

    texts = {}
    for name, bias in (("expert 0", [9.0, -9.0]), ("expert 1", [-9.0, 9.0])):
        gates = set_gate(bias)
        for beams in (1, 2):
            texts[name, beams], got = generate_answers(run, histories, cands, batch_size=2, num_beams=beams)
            assert torch.allclose(torch.from_numpy(got), gates)
        embeds = model.embed(prefix).detach()
        for row in range(2):
            ref = _reference_for_gate(model, gates[row])
            greedy = _greedy(ref, embeds[row], steps, builder.eos_id)
            assert texts[name, 1][row] == builder.tokenizer.decode(greedy, skip_special_tokens=True), (name, row)
            beam = ref.generate(
                inputs_embeds=embeds[row : row + 1], attention_mask=prefix.attention_mask[row : row + 1],
                max_new_tokens=steps, do_sample=False, num_beams=2, eos_token_id=builder.eos_id,
                pad_token_id=builder.pad_id,
            )  # fmt: skip
            assert texts[name, 2][row] == builder.tokenizer.decode(beam[0], skip_special_tokens=True), (name, row)
    # the same prompts under the two gates: the gates decide what is generated
    assert texts["expert 0", 1] != texts["expert 1", 1] and texts["expert 0", 2] != texts["expert 1", 2]
    # one batch whose two rows have different gates, through beams: each row keeps its own gate
    users = model.user_representation(prefix)  # (2, d)
    direction = (users[0] - users[1]) / (users[0] - users[1]).norm()
    gates = set_gate([0.0, 0.0], weight_from=torch.stack([direction, -direction]) * 50)
    assert gates[0, 0] > 0.9 and gates[1, 1] > 0.9
    mixed, _ = generate_answers(run, histories, cands, batch_size=2, num_beams=2)
    embeds = model.embed(prefix).detach()
    for row in range(2):
        ref = _reference_for_gate(model, gates[row])
        beam = ref.generate(
            inputs_embeds=embeds[row : row + 1], attention_mask=prefix.attention_mask[row : row + 1],
            max_new_tokens=steps, do_sample=False, num_beams=2, eos_token_id=builder.eos_id,
            pad_token_id=builder.pad_id,
        )  # fmt: skip
        assert mixed[row] == builder.tokenizer.decode(beam[0], skip_special_tokens=True), row
