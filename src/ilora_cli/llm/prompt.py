"""Hybrid prompts (METHOD.md §4): text with ``[HistoryEmb]``/``[CansEmb]`` placeholders beside each title.

Two template sets, recorded in every run (``templates`` in ilora.json):

- ``ilora-v1``: several paraphrases; one is picked per sample while training (seeded), the first is used
  at evaluation. Every item is written as ``title [Placeholder]`` (the space before the placeholder is a
  token of its own in byte-level BPE vocabularies).
- ``compact``: one short template. In hybrid prompts the history is given by its item embeddings alone
  (``[HistoryEmb]`` without titles) and each candidate as ``[CansEmb] title``, so the title's tokens come
  after the candidate's embedding and are the same tokens as the answer `` title``. About 30% fewer
  tokens per LastFM prompt than ``ilora-v1``. Text-only prompts keep the history titles.

The text-only variant (TALLRec-style) drops the placeholders. The answer is the target's title followed by
the end-of-answer token (the tokenizer's EOS), which is trained so that generation stops.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .packing import PackedAnswers

HISTORY_TOKEN = "[HistoryEmb]"
CANDIDATE_TOKEN = "[CansEmb]"
USER_TOKEN = "[UserEmb]"  # the encoder's user representation, projected (compact templates, ``user_token``)

_NOUN = {"music": "artist", "movies": "movie", "games": "game", "generic": "item"}
_VERB = {"music": "listened to", "movies": "watched", "games": "played", "generic": "interacted with"}

# {verb}, {noun}, {history} and {candidates} are filled in; kept short because every token costs time.
TEMPLATES = (
    "This user has {verb} {history}. Which {noun} comes next? Candidates: {candidates}. The answer is",
    "History: {history}. Choose the next {noun} from {candidates}. The answer is",
    "A user {verb} {history} in that order. Of {candidates}, the next {noun} is",
    "Given the {noun}s {history}, pick the next one among {candidates}. The answer is",
)
COMPACT_TEMPLATES = ("History:{history}. Candidates:{candidates}. Next {noun}:{user}",)
TEMPLATE_SETS = {"ilora-v1": TEMPLATES, "compact": COMPACT_TEMPLATES}
# The same sets without the candidates, for the item head (heads.py), which scores items it was not shown.
HISTORY_TEMPLATES = (
    "This user has {verb} {history}. Which {noun} comes next? The answer is",
    "History: {history}. The next {noun} is",
    "A user {verb} {history} in that order. The next {noun} is",
    "Given the {noun}s {history}, the next one is",
)
HISTORY_TEMPLATE_SETS = {"ilora-v1": HISTORY_TEMPLATES, "compact": ("History:{history}. Next {noun}:{user}",)}


@dataclass
class PromptBatch:
    """Token ids of prompts, left- or right-padded, with the items behind each placeholder."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor | None  # (B, T), -100 outside the answer; None without answers
    history: torch.Tensor  # (B, L) history item ids, right-padded with pad_id
    history_len: torch.Tensor  # (B,)
    candidates: torch.Tensor  # (B, C) candidate item ids
    candidates_listed: bool = True  # whether the prompt names the candidates (not with the item head)
    packed: PackedAnswers | None = None  # where the candidates' titles go behind the prompt (title scoring)

    def to(self, device, non_blocking: bool = False) -> PromptBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PromptBatch:
        """The same batch in page-locked host memory, from which a GPU copies asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> PromptBatch:
        tensors = (self.input_ids, self.attention_mask, self.labels, self.history, self.history_len, self.candidates)
        return PromptBatch(
            *(fn(t) if t is not None else None for t in tensors),
            self.candidates_listed,
            self.packed._map(fn) if self.packed is not None else None,
        )


class PromptBuilder:
    """Turns (history, candidates[, target]) into token ids with exact prompt lengths."""

    def __init__(
        self,
        tokenizer,
        titles: Sequence[str],
        domain: str = "generic",
        hybrid: bool = True,
        templates: str = "ilora-v1",
        user_token: bool = False,
        list_candidates: bool = True,
    ):
        """``list_candidates=False``: prompts of the history alone (the item head), from the same template set's
        history-only variant."""
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; choose one of {', '.join(TEMPLATE_SETS)}")
        sets = TEMPLATE_SETS if list_candidates else HISTORY_TEMPLATE_SETS
        if user_token and not (hybrid and all("{user}" in t for t in sets[templates])):
            raise ValueError(
                f"the user token needs hybrid prompts and templates with a user slot (compact), not {templates!r}"
            )
        self.user_token = user_token
        self.tokenizer = tokenizer
        self.hybrid = hybrid
        self.template_set = templates
        self.templates = sets[templates]
        self.list_candidates = list_candidates
        self.domain = domain if domain in _NOUN else "generic"
        # A title that spelled a placeholder would shift every placeholder after it.
        self.titles = [t.replace(HISTORY_TOKEN, "").replace(CANDIDATE_TOKEN, "").strip() for t in titles]
        self.history_id = tokenizer.convert_tokens_to_ids(HISTORY_TOKEN)
        self.candidate_id = tokenizer.convert_tokens_to_ids(CANDIDATE_TOKEN)
        if hybrid and (self.history_id == tokenizer.unk_token_id or self.candidate_id == tokenizer.unk_token_id):
            raise ValueError("the tokenizer lacks the placeholder tokens; use add_placeholder_tokens first")
        self.user_id = tokenizer.convert_tokens_to_ids(USER_TOKEN) if user_token else None
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._answers: dict[int, list[int]] = {}
        # Batches are built on a background thread while training steps run (training/batches.py, Prefetcher), and
        # validation builds its own meanwhile: one tokenizer call at a time.
        self._lock = threading.Lock()

    def _items(self, items: Sequence[int], token: str) -> str:
        if self.template_set == "compact":
            if not self.hybrid:
                return ",".join(f" {self.titles[i]}" for i in items)
            if token == HISTORY_TOKEN:
                return token * len(items)  # the embeddings alone
            return ",".join(f"{token} {self.titles[i]}" for i in items)
        mark = f" {token}" if self.hybrid else ""
        return ", ".join(f"{self.titles[i]}{mark}" for i in items)

    def prompt_text(self, history: Sequence[int], candidates: Sequence[int], template: int = 0) -> str:
        return self.templates[template % len(self.templates)].format(
            verb=_VERB[self.domain],
            noun=_NOUN[self.domain],
            history=self._items(history, HISTORY_TOKEN),
            candidates=self._items(candidates, CANDIDATE_TOKEN) if self.list_candidates else "",
            user=USER_TOKEN if self.user_token else "",
        )

    def prompt_ids(self, history: Sequence[int], candidates: Sequence[int], template: int = 0) -> list[int]:
        return self.prompts_ids([history], [candidates], [template])[0]

    def prompts_ids(
        self,
        histories: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
        templates: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """The token ids of several prompts, tokenized in one call (the fast tokenizers batch it)."""
        texts = [
            self.prompt_text(h, c, templates[i] if templates is not None else 0)
            for i, (h, c) in enumerate(zip(histories, candidates))
        ]
        bos = self.tokenizer.bos_token_id
        head = [bos] if bos is not None and bos != self.eos_id else []
        with self._lock:
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [head + ids for ids in encoded]

    def answer_ids(self, item: int) -> list[int]:
        """`` <title><eos>`` — the continuation after the prompt (cached per item)."""
        ids = self._answers.get(item)
        if ids is None:
            with self._lock:
                ids = self.tokenizer(" " + self.titles[item], add_special_tokens=False)["input_ids"] + [self.eos_id]
            self._answers[item] = ids
        return ids

    def _check_placeholders(self, ids: np.ndarray, n_history: list[int], n_candidates: list[int]) -> None:
        """Every prompt of ``ids`` (B, T) holds one placeholder per kept history item and listed candidate (and one
        user placeholder with the user token): the model fills them in order (:meth:`ILoraModel.embed`)."""
        listed = n_candidates if self.list_candidates else [0] * len(ids)

        def count(token) -> list[int]:
            return (ids == token).sum(1).tolist()  # (B,) per row

        if count(self.history_id) != n_history or count(self.candidate_id) != listed:
            raise RuntimeError("placeholder count does not match the number of history/candidate items")
        if self.user_token and count(self.user_id) != [1] * len(ids):
            raise RuntimeError("every prompt must hold exactly one user placeholder")

    def batch(
        self,
        histories: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
        targets: Sequence[int] | None = None,
        templates: Sequence[int] | None = None,
        pad_id: int = 0,
        max_history: int = 10,
        padding_side: str = "right",
    ) -> PromptBatch:
        """Prompts (plus answers when ``targets`` is given), padded into one batch.

        Training uses right padding (labels line up with the tokens); prompts that are continued —
        generation and candidate scoring — use left padding so that every row ends at its last token.
        """
        rows, labels = [], []
        for i, prompt in enumerate(self.prompts_ids(histories, candidates, templates)):
            answer = self.answer_ids(targets[i]) if targets is not None else []
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        kept = [list(h)[-max_history:] for h in histories]
        lengths = np.array([len(r) for r in rows])  # (B,)
        width = int(lengths.max())
        pos = np.arange(width)[None, :]  # (1, T)
        real = pos < lengths[:, None] if padding_side == "right" else pos >= (width - lengths)[:, None]  # (B, T)
        # boolean assignment fills row by row, left to right: each row's tokens land in its real span
        ids = np.full(real.shape, self.pad_id, dtype=np.int64)
        ids[real] = np.concatenate(rows)
        lab = np.full(real.shape, -100, dtype=np.int64)
        lab[real] = np.concatenate(labels)
        if self.hybrid:
            self._check_placeholders(ids, [len(h) for h in kept], [len(c) for c in candidates])
        hist = np.full((len(rows), max_history), pad_id, dtype=np.int64)
        hist[np.arange(max_history)[None, :] < np.array([len(h) for h in kept])[:, None]] = np.concatenate(
            [np.asarray(h, dtype=np.int64) for h in kept]
        )  # (B, L) right-padded
        ids, mask, lab, hist = (torch.from_numpy(a) for a in (ids, real.astype(np.int64), lab, hist))
        return PromptBatch(
            input_ids=ids,
            attention_mask=mask,
            labels=lab if targets is not None else None,
            history=hist,
            history_len=torch.tensor([min(len(h), max_history) for h in histories]),
            candidates=torch.tensor([list(c) for c in candidates], dtype=torch.long),
            candidates_listed=self.list_candidates,
        )


def add_placeholder_tokens(tokenizer, model=None) -> None:
    """Add ``[HistoryEmb]``/``[CansEmb]``/``[UserEmb]`` as special tokens (and grow the model's embeddings)."""
    missing = [t for t in (HISTORY_TOKEN, CANDIDATE_TOKEN, USER_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        old = model.get_input_embeddings().num_embeddings
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # The new rows are never read as inputs (placeholders are replaced), but an untied or tied output
        # layer scores them: set them to the mean row, deterministically, so reloads give identical logits.
        with torch.no_grad():
            for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
                emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
