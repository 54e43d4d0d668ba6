"""The run directory: everything ``eval`` and ``recommend`` need, and nothing else.

ilora.json             backbone, experts, rank, gate, prompt, templates, objective, fusion weights, encoder and
                       dataset checksums
config.yaml            the resolved training config
adapter/               the PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
projector.safetensors  item-embedding projector (absent for text-only prompts)
user_projector.safetensors  the user representation's projector (only with ``user_token``)
gate.safetensors       gate (and per-token routers) weights
head.safetensors       the item head's W (only with ``head=item``)
encoder/               a copy of the frozen collaborative encoder (safetensors + JSON)
items.json             item titles, so a run can recommend without the prepared dataset
logs/train.jsonl       one line per logged optimisation step
checkpoints/step-N/    resumable checkpoints (see checkpoint.py)
manifest.json          size and SHA-256 of the weights, titles and encoder copy; written last

Loading a run checks it before building anything: ilora.json against its schema, every file against the
manifest, and the saved tensors' shapes against what ilora.json claims (K, rank, gate, hybrid, user token),
so a damaged or edited run is refused with one sentence instead of a traceback or silently wrong scores.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..home import MANIFEST, disk_error, fsync_dir, fsync_tree, manifest_problem, write_manifest, write_text_durably

RUN_FORMAT = 1


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def module_tensors(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    if module is None:
        return {}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


# The files a finished run is made of (those present), as the manifest lists them. ilora.json is checked
# against its schema and the tensors instead, so that its backbone path may be edited when a backbone moves.
RUN_FILES = (
    "items.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "projector.safetensors",
    "user_projector.safetensors",
    "gate.safetensors",
    "head.safetensors",
    "encoder/encoder.json",
    "encoder/encoder.safetensors",
)


# The parts of ilora.json that decide a run's ranking (K, the head, the fusion weights or their absence, ...): the
# manifest records their checksum, so that an edit of them is refused like an edit of the weights.
RANKING_KEYS = ("experts", "fusion", "normalize", "prompt", "templates", "dataset")
MAX_FUSION_WEIGHT = 1e6  # |a|, |b|: trained weights stay within a few units; 1e308 made every score NaN


def ranking_sha256(info: dict[str, Any]) -> str:
    """The SHA-256 of the settings of ``info`` (an ``ilora.json`` document) that decide the run's ranking."""
    doc = {k: info.get(k) for k in RANKING_KEYS} | {"encoder": info.get("encoder", {}).get("sha256")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, allow_nan=True).encode()).hexdigest()


def write_run_manifest(run_dir: Path, info: dict[str, Any]) -> None:
    """The run's manifest: its files, and the checksum of the ranking settings of ``info``."""
    files = [f for f in RUN_FILES if (Path(run_dir) / f).is_file()]
    write_manifest(run_dir, files, extra={"ranking_sha256": ranking_sha256(info)})


def write_final(run_dir: Path, model, info: dict[str, Any]) -> None:
    """Write adapter, projector, gate and ilora.json, then the manifest, which marks the run complete."""
    try:
        _write_final(Path(run_dir), model, info)
    except (OSError, SafetensorError) as exc:
        reason = disk_error(exc)
        if reason is None:
            raise
        shutil.rmtree(Path(run_dir) / ".final.tmp", ignore_errors=True)
        raise UserError(
            f"Could not write the finished run to {run_dir} ({reason}); its checkpoints are intact: "
            "free some space and pass --resume."
        ) from None


def _write_final(run_dir: Path, model, info: dict[str, Any]) -> None:
    (run_dir / MANIFEST).unlink(missing_ok=True)  # a resumed run that is written again is not complete meanwhile
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
    if model.item_head is not None:
        save_file(module_tensors(model.item_head), tmp / "head.safetensors")
    fsync_tree(tmp)
    for name in (
        "adapter",
        "projector.safetensors",
        "user_projector.safetensors",
        "gate.safetensors",
        "head.safetensors",
    ):
        src, dst = tmp / name, run_dir / name
        if not src.exists():
            continue
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(run_dir)
    doc = dict(info, format_version=RUN_FORMAT, manifest=MANIFEST)
    write_text_durably(run_dir / "ilora.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    write_run_manifest(run_dir, doc)


def replace_run(new: Path, target: Path) -> None:
    """Move the finished run ``new`` to ``target``, replacing the run there (which stays until this moment)."""
    new, target = Path(new), Path(target)
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(trash, ignore_errors=True)


# -- reading and checking a run -----------------------------------------------------------------------------

_NUMBER = (int, float)
# ilora.json: section -> key -> accepted types; keys marked optional may be absent (runs of older versions).
_SCHEMA: dict[str, dict[str, tuple]] = {
    "backbone": {"name": (str,), "dtype": (str,), "load_in_4bit": (bool,)},
    "experts": {
        "experts": (int,),
        "rank": (int,),
        "alpha": _NUMBER,
        "dropout": _NUMBER,
        "gate": (str,),
        "target_modules": (str, list),
        "hybrid": (bool,),
        "user_token": (bool,),
        "head": (str,),
        "projector_norm": (str,),
        "query": (str,),
    },
    "encoder": {"sha256": (str,)},
    "dataset": {
        "name": (str,),
        "checksum": (str,),
        "n_items": (int,),
        "domain": (str,),
        "max_history": (int,),
        "pad_id": (int,),
    },
}
_OPTIONAL = {("experts", "user_token"), ("experts", "head"), ("experts", "projector_norm"), ("experts", "query")}


def _type_ok(value: Any, types: tuple) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number here
    return isinstance(value, types)


def schema_problem(info: Any) -> str | None:
    """What is wrong with an ``ilora.json`` document (a missing key, a wrong type, a value out of range)."""
    from ..llm.experts import GATE_TYPES
    from ..llm.heads import HEADS, QUERIES

    if not isinstance(info, dict):
        return "ilora.json is not a JSON object"
    for section, keys in _SCHEMA.items():
        part = info.get(section)
        if not isinstance(part, dict):
            return f"ilora.json has no {section!r} section"
        for key, types in keys.items():
            if key not in part:
                if (section, key) in _OPTIONAL:
                    continue
                return f"ilora.json has no {section}.{key}"
            if not _type_ok(part[key], types):
                return f"ilora.json's {section}.{key} has the wrong type ({type(part[key]).__name__})"
        if section == "experts" and set(part) - set(keys):
            return f"ilora.json's experts section has an unknown key {sorted(set(part) - set(keys))[0]!r}"
    ex, ds = info["experts"], info["dataset"]
    if ex["experts"] < 1 or ex["rank"] < 1 or ex["rank"] % ex["experts"]:
        return f"ilora.json's rank {ex['rank']} is not a positive multiple of its {ex['experts']} experts"
    if ex["gate"] not in GATE_TYPES:
        return f"ilora.json names an unknown gate {ex['gate']!r}"
    if ex.get("head", "title") not in HEADS:
        return f"ilora.json names an unknown head {ex['head']!r}"
    if ex.get("projector_norm", "none") not in ("none", "token"):
        return f"ilora.json names an unknown projector_norm {ex['projector_norm']!r}"
    if ex.get("query", "direct") not in QUERIES or (ex.get("query") == "residual" and ex.get("head") != "item"):
        return f"ilora.json names a query {ex['query']!r} that its head cannot form"
    if ds["n_items"] < 1 or ds["pad_id"] != ds["n_items"] or ds["max_history"] < 1:
        return "ilora.json's dataset sizes are inconsistent"
    fusion = info.get("fusion")
    if fusion is not None and not (
        isinstance(fusion, dict)
        and all(_type_ok(fusion.get(k), _NUMBER) and abs(fusion[k]) <= MAX_FUSION_WEIGHT for k in ("llm", "encoder"))
    ):  # abs(NaN) <= x is False: NaN is refused too
        return f"ilora.json's fusion is not a pair of finite weights of at most {MAX_FUSION_WEIGHT:g} in size"
    fitted = info.get("fusion_fit")
    if fusion is None and isinstance(fitted, dict) and fitted.get("on", "none") != "none":
        return "ilora.json has no fusion although its fusion_fit says the run was trained with one"
    if info.get("normalize", "sum") not in ("sum", "mean"):
        return f"ilora.json names an unknown normalisation {info.get('normalize')!r}"
    return None


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file, read from its header (no data loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path.parent, f"{path.name} is not a readable safetensors file ({exc})") from None


def _damaged(run_dir: Path, problem: str) -> UserError:
    return UserError(f"The run {run_dir} is damaged or was edited ({problem}); train it again or restore a copy.")


def _ranking_problem(run_dir: Path, info: dict[str, Any]) -> str | None:
    """Whether ilora.json's ranking settings differ from those the manifest recorded (manifests of older versions
    record none: their runs are checked by the schema and the tensors only)."""
    recorded = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8")).get("ranking_sha256")
    if recorded is not None and recorded != ranking_sha256(info):
        return (
            "the settings in ilora.json that decide its ranking (the experts and head, the fusion weights or their "
            "absence, the normalisation, the prompt or the dataset) differ from those it was written with"
        )
    return None


def check_run_files(run_dir: Path, info: dict[str, Any]) -> None:
    """The files against the manifest, and the saved tensors' shapes against what ilora.json claims."""
    run_dir = Path(run_dir)
    if info.get("manifest") is not None or (run_dir / MANIFEST).exists():
        problem = manifest_problem(run_dir) or _ranking_problem(run_dir, info)
        if problem is not None:
            raise _damaged(run_dir, problem)
    ex = info["experts"]
    k, rank, hybrid, user_token = ex["experts"], ex["rank"], ex["hybrid"], ex.get("user_token", False)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "gate.safetensors", "items.json"):
        if not (run_dir / name).is_file():
            raise _damaged(run_dir, f"{name} is missing")
    item_head = ex.get("head", "title") == "item"
    wanted_files = (
        ("projector.safetensors", hybrid),
        ("user_projector.safetensors", hybrid and user_token),
        ("head.safetensors", item_head),
    )
    for name, wanted in wanted_files:
        if (run_dir / name).is_file() != wanted:
            says = f"hybrid={hybrid}, user_token={user_token}, head={ex.get('head', 'title')}"
            raise _damaged(run_dir, f"{name} is {'missing' if wanted else 'present'} although ilora.json says {says}")
    try:
        adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        r, alpha = adapter["r"], adapter["lora_alpha"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise _damaged(run_dir, "adapter/adapter_config.json is not a LoRA adapter config") from None
    if r != rank or alpha != ex["alpha"]:
        raise _damaged(run_dir, f"the adapter has rank {r} and alpha {alpha}, ilora.json {rank} and {ex['alpha']}")
    lora = _shapes(run_dir / "adapter" / "adapter_model.safetensors")
    bad = [n for n, s in lora.items() if ("lora_A" in n and s[0] != rank) or ("lora_B" in n and s[-1] != rank)]
    if not lora or bad:
        raise _damaged(run_dir, f"the adapter's tensors do not have rank {rank}")
    gate = _shapes(run_dir / "gate.safetensors")
    kind = "uniform" if k == 1 else ex["gate"]
    heads = {
        "user": ["gate.net.weight"],
        "prompt": ["gate.net.weight"],
        "mlp": ["gate.net.2.weight"],
        "token": [n for n in gate if n.startswith("token_routers.") and n.endswith(".weight")],
        "uniform": [],
    }[kind]
    others = {n for n in gate if n.startswith("gate.net.")} if kind in ("uniform", "token") else set()
    if (kind != "uniform" and not heads) or others or any(gate.get(n, (None,))[0] != k for n in heads):
        raise _damaged(run_dir, f"gate.safetensors does not hold a {kind} gate over {k} experts")
    try:
        items = json.loads((run_dir / "items.json").read_text(encoding="utf-8"))
        titles = items["titles"]
        ok = isinstance(titles, list) and all(isinstance(t, str) for t in titles)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        ok = False
    if not ok or len(titles) != info["dataset"]["n_items"]:
        raise _damaged(run_dir, f"items.json does not list the {info['dataset']['n_items']} item titles")
    if item_head:
        shape = _shapes(run_dir / "head.safetensors").get("proj.weight")
        if shape is None or len(shape) != 2:
            raise _damaged(run_dir, "head.safetensors does not hold the item head's proj.weight")


def read_info(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    f = run_dir / "ilora.json"
    if not f.is_file():
        raise UserError(f"{run_dir} is not a finished iLoRA run (no ilora.json); train it or resume it first.")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise _damaged(run_dir, "ilora.json is not valid JSON") from None
    version = info.get("format_version", RUN_FORMAT) if isinstance(info, dict) else RUN_FORMAT
    if not isinstance(version, int) or version > RUN_FORMAT:
        raise UserError(f"{run_dir} was written by a newer version of ilora; upgrade to read it.")
    problem = schema_problem(info)
    if problem is not None:
        raise _damaged(run_dir, problem)
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
    def head(self) -> str:
        """The run's scoring head: title (runs that predate the key) or item."""
        return self.info.get("experts", {}).get("head", "title")

    @property
    def scorer(self):
        from ..llm.heads import scorer

        return scorer(self.head)

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
    check_run_files(run_dir, info)
    encoder, enc_info = load_encoder(run_dir / "encoder", device=device)
    if file_sha256(run_dir / "encoder" / "encoder.safetensors") != info["encoder"]["sha256"]:
        raise UserError(f"The encoder copy in {run_dir} does not match the one the run was trained with.")
    if int(enc_info["n_items"]) != info["dataset"]["n_items"]:
        raise _damaged(run_dir, "the encoder's item count differs from the dataset's")
    bb = info["backbone"]
    spec = BackboneSpec(
        name=bb["name"],
        dtype=bb["dtype"],
        load_in_4bit=bb["load_in_4bit"] if load_in_4bit is None else load_in_4bit,
        device=device,
    )
    base, tokenizer = load_backbone(spec)
    cfg = ExpertConfig(**info["experts"])
    try:
        llm = PeftModel.from_pretrained(base, run_dir / "adapter", is_trainable=False)
        model = ILoraModel(llm, tokenizer, encoder, cfg, fusion=info.get("fusion"))
        if model.projector is not None:
            model.projector.load_state_dict(load_file(run_dir / "projector.safetensors"))
        if model.user_projector is not None:
            model.user_projector.load_state_dict(load_file(run_dir / "user_projector.safetensors"))
        gate = load_file(run_dir / "gate.safetensors")
        model.gate.load_state_dict({k[5:]: v for k, v in gate.items() if k.startswith("gate.") and k != "gate.empty"})
        if model.token_routers is not None:
            model.token_routers.load_state_dict({k[14:]: v for k, v in gate.items() if k.startswith("token_routers.")})
        if model.item_head is not None:
            model.item_head.load_state_dict(load_file(run_dir / "head.safetensors"))
    except (RuntimeError, ValueError, KeyError, SafetensorError) as exc:
        # what the checks above cannot see: a run of an older version without a manifest, edited by hand
        raise _damaged(run_dir, f"its weights do not fit the model ({str(exc).splitlines()[0][:200]})") from None
    model.to(device).eval()
    titles = json.loads((run_dir / "items.json").read_text(encoding="utf-8"))["titles"]
    builder = PromptBuilder(
        tokenizer,
        titles,
        info["dataset"]["domain"],
        hybrid=cfg.hybrid,
        templates=info.get("templates", "ilora-v1"),
        user_token=cfg.user_token,
        list_candidates=cfg.head != "item",
    )
    return LoadedRun(model=model, tokenizer=tokenizer, builder=builder, info=info, titles=titles)
