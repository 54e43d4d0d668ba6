"""Every common causal-LM family as the backbone: a tiny random model of each, built from its transformers config and
saved as a directory with the fixture's tokenizer, through the code paths that touch the architecture — the hybrid
prompt's embedding scale, the gate hooks on every adapted layer, the final hidden state of the item head, packed
title scoring, greedy generation, training with K = 4, save → load, and ``export --merge`` for K = 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from ilora_cli.llm.backbone import BackboneSpec, load_backbone

from tiny import word_tokenizer

HIDDEN = 32
COMMON = dict(
    vocab_size=0,  # the tokenizer's, filled in by _config
    hidden_size=HIDDEN,
    intermediate_size=2 * HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
# family → (config class, its own settings, the leaf names that target_modules=all-linear adapts)
ATTENTION_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True), ATTENTION_MLP),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False), ATTENTION_MLP),
    "qwen2": ("Qwen2Config", dict(), ATTENTION_MLP),  # biases on q, k and v
    "qwen3": ("Qwen3Config", dict(head_dim=8), ATTENTION_MLP),  # q/k norms
    "gemma2": ("Gemma2Config", dict(head_dim=8), ATTENTION_MLP),  # √H embedding scale, soft-capped logits, eager
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8), ATTENTION_MLP),  # √H embedding scale, sliding layers
    "phi3": ("Phi3Config", dict(), {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused projections
    "gpt2": ("GPT2Config", dict(), {"c_attn", "c_proj", "c_fc"}),  # Conv1D, learned positions, transformer.ln_f
}
FAMILY_NAMES = [f for f, (cls, _, _) in FAMILIES.items() if hasattr(transformers, cls)]  # those this version has
TITLES = [f"Item {chr(65 + i % 26)}{i}" for i in range(30)]  # the tiny_world dataset's titles (conftest.py)
HIST, CANDS = [[0, 1, 2], [5, 6, 7, 8, 9]], [[3, 4, 10], [10, 1, 12]]


def _config(family: str, vocab: int):
    cls, own, _ = FAMILIES[family]
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
        )
    return getattr(transformers, cls)(**{**COMMON, "vocab_size": vocab, **own})


@pytest.fixture(scope="module")
def world(tiny_world):
    """tiny_world's $ILORA_HOME (the cyc dataset and its SASRec) and a saved tiny backbone per family."""
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer(TITLES)
    for family in FAMILY_NAMES:
        target = tiny_world / "arch" / family
        if not (target / "config.json").is_file():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_config(family, len(tok))).save_pretrained(target)
            tok.save_pretrained(target)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ILORA_HOME", str(tiny_world))
        yield tiny_world


def _model(world, family: str, head: str = "title", experts: int = 4):
    """The family's backbone as load_backbone gives it, with random LoRA weights, the token norm and the user token."""
    from ilora_cli.encoders.io import load_encoder
    from ilora_cli.llm.model import ExpertConfig, ILoraModel, attach_lora
    from ilora_cli.llm.prompt import PromptBuilder

    base, tok = load_backbone(BackboneSpec(str(world / "arch" / family)))
    encoder, _ = load_encoder("cyc-sasrec")
    cfg = ExpertConfig(
        experts=experts, rank=8, alpha=16, dropout=0.0, head=head, projector_norm="token", user_token=True
    )
    torch.manual_seed(0)
    model = ILoraModel(attach_lora(base, cfg, init_lora_weights=False), tok, encoder, cfg).eval()
    builder = PromptBuilder(tok, TITLES, templates="compact", user_token=True, list_candidates=head == "title")
    return model, builder


def _prefix(builder, pad_id: int = 30):
    return builder.batch(HIST, CANDS, pad_id=pad_id, padding_side="left")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding (absolute positions in GPT-2)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_placeholders_sit_on_the_familys_token_embedding_scale(world, family):
    """projector_norm=token gives the projected vectors the norm of the tokens beside them in ``inputs_embeds``: what
    the embedding module outputs (Gemma multiplies its rows by √H there), not the norm of its weight rows."""
    from transformers import AutoModelForCausalLM

    model, builder = _model(world, family)
    fresh = AutoModelForCausalLM.from_config(_config(family, 10))
    assert model.llm.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")  # Gemma 2: no sdpa
    embedding = model.llm.get_input_embeddings()
    assert type(embedding) is type(fresh.get_input_embeddings())  # growing the vocabulary kept the family's module
    prefix = _prefix(builder)
    with torch.no_grad():
        embeds = model.embed(prefix)  # (B, T, H)
        tokens = embedding(torch.arange(model.history_id)).norm(dim=-1)  # (n,) the module's outputs
    placeholder = torch.isin(prefix.input_ids, torch.tensor([model.history_id, model.candidate_id, model.user_id]))
    real = prefix.attention_mask.bool()
    norms = embeds[placeholder].norm(dim=-1)
    assert model.token_norm == pytest.approx(float(tokens.mean()), rel=1e-5)
    torch.testing.assert_close(norms, torch.full_like(norms, float(tokens.mean())), rtol=1e-4, atol=1e-6)
    beside = embeds[real & ~placeholder].norm(dim=-1).mean()  # the prompt's own tokens
    assert 0.7 < float(norms.mean() / beside) < 1.4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_gate_hooks_sit_on_every_adapted_layer_and_route_it(world, family):
    """all-linear adapts the family's own projections (fused ones included, never the output layer); every adapted
    layer carries one gate hook, runs it in a forward, and the gates change the logits."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ilora_cli.llm.experts import lora_a_modules

    model, builder = _model(world, family)
    fresh = AutoModelForCausalLM.from_config(_config(family, 10))
    linear = {n for n, m in fresh.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))} - {"lm_head"}
    adapted = {n for n, m in model.llm.named_modules() if isinstance(m, LoraLayer)}
    hooked = lora_a_modules(model.llm)
    assert set(hooked) == adapted == {f"base_model.model.{n}" for n in linear}  # every projection of the decoder
    assert {n.rsplit(".", 1)[-1] for n in adapted} == FAMILIES[family][2]
    assert all(len(m._forward_hooks) == 1 for m in hooked.values())
    ran = set()
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: ran.add(n)) for n, m in hooked.items()]
    batch = builder.batch(HIST, CANDS, [3, 10], pad_id=30)
    try:
        with torch.no_grad():
            logits = {}
            for k in (0, 3):
                with model.forcing_gates(torch.eye(4)[[k, k]]):
                    logits[k] = model(batch)[0].logits
    finally:
        for h in handles:
            h.remove()
    assert ran == set(hooked)
    assert (logits[0] - logits[3]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_item_head_reads_the_final_normalised_hidden_state(world, family):
    """The item head's h is the hidden state the family's output layer turns into logits (after its final norm,
    whatever it is called), at each left-padded row's last token; the query is W h."""
    from ilora_cli.llm.model import _plain_output_layer

    model, builder = _model(world, family, head="item")
    prefix = _prefix(builder)
    with torch.no_grad():
        h = model.hidden_states(prefix)  # (B, H)
        q, gates = model(prefix, query=True)
        embeds = model.embed(prefix)
        with model.gated(gates):
            logits = model.llm(
                inputs_embeds=embeds,
                attention_mask=prefix.attention_mask,
                position_ids=_positions(prefix.attention_mask),
            ).logits[:, -1]  # (B, V)
        want = model.llm.get_output_embeddings()(h)
        cap = getattr(model.llm.config, "final_logit_softcapping", None)
        if cap:
            want = cap * torch.tanh(want / cap)
    assert _plain_output_layer(model.llm.config) == (not cap)
    torch.testing.assert_close(want, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q, model.item_head(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_title_scores_and_greedy_generation_equal_plain_forwards(world, family):
    """Candidate titles packed behind the prompt score as plain forwards of prompt + title do (soft-capped logits,
    sliding-window layers, biases); greedy generation from ``inputs_embeds`` picks what plain forwards pick."""
    from ilora_cli.llm.scoring import candidate_logprobs

    model, builder = _model(world, family)
    prefix = _prefix(builder)
    with torch.no_grad():
        fast, gates = candidate_logprobs(model, builder, prefix, torch.tensor(CANDS))
        slow = []
        for b, (h, cs) in enumerate(zip(HIST, CANDS)):
            for c in cs:
                batch = builder.batch([h], [cs], [c], pad_id=30)
                with model.forcing_gates(gates[b : b + 1]):
                    logp = torch.log_softmax(model(batch)[0].logits[0, :-1].float(), -1)  # predicts tokens 1..T-1
                keep = batch.labels[0, 1:] != -100
                slow.append(logp[keep].gather(1, batch.labels[0, 1:][keep, None]).sum())
        torch.testing.assert_close(fast, torch.stack(slow).view(fast.shape), rtol=1e-4, atol=1e-4)

        embeds = model.embed(prefix)
        with model.gated(gates):
            out = model.llm.generate(
                inputs_embeds=embeds,
                attention_mask=prefix.attention_mask,
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
                pad_token_id=builder.pad_id,
            )
            mask, steps = prefix.attention_mask, []
            for _ in range(4):  # the same greedy decoding by whole forwards, the new tokens through the module
                out_step = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask))
                logits = out_step.logits[:, -1]  # (B, V)
                logits[:, builder.eos_id] = -torch.inf  # min_new_tokens
                steps.append(logits.argmax(-1))
                new = model.llm.get_input_embeddings()(steps[-1][:, None]).to(embeds.dtype)
                embeds, mask = torch.cat([embeds, new], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert out[:, -4:].tolist() == torch.stack(steps, 1).tolist()


@pytest.mark.slow  # two short trainings per family
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_train_k4_save_load_and_export_merge_k1(world, family, tmp_path):
    """train with K = 4 (item head, projector_norm=token): the reloaded run scores candidates, the catalogue and the
    gates as the trained model did. K = 1 (title head): ``export --merge`` writes a plain model of the family whose
    logits are the backbone's with the LoRA."""
    from transformers import AutoModelForCausalLM

    from ilora_cli.evaluation.llm import score_rows
    from ilora_cli.exporting import ExportConfig, export
    from ilora_cli.training.loop import TrainConfig, Trainer, train
    from ilora_cli.training.run import load_run
    from ilora_cli.training.validation import run_view

    fast = dict(dataset="cyc", batch_size=4, candidates=6, checkpoint_every=2, quiet=True, seed=5, max_steps=2)
    backbone = str(world / "arch" / family)
    k4 = TrainConfig(backbone=backbone, name=f"arch-{family}-k4", experts=4, rank=8, projector_norm="token", **fast)
    trainer = Trainer(k4)
    result = trainer.run()
    assert result["complete"] and np.isfinite(result["final_loss"])
    cands = np.array([[c] for c in CANDS])  # (N, D, C)
    trainer.unwrapped.eval()
    before = score_rows(run_view(trainer), HIST, cands, catalogue=True)
    after = score_rows(load_run(result["run_dir"]), HIST, cands, catalogue=True)
    for key in ("draws", "catalogue", "gates"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.ptp(before["gates"], axis=0).max() > 0  # per-user mixtures

    k1 = train(TrainConfig(backbone=backbone, name=f"arch-{family}-k1", experts=1, rank=8, head="title", **fast))
    out = tmp_path / "exported"
    export(ExportConfig(run=k1["run_dir"], output=out, merge=True))
    run = load_run(k1["run_dir"])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert type(merged) is type(run.model.llm.get_base_model())
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == run.model.llm.config.model_type
    ids = torch.tensor([[1, 5, 7, 9, 2, 4]])
    with torch.no_grad():
        want, got = run.model.llm(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_sliding_window_narrower_than_the_probe_is_refused_at_load(tmp_path):
    """Packed scoring's 4-D mask replaces the backbone's sliding window: a backbone whose window is narrower than the
    load-time probe scores differently, and is refused in one sentence that names its family."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from ilora_cli.errors import UserError

    tok = word_tokenizer(TITLES)
    torch.manual_seed(0)
    config = MistralConfig(**{**COMMON, "vocab_size": len(tok)}, sliding_window=3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "narrow")
    tok.save_pretrained(tmp_path / "narrow")
    with pytest.raises(UserError, match=r"\(MistralForCausalLM\) does not honour") as exc:
        load_backbone(BackboneSpec(str(tmp_path / "narrow")))
    assert "\n" not in str(exc.value)
