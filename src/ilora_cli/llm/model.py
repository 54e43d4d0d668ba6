"""The iLoRA model: a causal LM with LoRA experts, a projector for item embeddings, and a gate.

The collaborative encoder is frozen and kept in eval mode at all times; it is deliberately *not* a
registered submodule, so ``model.train()`` cannot switch its dropout on and its weights are never saved
with the run (the run records the encoder's path and checksum instead).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .experts import Gate, GateHolder, TokenRouters, install_gate_hooks, lora_a_modules
from .heads import HEADS, QUERIES, ItemHead
from .logprobs import fused_applicable, token_logprobs
from .packing import PackedAnswers
from .prompt import CANDIDATE_TOKEN, HISTORY_TOKEN, USER_TOKEN, PromptBatch

PROJECTOR_NORMS = ("none", "token")


GATE_STREAM = 7_919  # offset of the gate's random stream from the run's seed (ILoraModel)


@dataclass
class ExpertConfig:
    experts: int = 4  # K: LoRA experts (1 = plain LoRA, i.e. LLaRA)
    rank: int = 16  # total LoRA rank r, split into K blocks of r/K
    alpha: float = 32.0  # LoRA α (expert scaling α/(r/K))
    dropout: float = 0.05  # LoRA dropout on the layer input
    gate: str = "user"  # user, mlp, prompt, token, uniform
    target_modules: str = "all-linear"  # peft target modules: every attention and MLP projection by default
    hybrid: bool = True  # replace placeholder embeddings with projected item embeddings
    user_token: bool = False  # one more placeholder: the encoder's user representation, by its own projector
    head: str = "title"  # title (titles' log-likelihood) or item ((W h) · e_c, see heads.py)
    projector_norm: str = "none"  # none, or token: projected vectors rescaled to the backbone's mean token norm
    query: str = "direct"  # item head: direct (q = W h) or residual (q = u + W h, u the encoder's user vector)

    def validate(self) -> None:
        if self.experts < 1 or self.rank < 1 or self.rank % self.experts:
            raise ValueError(f"the rank ({self.rank}) must be a positive multiple of the expert count ({self.experts})")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.projector_norm not in PROJECTOR_NORMS:
            raise ValueError(f"unknown projector_norm {self.projector_norm!r}; choose none or token")
        if self.query not in QUERIES:
            raise ValueError(f"unknown query {self.query!r}; choose one of {', '.join(QUERIES)}")


class Projector(nn.Module):
    """Linear(d_item → H) → GELU → Linear(H → H): item embeddings into the LLM's token space."""

    def __init__(self, item_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(item_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Fusion(nn.Module):
    """The fused candidate score ``a · s + b · e`` of the language model's score s and the encoder's e.

    It starts at a = 0, b = 1 — the encoder's own ranking — and the LLM's weight grows only as far as its
    scores improve the ranking (the two weights are fitted by the listwise loss, which is convex in them).
    Only the ratio matters for the order: it is the β of ``s + β · e`` with β = b / a.
    """

    def __init__(self, llm_weight: float = 0.0, encoder_weight: float = 1.0):
        super().__init__()
        self.llm_weight = nn.Parameter(torch.tensor(float(llm_weight)))
        self.encoder_weight = nn.Parameter(torch.tensor(float(encoder_weight)))

    def forward(self, llm: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        return self.llm_weight * llm.float() + self.encoder_weight * encoder.float()  # (B, C)

    def weights(self) -> dict[str, float]:
        """``{"llm": a, "encoder": b}``, as ilora.json records them."""
        return {"llm": float(self.llm_weight.detach()), "encoder": float(self.encoder_weight.detach())}


class ILoraModel(nn.Module):
    """A peft LoRA model plus projector and gate; ``forward`` applies per-sample expert mixtures.

    With ``fusion`` (``{"llm": a, "encoder": b}``, or ``{}`` for the initial weights), the model also owns
    the weights of the fused candidate score (:class:`Fusion`); they are trained and saved with the run.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer,
        encoder: nn.Module,
        config: ExpertConfig,
        fusion: dict | None = None,
        head_init: str = "random",
    ):
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
        self.user_projector = Projector(item_dim, hidden) if config.hybrid and config.user_token else None
        # K = 1 has nothing to mix: no gate parameters (they would get no gradient, which DDP rejects).
        gate_kind = "uniform" if config.experts == 1 else config.gate
        # The gate draws its initial weights from a stream of its own, so that a K > 1 run and the K = 1 run of the
        # same seed share every other random number (the head's initialisation, the dropout masks): the only
        # difference between them is the mixture.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() + GATE_STREAM) % 2**63)
            self.gate = Gate(gate_kind, config.experts, user_dim=item_dim, prompt_dim=hidden)
            self.token_routers = (
                TokenRouters({k: m.in_features for k, m in lora_a_modules(llm).items()}, config.experts)
                if config.gate == "token" and config.experts > 1
                else None
            )
        self.fusion = Fusion(fusion.get("llm", 0.0), fusion.get("encoder", 1.0)) if fusion is not None else None
        self.item_head = ItemHead(hidden, item_dim, head_init) if config.head == "item" else None
        # The gate hooks stay on the LoRA layers for the model's life; forward fills the holder they read.
        self._gates = GateHolder()
        self._forced_gates: torch.Tensor | None = None  # forcing_gates(): the counterfactual gates of eval
        if self.token_routers is not None:
            install_gate_hooks(llm, config.rank, token_routers=self.token_routers)
        elif config.experts > 1:
            install_gate_hooks(llm, config.rank, holder=self._gates)
        self.history_id = tokenizer.convert_tokens_to_ids(HISTORY_TOKEN)
        self.candidate_id = tokenizer.convert_tokens_to_ids(CANDIDATE_TOKEN)
        self.user_id = tokenizer.convert_tokens_to_ids(USER_TOKEN)
        # projector_norm=token: the mean norm of the backbone's own token embeddings (the placeholder rows, added
        # last, excluded): the scale the projected vectors are given. Computed from the frozen backbone, not saved.
        # It is the norm of what the embedding module outputs, not of its weight rows: Gemma's module multiplies
        # the rows by √H, and the projected vectors sit beside its outputs in ``inputs_embeds``.
        self.token_norm = 0.0
        if config.projector_norm == "token":
            ids = [i for i in (self.history_id, self.candidate_id, self.user_id) if i is not None and i >= 0]
            embedding = llm.get_input_embeddings()
            tokens = torch.arange(max(1, min(ids, default=len(tokenizer))), device=embedding.weight.device)
            with torch.no_grad():  # in chunks: a large vocabulary's outputs at once would be a second embedding
                norms = [embedding(chunk).float().norm(dim=-1) for chunk in tokens.split(8192)]  # (n,) each
            self.token_norm = float(torch.cat(norms).mean())

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
        """Token embeddings with every placeholder replaced by its projected item embedding.

        The k-th ``[HistoryEmb]`` of a row takes the row's k-th history item, the k-th ``[CansEmb]`` its k-th
        candidate; the builder checked the counts on the host (:meth:`PromptBuilder.batch`), so nothing here reads
        a count back from the device.
        """
        embeds = self.llm.get_input_embeddings()(batch.input_ids)  # (B, T, H)
        if not self.config.hybrid:
            return embeds
        embeds = self._fill(embeds, batch.input_ids == self.history_id, self._project(batch.history))
        if batch.candidates_listed:
            embeds = self._fill(embeds, batch.input_ids == self.candidate_id, self._project(batch.candidates))
        if self.user_projector is not None:
            user = self.user_projector(self.user_representation(batch).to(self.user_projector.net[0].weight.dtype))
            user = self._to_token_scale(user)[:, None]  # (B, 1, H): one placeholder per row
            embeds = self._fill(embeds, batch.input_ids == self.user_id, user)
        return embeds

    def _project(self, items: torch.Tensor) -> torch.Tensor:
        """(B, n) item ids (padding included) → (B, n, H) their projected embeddings."""
        with torch.no_grad():
            vecs = self.encoder.item_embedding(items)  # (B, n, d_item)
        return self._to_token_scale(self.projector(vecs.to(self.projector.net[0].weight.dtype)))  # (B, n, H)

    @staticmethod
    def _fill(embeds: torch.Tensor, mask: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """``embeds`` (B, T, H) with the k-th masked position of each row replaced by ``vecs[b, k]`` (B, n, H)."""
        index = (mask.cumsum(1) - 1).clamp(min=0, max=vecs.shape[1] - 1)  # (B, T): k of each masked position
        picked = vecs.to(embeds.dtype).gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, T, H)
        return torch.where(mask[..., None], picked, embeds)  # (B, T, H)

    def _to_token_scale(self, vecs: torch.Tensor) -> torch.Tensor:
        """(N, H) projected vectors, rescaled to the backbone's mean token-embedding norm with projector_norm=token
        (the projector's outputs start on other scales than the tokens around them); as they are otherwise."""
        if self.config.projector_norm != "token":
            return vecs
        return vecs * (self.token_norm / vecs.norm(dim=-1, keepdim=True).clamp(min=1e-6))  # (N, H)

    def user_representation(self, batch: PromptBatch) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(batch.history, batch.history_len).float()  # (B, d_item)

    def encoder_scores(self, batch: PromptBatch) -> torch.Tensor:
        """(B, C) the frozen encoder's score of each candidate in the prompt (user · item embedding)."""
        with torch.no_grad():
            return self.encoder.score_candidates(batch.history, batch.history_len, batch.candidates).float()

    def gates(self, batch: PromptBatch, embeds: torch.Tensor) -> torch.Tensor:
        """(B, K) expert weights for each sequence (uniform for the token gate, which routes per token)."""
        prompt_mean = None
        if self.config.gate == "prompt":
            mask = batch.attention_mask.bool()
            if batch.labels is not None:
                mask = mask & (batch.labels == -100)  # the prompt only, never the answer
            m = mask.unsqueeze(-1).to(embeds.dtype)  # (B, T, 1)
            prompt_mean = (embeds * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
        if self._forced_gates is not None:
            forced = self._forced_gates
            if forced.shape != (len(batch.input_ids), self.config.experts):
                raise ValueError(f"forced gates of shape {tuple(forced.shape)} for a batch of {len(batch.input_ids)}")
            return forced.to(embeds.device)
        return self.gate(self.user_representation(batch), prompt_mean)

    @contextmanager
    def forcing_gates(self, gates: torch.Tensor | None):
        """Inside the block every batch is routed by ``gates`` (B, K) instead of its own gate's weights: another
        user's mixture, or the uniform one (evaluation's counterfactual). None: the gate's own."""
        self._forced_gates = gates
        try:
            yield
        finally:
            self._forced_gates = None

    @contextmanager
    def gated(self, gates: torch.Tensor):
        """Route every LoRA layer through the experts, weighted by ``gates`` (B, K), inside the block.

        The gates stay in force after the block, until the next ``forward`` or ``gated``: gradient
        checkpointing runs the layers again during ``backward`` and must see the same gates (the token
        gate routes inside its own hooks and ignores them; with K = 1 there is nothing to mix).
        """
        self._gates.gate = gates
        yield

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        batch: PromptBatch,
        answers: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        items: torch.Tensor | None = None,
        query: bool = False,
        packed: PackedAnswers | None = None,
    ):
        """Without ``answers``: causal-LM outputs (loss on the answer tokens when ``batch.labels`` is set;
        logits of the last ``logits_to_keep`` positions only when it is positive, which needs no labels).

        With ``answers`` (B*C, La) and ``answer_mask``, or their layout ``packed`` (:mod:`.packing`): (B, C) sums of
        answer-token log-probabilities after each prompt, all candidates packed behind the prompt in one forward
        (see :mod:`ilora_cli.llm.scoring`).

        Item head (left-padded prompts): with ``items`` (B, C), the (B, C) scores ``(W h) · e_c``; with
        ``query``, the (B, d) query vectors ``W h`` themselves.
        Every path goes through ``forward`` so that a DDP wrapper sees every training computation.
        Returns (outputs, scores or queries; gates).
        """
        embeds = self.embed(batch)
        gates = self.gates(batch, embeds)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding safe
        with self.gated(gates):
            if items is not None or query:
                if self.item_head is None:
                    raise ValueError("item scores need a model with the item head")
                q = self.item_head(self._last_hidden(embeds, batch.attention_mask, positions))  # (B, d)
                if self.config.query == "residual":  # the encoder's own query, moved by what the LLM adds
                    q = q.float() + self.user_representation(batch)  # (B, d)
                if query:
                    return q, gates
                with torch.no_grad():
                    e = self.encoder.item_embedding(items)  # (B, C, d) frozen
                return torch.einsum("bd,bcd->bc", q.float(), e.float()), gates  # (B, C)
            if answers is not None:
                packed = PackedAnswers.from_padded(answers, answer_mask, embeds.shape[0])
            if packed is None:
                out = self.llm(
                    inputs_embeds=embeds,
                    attention_mask=batch.attention_mask,
                    position_ids=positions,
                    labels=batch.labels,
                    logits_to_keep=logits_to_keep,
                )
                return out, gates
            return self._score(embeds, batch.attention_mask, positions, packed), gates

    def _last_hidden(self, embeds, attention_mask, positions) -> torch.Tensor:
        """(B, H) the decoder's final (normalised) hidden state at each row's last position; prompts are
        left-padded, so that is every row's last real token. The vocabulary projection is never computed."""
        decoder = self.llm.get_base_model().base_model  # e.g. LlamaModel inside LlamaForCausalLM, LoRA inside
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, -1]  # (B, H)

    @torch.no_grad()
    def hidden_states(self, batch: PromptBatch) -> torch.Tensor:
        """(B, H) the final hidden state at the end of each (left-padded) prompt, under the batch's gates."""
        embeds = self.embed(batch)
        gates = self.gates(batch, embeds)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        with self.gated(gates):
            return self._last_hidden(embeds, batch.attention_mask, positions)

    def catalogue_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, N) scores of every catalogue item for (B, d) query vectors."""
        return queries.float() @ self.encoder.item_embeddings().float().T  # (B, d) @ (d, N)

    def _score(self, embeds, attention_mask, positions, packed: PackedAnswers) -> torch.Tensor:
        """(B, C) summed answer-token log-probabilities, all candidates in one forward after the prompt.

        The prompt is encoded once. Behind it, each row carries its C answers packed end to end (token j of
        an answer predicts token j+1; the prompt's last position predicts every answer's first token). A
        block mask lets each answer token see the prompt and the earlier tokens of its own answer only,
        and its position continues the prompt's, so every candidate is scored exactly as if it followed
        the prompt alone -- without copying the prompt's keys and values per candidate, and without
        padding every answer to the longest title of the batch. ``packed`` (llm/packing.py) says where each
        answer token goes; it was laid out on the host, so nothing here waits for the device.
        """
        n_rows, n_cands = packed.first.shape
        impl = getattr(self.llm.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise ValueError(f"candidate scoring needs the sdpa or eager attention implementation, not {impl!r}")
        row, col, owner = packed.row, packed.col, packed.owner
        ids = packed.inputs.new_zeros((n_rows, packed.width))  # (B, W) the packed answer tokens
        ids[row, col] = packed.inputs
        real_len = attention_mask.sum(-1)  # (B,)
        answer_pos = torch.zeros((n_rows, packed.width), dtype=torch.long, device=embeds.device)  # (B, W)
        answer_pos[row, col] = real_len[row] + packed.offset  # continues the prompt's positions

        all_embeds = torch.cat([embeds, self.llm.get_input_embeddings()(ids).to(embeds.dtype)], dim=1)  # (B, T+W, H)
        all_pos = torch.cat([positions, answer_pos], dim=1)  # (B, T+W)
        mask = _packed_mask(attention_mask.bool(), packed.block, embeds.dtype)  # (B, 1, T+W, T+W)
        if _plain_output_layer(self.llm.config):
            # Only the positions that predict an answer token, and only the log-probabilities of those tokens:
            # the log-sum-exp over the vocabulary and one logit per position, never a log-softmax of every
            # position's whole vocabulary (or a copy of it per packed token).
            decoder = self.llm.get_base_model().base_model
            h = decoder(inputs_embeds=all_embeds, attention_mask=mask, position_ids=all_pos, use_cache=False)
            h = h.last_hidden_state  # (B, T+W, H)
            t = embeds.shape[1]
            output_layer = self.llm.get_output_embeddings()
            if fused_applicable(output_layer):  # frozen: chunked, and no vocabulary in the backward (logprobs.py)
                first = token_logprobs(h[:, t - 1], output_layer, packed.first)  # (B, C): answer token 0
                rest = token_logprobs(h[row, t + col], output_layer, packed.targets[:, None]).squeeze(1)  # (N,)
                return first.reshape(-1).index_add(0, owner, rest).view(n_rows, n_cands)
            hidden = torch.cat([h[:, t - 1], h[row, t + col]])  # (B + N, H): the prompt's last position, the slots
            logits = output_layer(hidden).float()  # (B + N, V)
            lse = torch.logsumexp(logits, dim=-1)  # (B + N,)
            first = logits[:n_rows].gather(1, packed.first) - lse[:n_rows, None]  # (B, C): answer token 0
            rest = logits[n_rows:].gather(1, packed.targets[:, None]).squeeze(1) - lse[n_rows:]  # (N,): tokens 1..
            return first.reshape(-1).index_add(0, owner, rest).view(n_rows, n_cands)
        out = self.llm(  # a backbone that transforms its logits (soft-capping, scaling): its own output
            inputs_embeds=all_embeds,
            attention_mask=mask,
            position_ids=all_pos,
            use_cache=False,
            logits_to_keep=packed.width + 1,  # the prompt's last position and every packed slot
        )
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, 1 + W, V)
        first = logp[:, 0].gather(1, packed.first)  # (B, C): answer token 0
        rest = logp[row, 1 + col].gather(1, packed.targets[:, None]).squeeze(1)  # (N,): tokens 1..L-1
        return first.reshape(-1).index_add(0, owner, rest).view(n_rows, n_cands)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups: LoRA, projector, gate, head, fusion (each trains at its own learning rate)."""
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        gate = [p for p in self.gate.parameters()]
        if self.token_routers is not None:
            gate += list(self.token_routers.parameters())
        projector = list(self.projector.parameters()) if self.projector is not None else []
        if self.user_projector is not None:
            projector += list(self.user_projector.parameters())
        fusion = list(self.fusion.parameters()) if self.fusion is not None else []
        head = list(self.item_head.parameters()) if self.item_head is not None else []
        return {"lora": lora, "projector": projector, "gate": gate, "head": head, "fusion": fusion}


def _plain_output_layer(config) -> bool:
    """Whether the backbone's logits are its output layer applied to the final hidden state, and nothing more
    (no soft-capping as in Gemma 2, no logit scaling as in Cohere or Granite)."""
    configs = [config, getattr(config, "text_config", None)]
    transforms = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return not any(getattr(c, k, None) not in (None, 1, 1.0) for c in configs if c is not None for k in transforms)


def _packed_mask(prompt_mask: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T+W, T+W) additive attention mask for a left-padded prompt followed by packed answers.

    Prompt tokens: causal over the prompt's real tokens. Packed answer tokens: every real prompt token,
    plus the earlier tokens of their own answer. Every position may attend to itself, so no row is
    fully masked (padding rows stay finite and are never attended to by real tokens).
    """
    n_rows, t = prompt_mask.shape
    w = block.shape[1]
    device = prompt_mask.device
    n = t + w
    idx = torch.arange(n, device=device)
    causal = idx[None, :] <= idx[:, None]  # (n, n)
    key_real = torch.cat([prompt_mask, block >= 0], dim=1)  # (B, n)
    allowed = causal[None] & key_real[:, None, :]  # (B, n, n)
    # answer queries see answer keys of their own block only (and all real prompt keys)
    same_block = block[:, :, None] == block[:, None, :]  # (B, W, W)
    allowed[:, t:, t:] &= same_block
    allowed |= torch.eye(n, dtype=torch.bool, device=device)[None]
    mask = torch.zeros((n_rows, 1, n, n), dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def attach_lora(base: nn.Module, config: ExpertConfig, init_lora_weights: bool | str = True):
    """Wrap a (frozen) causal LM in a peft LoRA of total rank r on the target modules."""
    from peft import LoraConfig, get_peft_model

    from ..errors import UserError

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        init_lora_weights=init_lora_weights,
    )
    try:
        return get_peft_model(base, lora)
    except ValueError as exc:
        if "target" not in str(exc).lower():
            raise
        first = str(exc).splitlines()[0]
        raise UserError(f"target_modules={config.target_modules!r} does not fit the backbone: {first}") from None
