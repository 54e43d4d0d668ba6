"""The run directory: everything ``eval`` and ``recommend`` need, and nothing else.

ilora.json             backbone, experts, rank, gate, prompt, templates, objective, fusion weights, encoder and
                       dataset checksums
config.yaml            the resolved training config
adapter/               the PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
projector.safetensors  item-embedding projector (absent for text-only prompts)
user_projector.safetensors  the user representation's projector (only with ``user_token``)
gate.safetensors       gate (and per-token routers) weights
encoder/               a copy of the frozen collaborative encoder (safetensors + JSON)
items.json             item titles, so a run can recommend without the prepared dataset
logs/train.jsonl       one line per logged optimisation step
checkpoints/step-N/    resumable checkpoints (see checkpoint.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

RUN_FORMAT = 1


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def module_tensors(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    if module is None:
        return {}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def write_final(run_dir: Path, model, info: dict[str, Any]) -> None:
    """Write adapter, projector, gate and ilora.json; ilora.json goes last and marks the run complete."""
    run_dir = Path(run_dir)
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.llm.save_pretrained(tmp / "adapter", save_embedding_layers=False)
    if model.projector is not None:
        save_file(module_tensors(model.projector), tmp / "projector.safetensors")
    if model.user_projector is not None:
        save_file(module_tensors(model.user_projector), tmp / "user_projector.safetensors")
    gate = {f"gate.{k}": v for k, v in module_tensors(model.gate).items()}
    gate.update({f"token_routers.{k}": v for k, v in module_tensors(model.token_routers).items()})
    save_file(gate or {"gate.empty": torch.zeros(0)}, tmp / "gate.safetensors")
    for name in ("adapter", "projector.safetensors", "user_projector.safetensors", "gate.safetensors"):
        src, dst = tmp / name, run_dir / name
        if not src.exists():
            continue
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)
    doc = dict(info, format_version=RUN_FORMAT)
    part = run_dir / "ilora.json.tmp"
    part.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(part, run_dir / "ilora.json")


def read_info(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    f = run_dir / "ilora.json"
    if not f.is_file():
        raise UserError(f"{run_dir} is not a finished iLoRA run (no ilora.json); train it or resume it first.")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is not valid JSON.") from None
    if info.get("format_version", RUN_FORMAT) > RUN_FORMAT:
        raise UserError(f"{run_dir} was written by a newer version of ilora; upgrade to read it.")
    return info


@dataclass
class LoadedRun:
    model: Any  # ILoraModel
    tokenizer: Any
    builder: Any  # PromptBuilder
    info: dict[str, Any]
    titles: list[str]

    @property
    def normalize(self) -> str:
        """The candidate-score normalisation the run was trained with (runs that predate the key: sum)."""
        return self.info.get("normalize", "sum")

    @property
    def fusion(self) -> dict[str, float] | None:
        """``{"llm": a, "encoder": b}`` of the run's default ranking ``a · LLM + b · encoder``; None: the LLM's
        score alone."""
        fusion = self.info.get("fusion")
        return {"llm": float(fusion["llm"]), "encoder": float(fusion["encoder"])} if fusion else None


def load_run(run_dir: Path | str, device: str = "cpu", load_in_4bit: bool | None = None) -> LoadedRun:
    """Rebuild a trained run from its directory alone (plus the backbone it names)."""
    from peft import PeftModel

    from ..encoders.io import load_encoder
    from ..llm.backbone import BackboneSpec, load_backbone
    from ..llm.model import ExpertConfig, ILoraModel
    from ..llm.prompt import PromptBuilder

    run_dir = Path(run_dir)
    info = read_info(run_dir)
    encoder, enc_info = load_encoder(run_dir / "encoder", device=device)
    if file_sha256(run_dir / "encoder" / "encoder.safetensors") != info["encoder"]["sha256"]:
        raise UserError(f"The encoder copy in {run_dir} does not match the one the run was trained with.")
    bb = info["backbone"]
    spec = BackboneSpec(
        name=bb["name"],
        dtype=bb["dtype"],
        load_in_4bit=bb["load_in_4bit"] if load_in_4bit is None else load_in_4bit,
        device=device,
    )
    base, tokenizer = load_backbone(spec)
    llm = PeftModel.from_pretrained(base, run_dir / "adapter", is_trainable=False)
    cfg = ExpertConfig(**info["experts"])
    model = ILoraModel(llm, tokenizer, encoder, cfg, fusion=info.get("fusion"))
    if model.projector is not None:
        model.projector.load_state_dict(load_file(run_dir / "projector.safetensors"))
    if model.user_projector is not None:
        model.user_projector.load_state_dict(load_file(run_dir / "user_projector.safetensors"))
    gate = load_file(run_dir / "gate.safetensors")
    model.gate.load_state_dict({k[5:]: v for k, v in gate.items() if k.startswith("gate.") and k != "gate.empty"})
    if model.token_routers is not None:
        model.token_routers.load_state_dict({k[14:]: v for k, v in gate.items() if k.startswith("token_routers.")})
    model.to(device).eval()
    titles = json.loads((run_dir / "items.json").read_text(encoding="utf-8"))["titles"]
    builder = PromptBuilder(
        tokenizer,
        titles,
        info["dataset"]["domain"],
        hybrid=cfg.hybrid,
        templates=info.get("templates", "ilora-v1"),
        user_token=cfg.user_token,
    )
    return LoadedRun(model=model, tokenizer=tokenizer, builder=builder, info=info, titles=titles)
