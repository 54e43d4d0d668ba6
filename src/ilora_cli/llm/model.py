"""The iLoRA model: a causal LM with LoRA experts, a projector for item embeddings, and a gate.

The collaborative encoder is frozen and kept in eval mode at all times; it is deliberately *not* a
registered submodule, so ``model.train()`` cannot switch its dropout on and its weights are never saved
with the run (the run records the encoder's path and checksum instead).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .experts import Gate, TokenRouters, expert_gating, lora_a_modules
from .prompt import CANDIDATE_TOKEN, HISTORY_TOKEN, PromptBatch


@dataclass
class ExpertConfig:
    experts: int = 4  # K: LoRA experts (1 = plain LoRA, i.e. LLaRA)
    rank: int = 16  # total LoRA rank r, split into K blocks of r/K
    alpha: float = 32.0  # LoRA α (expert scaling α/(r/K))
    dropout: float = 0.05  # LoRA dropout on the layer input
    gate: str = "user"  # user, mlp, prompt, token, uniform
    target_modules: str = "all-linear"  # peft target modules: every attention and MLP projection by default
    hybrid: bool = True  # replace placeholder embeddings with projected item embeddings

    def validate(self) -> None:
        if self.experts < 1 or self.rank < 1 or self.rank % self.experts:
            raise ValueError(f"the rank ({self.rank}) must be a positive multiple of the expert count ({self.experts})")


class Projector(nn.Module):
    """Linear(d_item → H) → GELU → Linear(H → H): item embeddings into the LLM's token space."""

    def __init__(self, item_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(item_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ILoraModel(nn.Module):
    """A peft LoRA model plus projector and gate; ``forward`` applies per-sample expert mixtures."""

    def __init__(self, llm: nn.Module, tokenizer, encoder: nn.Module, config: ExpertConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.llm = llm  # peft PeftModel over the frozen backbone
        object.__setattr__(self, "encoder", encoder)  # frozen, eval, not a submodule (see module doc)
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        hidden = llm.get_input_embeddings().embedding_dim
        item_dim = encoder.item_embedding.embedding_dim
        self.projector = Projector(item_dim, hidden) if config.hybrid else None
        # K = 1 has nothing to mix: no gate parameters (they would get no gradient, which DDP rejects).
        gate_kind = "uniform" if config.experts == 1 else config.gate
        self.gate = Gate(gate_kind, config.experts, user_dim=item_dim, prompt_dim=hidden)
        self.token_routers = (
            TokenRouters({k: m.in_features for k, m in lora_a_modules(llm).items()}, config.experts)
            if config.gate == "token" and config.experts > 1
            else None
        )
        self.history_id = tokenizer.convert_tokens_to_ids(HISTORY_TOKEN)
        self.candidate_id = tokenizer.convert_tokens_to_ids(CANDIDATE_TOKEN)

    def train(self, mode: bool = True) -> ILoraModel:
        super().train(mode)
        self.encoder.eval()  # always
        return self

    def to(self, *args, **kwargs) -> ILoraModel:
        super().to(*args, **kwargs)
        self.encoder.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # -- inputs -------------------------------------------------------------------------------------
    def embed(self, batch: PromptBatch) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its projected item embedding."""
        embeds = self.llm.get_input_embeddings()(batch.input_ids)  # (B, T, H)
        if not self.config.hybrid:
            return embeds
        length = batch.history.shape[1]
        real = torch.arange(length, device=batch.history.device)[None, :] < batch.history_len[:, None]  # (B, L)
        items = torch.cat([batch.history[real], batch.candidates.reshape(-1)])  # (Nh + B*C,)
        with torch.no_grad():
            item_vecs = self.encoder.item_embedding(items)  # (Nh + B*C, d_item)
        vecs = self.projector(item_vecs.to(self.projector.net[0].weight.dtype)).to(embeds.dtype)  # (N, H)
        n_hist = int(real.sum())
        hist_mask = batch.input_ids == self.history_id  # (B, T)
        cand_mask = batch.input_ids == self.candidate_id  # (B, T)
        if int(hist_mask.sum()) != n_hist or int(cand_mask.sum()) != batch.candidates.numel():
            raise RuntimeError("placeholder count does not match the number of history/candidate items")
        # masked_scatter fills the masked positions in row-major order: row by row, left to right,
        # which is the order of history[real] and candidates.reshape(-1).
        embeds = embeds.masked_scatter(hist_mask.unsqueeze(-1).expand_as(embeds), vecs[:n_hist])
        embeds = embeds.masked_scatter(cand_mask.unsqueeze(-1).expand_as(embeds), vecs[n_hist:])
        return embeds

    def user_representation(self, batch: PromptBatch) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(batch.history, batch.history_len).float()  # (B, d_item)

    def gates(self, batch: PromptBatch, embeds: torch.Tensor) -> torch.Tensor:
        """(B, K) expert weights for each sequence (uniform for the token gate, which routes per token)."""
        prompt_mean = None
        if self.config.gate == "prompt":
            mask = batch.attention_mask.bool()
            if batch.labels is not None:
                mask = mask & (batch.labels == -100)  # the prompt only, never the answer
            m = mask.unsqueeze(-1).to(embeds.dtype)  # (B, T, 1)
            prompt_mean = (embeds * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
        return self.gate(self.user_representation(batch), prompt_mean)

    @contextmanager
    def gated(self, gates: torch.Tensor):
        """Route every LoRA layer through the experts, weighted by ``gates`` (B, K), inside the block."""
        if self.token_routers is not None and self.config.experts > 1:
            with expert_gating(self.llm, self.config.rank, token_routers=self.token_routers):
                yield
        elif self.config.experts == 1:
            yield  # K = 1 is plain LoRA: the gate is identically 1
        else:
            with expert_gating(self.llm, self.config.rank, gate=gates):
                yield

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        batch: PromptBatch,
        answers: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ):
        """Without ``answers``: causal-LM outputs (loss on the answer tokens when ``batch.labels`` is set;
        logits of the last ``logits_to_keep`` positions only when it is positive, which needs no labels).

        With ``answers`` (B*C, La) and ``answer_mask``: (B, C) sums of answer-token log-probabilities after
        each prompt, on the prompt's shared key/value cache (see :mod:`ilora_cli.llm.scoring`).
        Both paths go through ``forward`` so that a DDP wrapper sees every training computation.
        Returns (outputs or scores, gates).
        """
        embeds = self.embed(batch)
        gates = self.gates(batch, embeds)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding safe
        with self.gated(gates):
            if answers is None:
                out = self.llm(
                    inputs_embeds=embeds,
                    attention_mask=batch.attention_mask,
                    position_ids=positions,
                    labels=batch.labels,
                    logits_to_keep=logits_to_keep,
                )
                return out, gates
            return self._score(embeds, batch.attention_mask, positions, answers, answer_mask), gates

    def _score(self, embeds, attention_mask, positions, answers, answer_mask) -> torch.Tensor:
        n_rows = embeds.shape[0]
        n_cands = answers.shape[0] // n_rows
        # Only the last prompt position's logits are needed: logits_to_keep=1 skips the vocabulary
        # projection (and its backward) for every other position, a large share of the cost.
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts answer token 0
        first = first.repeat_interleave(n_cands, dim=0)  # (B*C, V)
        token_logp = [first.gather(1, answers[:, :1])]  # [(B*C, 1)]
        if answers.shape[1] > 1:
            cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.2x
            cache.batch_repeat_interleave(n_cands)  # (B*C, ...) in (b, c) order, like the gates
            rest = answers[:, :-1]  # (B*C, La-1): token j predicts token j+1
            mask = torch.cat([attention_mask.repeat_interleave(n_cands, dim=0), answer_mask[:, :-1]], dim=1)
            start = attention_mask.sum(-1).repeat_interleave(n_cands)[:, None]  # (B*C, 1) real prompt length
            pos = start + torch.arange(rest.shape[1], device=rest.device)  # (B*C, La-1)
            out2 = self.llm(input_ids=rest, attention_mask=mask, position_ids=pos, **cache_kwargs(self.llm, cache))
            logp = torch.log_softmax(out2.logits.float(), dim=-1)  # (B*C, La-1, V)
            token_logp.append(logp.gather(2, answers[:, 1:].unsqueeze(-1)).squeeze(-1))  # (B*C, La-1)
        token_logp = torch.cat(token_logp, dim=1) * answer_mask  # (B*C, La)
        return token_logp.sum(-1).view(n_rows, n_cands)  # (B, C)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups: LoRA, projector, gate (the gate trains at its own learning rate)."""
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        gate = [p for p in self.gate.parameters()]
        if self.token_routers is not None:
            gate += list(self.token_routers.parameters())
        projector = list(self.projector.parameters()) if self.projector is not None else []
        return {"lora": lora, "projector": projector, "gate": gate}


def cache_kwargs(llm, cache) -> dict:
    """Pass a key/value cache under the name this transformers version expects (``cache`` from 5.2x on)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}


def attach_lora(base: nn.Module, config: ExpertConfig, init_lora_weights: bool | str = True):
    """Wrap a (frozen) causal LM in a peft LoRA of total rank r on the target modules."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(base, lora)
