"""The lines ``ilora train`` says about what it did: the fusion fitted on the users set apart, the catalogue check,
how long a run will take."""

from __future__ import annotations

from typing import Any

FEW_APART_ROWS = 50  # fewer rows set apart than this, and the fusion's line says its weights are uncertain


def below_note(check: dict[str, Any]) -> str:
    """The note of a run whose default ranking is below its own encoder on the val catalogue."""
    return (
        f"the default ranking is below the run's own encoder on the {check['split']} catalogue ({check['metric']} "
        f"{check['default']:.4f} against {check['encoder']:.4f}, p = {check['p_value']:.3g}): what recommend returns "
        "is ranked worse than the encoder alone would rank it; ilora.json, the card and recommend --json say so."
    )


def fusion_note(fit: dict[str, Any]) -> str:
    """The line that says what the fusion fitted on the rows set apart is, and how each ranking does there."""
    m = fit["metrics"]
    metric = "ndcg@10" if fit["over"] == "catalogue" else "mrr"
    weights = fit["weights"]
    fused = f"a = {weights['llm']:.3f}, b = {weights['encoder']:.3f}; " if weights else ""
    return (
        f"Fitted the fusion on the {fit['rows']} rows of the {fit['users']} users set apart ({fused}{metric} over the "
        f"{fit['over']} there: "
        + ", ".join(f"{name} {m[name][metric]:.3f}" for name in ("fused", "llm", "encoder") if name in m)
        + ")."
        + (
            f" {fit['rows']} rows are few for two weights: they may follow those users' noise (set more users apart "
            "with apart_users, or train on more rows)."
            if fit["rows"] < FEW_APART_ROWS
            else ""
        )
    )


def hours_or_minutes(seconds: float) -> str:
    """A duration as people say it in a progress note: "1.3 h" from an hour on, else "12 min"."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"
