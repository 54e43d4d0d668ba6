"""The settings of ``ilora train`` (:class:`TrainConfig`): every field with its default and a comment, and the
checks that refuse a bad combination with one sentence before anything is loaded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..config import check_minimums, check_range, check_seed
from ..data.holdout import Holdout
from ..devices import check_device
from ..errors import UserError
from ..home import check_name
from ..home import run_dir as named_run_dir
from ..llm.experts import GATE_TYPES
from ..llm.heads import HEAD_INITS, HEADS, QUERIES
from ..llm.prompt import TEMPLATE_SETS

PROJECTOR_NORMS = ("none", "token")
LABELS = ("next", "encoder")

OBJECTIVES = ("rank", "generate")
PROMPTS = ("hybrid", "text")
FUSIONS = ("learned", "none")
REPORT_TO = ("none", "tensorboard", "wandb")
DEFAULT_ITEM_EPOCHS = 3.0  # the item head's default passes over its rows (docs/BENCHMARKS.md: the item head)
DEFAULT_DISTILL_WEIGHT = 0.0  # the rank objective's distillation weight (docs/BENCHMARKS.md: the measurement)
# The item head's defaults for the catalogue (docs/BENCHMARKS.md, *What recommend returns*): the query, the softmax
# and the users set apart for the fusion.
DEFAULT_ITEM_QUERY = "direct"
DEFAULT_ITEM_LOSS = "catalogue+candidates"
DEFAULT_APART_USERS = 0.2
LOSSES = ("candidates", "catalogue", "catalogue+candidates")
SAMPLINGS = ("uniform", "popularity")


@dataclass
class TrainConfig:
    dataset: str = "synthetic"  # prepared dataset name (or path)
    name: str | None = None  # run name under $ILORA_HOME/runs (default <dataset>-k<experts>)
    output: Path | None = None  # the run directory, instead of $ILORA_HOME/runs/<name>
    overwrite: bool = False  # replace an existing run directory
    resume: bool = False  # continue the run in the run directory from its newest checkpoint
    encoder: str | None = None  # encoder name or path (default <dataset>-sasrec, trained first if missing)
    holdout: str | None = None  # None: train on the rows the encoder left out (its holdout, data/holdout.py);
    # none: on every training row, those the encoder fitted included
    backbone: str | None = None  # HF directory or hub id; default: the built-in SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
    load_in_4bit: bool = False  # bitsandbytes NF4 backbone (QLoRA)
    device: str = "auto"  # auto, cpu, cuda
    experts: int = 4  # K LoRA experts (1 = plain LoRA: LLaRA with the hybrid prompt)
    rank: int = 16  # total LoRA rank, split into K experts of rank/K
    alpha: float = 32.0  # LoRA alpha
    lora_dropout: float = 0.05  # dropout on the LoRA input
    gate: str = "user"  # user (softmax(Linear(u))), mlp, prompt, token, uniform
    target_modules: str = "all-linear"  # which linear layers get LoRA (peft syntax; comma list allowed)
    prompt: str = "hybrid"  # hybrid (projected item embeddings in the prompt) or text (TALLRec-style)
    objective: str = "rank"  # rank (listwise over candidates) or generate (answer cross-entropy, title head)
    head: str | None = None  # item ((W h) · e_c of the encoder's item embeddings after a history-only prompt;
    # ranks the whole catalogue) or title (candidates listed, scored by their titles' likelihood: the paper's);
    # None: item for the rank objective, title for generate (llm/heads.py; docs/BENCHMARKS.md)
    query: str | None = None  # item head: residual (q = u + W h, u the encoder's user representation: the LLM's
    # ranking starts as the encoder's and moves by what it learns) or direct (q = W h); None: the default
    head_init: str | None = None  # item head W: fit (least squares onto the encoder's user representations of 256
    # training rows before the first step), random (std 0.02) or zeros; None: fit (direct), zeros (residual)
    head_lr: float | None = None  # item head learning rate (default: projector_lr)
    projector_norm: str = "none"  # none, or token: projected item/user vectors rescaled to the token norm
    normalize: str = "mean"  # candidate score: mean or sum of title token log-probs (rank objective, eval)
    templates: str = "compact"  # prompt template set: compact (a third fewer tokens, 0.6x the step time on
    # LastFM) or ilora-v1 (paraphrases with every history title; docs/BENCHMARKS.md)
    user_token: bool | None = None  # compact hybrid prompts end with the encoder's user representation
    # ([UserEmb]); None: with the item head (on hybrid, compact prompts), not with the title head
    distill_weight: float | None = None  # λ of the KL term towards the encoder's softmax over the candidates
    # (rank objective; None: the objective's default)
    distill_temperature: float = 1.0  # τ of that KL term (both softmaxes)
    fusion: str | None = None  # learned: rank by a·LLM score + b·encoder score, a and b trained from a=0, b=1
    # (rank objective); none: by the LLM's score alone; None: learned for rank, none for generate
    fusion_lr: float = 2e-2  # learning rate of the fusion weights a and b (apart_users=0: fitted on batches)
    apart_users: float | None = None  # fraction of the second stage's users set apart: the language model never
    # trains on their rows, the fusion weights are fitted on them after training and --keep-best chooses on them
    # (rows no stage below was fitted on); 0: none, the fusion is fitted on every training batch; None: 0.2 for the
    # rank objective (docs/BENCHMARKS.md, *What recommend returns*)
    loss_over: str | None = None  # the rank objective's softmax: candidates (the training prompt's), catalogue
    # (item head: every item, the row's history excluded, as recommend ranks) or catalogue+candidates (both
    # terms); None: catalogue+candidates for the item head, candidates for the title head
    negative_sampling: str = "uniform"  # training candidates' negatives: uniform, or popularity (drawn in
    # proportion to how often items are a training target, with the logQ correction in the softmax)
    label: str = "next"  # rank objective's target: next (the true next item) or encoder (the encoder's top-ranked
    # candidate of the same prompt: a diagnostic of whether the head can learn what the encoder's vectors say)
    hard_negatives: float = 0.0  # fraction of each training prompt's negatives drawn from the encoder's top items
    hard_pool: int = 100  # ... of its top this many items of the catalogue (history excluded)
    candidates: int = 20  # candidates in each training prompt
    lr: float = 5e-4  # LoRA learning rate
    projector_lr: float = 2e-3  # projector learning rate (high enough that it moves in short runs)
    gate_lr: float | None = None  # gate learning rate (default 0.3 x lr, as in the reference)
    weight_decay: float = 1e-5  # AdamW weight decay of projector and gate (LoRA: none)
    warmup_ratio: float = 0.05  # linear warm-up over this fraction of steps, then cosine
    min_lr_ratio: float = 0.01  # the cosine ends at lr x this
    batch_size: int = 8  # samples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimisation step
    max_grad_norm: float = 1.0  # gradient clipping
    epochs: float | None = None  # passes over the (possibly limited) training rows; None: 3 with the item head
    # (its steps are cheap and it still learns in the third), 1 with the title head
    max_steps: int | None = None  # exact number of optimisation steps (overrides epochs)
    max_train_samples: int | None = None  # train on a fixed, seeded subset of this many rows
    stop_after: int | None = None  # stop after this many steps with a checkpoint, to --resume later
    gradient_checkpointing: bool = False  # trade compute for memory
    checkpoint_every: int = 50  # checkpoint every N optimisation steps (and at the end)
    validate_every: int | None = None  # score the val rows every N steps (LLM alone, fused, encoder) into the log
    validate_at: list[int] | None = None  # ... and/or after exactly these steps (e.g. 8,16,32,64,128)
    validate_rows: int | None = None  # validate on the first N val rows only (None: all)
    validate_draws: int | None = None  # ... and the first N stored candidate draws (None: all)
    keep_best: bool = False  # keep the checkpoint of the best val MRR (default ranking) and finish the run with it
    log_every: int = 1  # log every N optimisation steps (logs/train.jsonl and the tracker)
    report_to: str = "none"  # none, tensorboard (files in logs/; pip install 'ilora[tensorboard]') or wandb
    seed: int = 42  # data order, candidates, templates, initialisation, dropout
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    quiet: bool = False  # no progress display

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"Unknown objective {self.objective!r}; choose rank or generate.")
        self._resolve_head_defaults()
        if self.gate not in GATE_TYPES:
            raise UserError(f"Unknown gate {self.gate!r}; choose one of: {', '.join(GATE_TYPES)}.")
        if self.normalize not in ("sum", "mean"):
            raise UserError(f"normalize must be sum or mean; got {self.normalize!r}.")
        if self.prompt not in PROMPTS:
            raise UserError(f"Unknown prompt {self.prompt!r}; choose hybrid or text.")
        if self.templates not in TEMPLATE_SETS:
            raise UserError(f"Unknown template set {self.templates!r}; choose one of: {', '.join(TEMPLATE_SETS)}.")
        self._check_head_settings()
        self._resolve_objective_defaults()
        if self.user_token and (self.prompt != "hybrid" or self.templates != "compact"):
            raise UserError("user_token needs the hybrid prompt and the compact templates (templates=compact).")
        if self.experts < 1 or self.rank < 1 or self.rank % self.experts:
            raise UserError(f"rank ({self.rank}) must be a positive multiple of experts ({self.experts}).")
        check_device(self.device)
        check_minimums(
            self,
            {
                "batch_size": 1,
                "grad_accum": 1,
                "candidates": 2,
                "checkpoint_every": 1,
                "log_every": 1,
                "max_steps": 1,
                "max_train_samples": 1,
                "stop_after": 1,
                "hard_pool": 2,
                "validate_every": 1,
                "validate_rows": 1,
                "validate_draws": 1,
                "threads": 1,
                "seed": 0,
            },
        )
        self._check_ranges()
        check_seed(self)
        if self.validate_at is not None and any(x < 1 for x in self.validate_at):
            raise UserError(f"validate_at lists optimisation steps, from 1; got {self.validate_at}.")
        if self.max_steps is not None:
            check_validate_at(self.validate_at, self.max_steps)
        if self.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--load-in-4bit needs bitsandbytes: pip install 'ilora[4bit]'.")
        if self.report_to not in REPORT_TO:
            raise UserError(f"report_to must be one of {', '.join(REPORT_TO)}; got {self.report_to!r}.")
        if self.keep_best and not (self.validate_every or self.validate_at):
            raise UserError("--keep-best compares validation results: also pass validate_every=N or validate_at=...")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one.")
        if self.name is not None:
            check_name(self.name, "run name")
        if self.holdout is not None:
            self.holdout = Holdout.parse(self.holdout).spec

    def _check_head_settings(self) -> None:
        """The head and what depends on it: its query, initialisation, softmax, negatives and label."""
        if self.head not in HEADS:
            raise UserError(f"Unknown head {self.head!r}; choose title or item.")
        if self.query not in QUERIES:
            raise UserError(f"Unknown query {self.query!r}; choose one of: {', '.join(QUERIES)}.")
        if self.query == "residual" and self.head != "item":
            raise UserError("query=residual forms the item head's query; it needs head=item.")
        if self.head_init not in HEAD_INITS:
            raise UserError(f"Unknown head_init {self.head_init!r}; choose one of: {', '.join(HEAD_INITS)}.")
        if self.query == "residual" and self.head_init == "fit":
            raise UserError(
                "head_init=fit maps the hidden state onto the encoder's user representation, which query=residual "
                "already adds; use head_init=zeros (the residual query's default) or random."
            )
        if self.projector_norm not in PROJECTOR_NORMS:
            raise UserError(f"projector_norm must be none or token; got {self.projector_norm!r}.")
        if self.loss_over not in LOSSES:
            raise UserError(f"loss_over must be one of {', '.join(LOSSES)}; got {self.loss_over!r}.")
        if self.loss_over != "candidates" and self.head != "item":
            raise UserError(f"loss_over={self.loss_over} scores every item, which only the item head does (head=item).")
        if self.negative_sampling not in SAMPLINGS:
            raise UserError(f"negative_sampling must be uniform or popularity; got {self.negative_sampling!r}.")
        if self.negative_sampling == "popularity" and self.hard_negatives > 0:
            raise UserError("negative_sampling=popularity and hard_negatives draw the same negatives; choose one.")
        if self.label not in LABELS:
            raise UserError(f"label must be next or encoder; got {self.label!r}.")
        if self.label != "next" and self.objective != "rank":
            raise UserError("label=encoder picks one of the candidates: it needs the rank objective.")
        if self.head == "item" and self.objective != "rank":
            raise UserError("The item head scores items, not text: it trains with the rank objective, not generate.")

    def _check_ranges(self) -> None:
        """Every number where it makes sense (NaN and infinities nowhere): one sentence for the first that does not."""
        for name in ("lr", "alpha", "epochs", "max_grad_norm", "distill_temperature"):
            check_range(self, name, low=0, low_open=True)
        for name in ("projector_lr", "gate_lr", "head_lr", "fusion_lr", "weight_decay", "distill_weight"):
            check_range(self, name, low=0)
        check_range(self, "apart_users", low=0, high=1, high_open=True)
        for name in ("warmup_ratio", "min_lr_ratio", "hard_negatives"):
            check_range(self, name, low=0, high=1)
        check_range(self, "lora_dropout", low=0, high=1, high_open=True)

    def _resolve_head_defaults(self) -> None:
        """Fill in the head and the settings whose default depends on it (user token, epochs)."""
        if self.head is None:
            self.head = "item" if self.objective == "rank" else "title"
        if self.user_token is None:
            self.user_token = self.head == "item" and self.prompt == "hybrid" and self.templates == "compact"
        if self.epochs is None:
            self.epochs = DEFAULT_ITEM_EPOCHS if self.head == "item" else 1.0
        item = self.head == "item"
        if self.query is None:
            self.query = DEFAULT_ITEM_QUERY if item else "direct"
        if self.head_init is None:
            self.head_init = "zeros" if self.query == "residual" else "fit"
        if self.loss_over is None:
            self.loss_over = DEFAULT_ITEM_LOSS if item else "candidates"
        if self.apart_users is None:
            self.apart_users = DEFAULT_APART_USERS if self.objective == "rank" else 0.0

    def _resolve_objective_defaults(self) -> None:
        """Fill in the settings whose default depends on the objective; refuse rank-only settings with generate."""
        rank = self.objective == "rank"
        if self.fusion is None:
            self.fusion = "learned" if rank else "none"
        if self.distill_weight is None:
            self.distill_weight = DEFAULT_DISTILL_WEIGHT if rank else 0.0
        if self.fusion not in FUSIONS:
            raise UserError(f"Unknown fusion {self.fusion!r}; choose learned or none.")
        if not self.distill_weight >= 0:
            raise UserError(f"distill_weight must be at least 0; got {self.distill_weight}.")
        if not rank and self.apart_users:
            raise UserError("apart_users sets rows apart for the rank objective's fusion and --keep-best; pass 0.")
        if not rank and (self.fusion != "none" or self.distill_weight > 0):
            raise UserError(
                "fusion=learned and distill_weight need candidate scores, which only the rank objective computes; "
                "with --objective generate pass fusion=none distill_weight=0."
            )

    def run_directory(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return named_run_dir(self.name or f"{Path(self.dataset).name}-k{self.experts}")


def check_validate_at(steps: list[int] | None, total_steps: int) -> None:
    """Refuse validation steps beyond the run's last step (they would never be validated, silently)."""
    beyond = sorted(x for x in steps or [] if x > total_steps)
    if beyond:
        listed = ", ".join(map(str, beyond[:4])) + (", ..." if len(beyond) > 4 else "")
        raise UserError(
            f"validate_at lists step{'s' if len(beyond) > 1 else ''} {listed} beyond the run's {total_steps} "
            f"optimisation step{'s' if total_steps > 1 else ''}; list steps from 1 to {total_steps}, or train longer."
        )
