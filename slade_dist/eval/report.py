"""Human-readable metrics table (printed by the eval stage and the pipeline). Test: tests/unit/test_report.py."""

from __future__ import annotations

from typing import Any

_ORDER = ["map_at_r", "r_precision", "precision_at_1", "nmi"]


def _columns(models: dict[str, dict[str, float]]) -> list[str]:
    """Known metrics in a fixed order, then Recall@K by K (counts such as n_queries are not shown)."""
    keys = {k for m in models.values() for k in m}
    recalls = sorted((k for k in keys if k.startswith("recall_at_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return [k for k in _ORDER if k in keys] + recalls


def format_table(results: dict[str, Any]) -> str:
    """Metrics in percent, one row per model, plus pseudo-label quality per round when present."""
    models: dict[str, dict[str, float]] = results.get("models", {})
    if not models:
        return "(no metrics)"
    cols = _columns(models)
    names = {"map_at_r": "MAP@R", "r_precision": "RP", "precision_at_1": "P@1", "nmi": "NMI"}
    head = ["model"] + [names.get(c, c.replace("recall_at_", "R@")) for c in cols]
    rows = [[m] + [f"{100 * v[c]:.2f}" if c in v else "-" for c in cols] for m, v in models.items()]
    width = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(width[0]) if i == 0 else x.rjust(width[i]) for i, x in enumerate(r))
    lines = [f"retrieval metrics ({results.get('protocol', 'self')}, %):", fmt(head), fmt(["-" * w for w in width])]
    lines += [fmt(r) for r in rows]
    pl = results.get("pseudo_labels") or {}
    if pl:
        lines.append(
            "pseudo labels: "
            + "; ".join(
                f"{r}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())
                for r, s in pl.items()
            )
        )
    return "\n".join(lines)
