"""``ilora export``: a self-contained copy of a finished run, to move it to another machine or share it.

The copy holds what ``eval`` and ``recommend`` read (adapter, projector, gate, encoder, item titles,
``ilora.json``, ``config.yaml``) plus the card, the pictures and the logs; never checkpoints or predictions.
With ``merge`` (K = 1 only: one LoRA needs no gate) the adapter is also merged into the backbone's weights and
saved as a plain Hugging Face causal-LM directory, ``merged/``, that loads without PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .home import RUN_CONTENTS, atomic_directory

# What a run directory holds that the copy keeps (missing optional entries are skipped); manifest.json holds the
# checksums that eval and recommend verify: the copied files are byte-identical.
KEEP = RUN_CONTENTS
REQUIRED = ("ilora.json", "adapter", "gate.safetensors", "encoder", "items.json")


@dataclass
class ExportConfig:
    run: str = ""  # run directory or name under $ILORA_HOME/runs
    output: Path | None = None  # the directory to write (must not exist unless overwrite)
    merge: bool = False  # K = 1: also write merged/, the backbone with the LoRA merged in
    overwrite: bool = False  # replace an existing output directory

    def validate(self) -> None:
        if not self.run:
            raise UserError("Pass --run RUN (a finished run's directory or name).")
        if self.output is None:
            raise UserError("Pass --output DIR (where to write the copy).")


def export(config: ExportConfig) -> dict[str, Any]:
    """Copy the run (and merge it when asked); returns what was written."""
    from .card import write_card
    from .evaluation.evaluate import resolve_run
    from .training.run import check_run_files, read_info, write_run_manifest

    config.validate()
    run_dir = resolve_run(config.run)
    info = read_info(run_dir)
    missing = [name for name in REQUIRED if not (run_dir / name).exists()]
    if missing:
        raise UserError(f"The run {run_dir} is incomplete (missing {', '.join(missing)}); it cannot be exported.")
    check_run_files(run_dir, info)  # a damaged run is refused, not copied under a fresh manifest
    if config.merge and info["experts"]["experts"] != 1:
        raise UserError(
            f"--merge needs a single LoRA (K = 1); {run_dir.name} has {info['experts']['experts']} experts "
            "mixed per user, which no fixed merged weight can reproduce."
        )
    output = Path(config.output).absolute()
    if output.resolve() == run_dir.resolve() or run_dir.resolve() in output.resolve().parents:
        raise UserError("--output must be outside the run directory.")
    link = first_link(run_dir)
    if link is not None:
        raise UserError(
            f"The run {run_dir} holds a symbolic link, {link.relative_to(run_dir)} -> {os.readlink(link)}; an export "
            "never follows links out of a run: remove it and export again."
        )
    with atomic_directory(output, overwrite=config.overwrite, kind="export") as tmp:
        for name in KEEP:
            src = run_dir / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("*.tmp", "tensorboard"))
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        if _portable_adapter_config(tmp / "adapter" / "adapter_config.json", info["backbone"]["name"]):
            write_run_manifest(tmp, info)  # the copy's own checksums
        if not (tmp / "README.md").is_file():
            write_card(tmp)
        if config.merge:
            merge_into_backbone(tmp, tmp / "merged")
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    return {"run": str(run_dir), "output": str(output), "merged": config.merge, "files": files}


def first_link(run_dir: Path) -> Path | None:
    """The first symbolic link among what an export copies (anywhere below it), or None. A link planted in a run
    would otherwise be followed and its target, anywhere on the machine, copied into the export."""
    for name in KEEP:
        top = run_dir / name
        if top.is_symlink():
            return top
        if top.is_dir():
            for folder, dirs, files in os.walk(top):  # os.walk does not descend into linked folders
                for entry in sorted(dirs + files):
                    if (Path(folder) / entry).is_symlink():
                        return Path(folder) / entry
    return None


def _portable_adapter_config(path: Path, backbone: str) -> bool:
    """Name the backbone as the user gave it (hub id, path or the built-in name), never a local cache path;
    whether the file had to change (runs of older versions recorded the cache path)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("base_model_name_or_path") == backbone:
        return False
    doc["base_model_name_or_path"] = backbone
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def merge_into_backbone(run_dir: Path, target: Path) -> None:
    """The backbone with the run's single LoRA merged in, saved with its tokenizer (placeholder tokens included)."""
    from .training.run import load_run

    run = load_run(run_dir, device="cpu", load_in_4bit=False)  # merged in full precision
    merged = run.model.llm.merge_and_unload()
    merged.save_pretrained(target)
    run.tokenizer.save_pretrained(target)
