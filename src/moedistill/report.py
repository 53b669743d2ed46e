"""The run report: ``report.md`` (tables) and PNG plots beside it.

Everything here formats numbers it is given; nothing is computed that a run did not
measure. ``gap_closed`` is the one derived figure:

    gap_closed = (ppl(checkpoint-0) - ppl(student)) / (ppl(checkpoint-0) - ppl(teacher))

1.0 means the student reached the teacher's perplexity; 0 means no recovery.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moedistill.files import atomic_path, atomic_write_text

COLUMNS = [
    ("parameters", "params", "{:,}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("agreement", "top-1 agreement", "{:.4f}"),
    ("kl_exact", "exact KL(teacher‖model)", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("gap_closed", "gap closed", "{:.1%}"),
]


def gap_closed(ppl_start: float, ppl_student: float, ppl_teacher: float) -> float:
    denom = ppl_start - ppl_teacher
    return float("nan") if denom == 0 else (ppl_start - ppl_student) / denom


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    sep = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(fmt, r.get(key)) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot_losses(curves: dict[str, list[dict]], boundaries: dict[str, list[tuple[int, str]]], path: Path) -> Path:
    """ce_loss and kl_loss over optimizer steps, one line per run, stage boundaries dashed."""
    import matplotlib  # lazy: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("ce_loss", "kl_loss")):
        for name, logs in curves.items():
            pts = [(r["step"], r[key]) for r in logs if key in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts), label=name, marker=".", lw=1)
        drawn = set()
        for name, bounds in boundaries.items():
            for step, stage in bounds:
                if step in drawn or step == 0:
                    continue
                drawn.add(step)
                ax.axvline(step, color="grey", ls="--", lw=0.8)
                ax.text(step, ax.get_ylim()[1], f" {stage}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_perplexity(rows: list[dict], path: Path) -> Path:
    import matplotlib  # lazy: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["name"] for r in rows]
    vals = [r["perplexity"] for r in rows]
    bars = ax.bar(names, vals, color=["#4c72b0", "#c44e52", "#8c8c8c", "#55a868", "#dd8452", "#8172b2"][: len(rows)])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(
    out_dir: str | Path,
    rows: list[dict],
    *,
    curves: dict[str, list[dict]] | None = None,
    boundaries: dict[str, list[tuple[int, str]]] | None = None,
    notes: list[str] | None = None,
    settings: dict | None = None,
) -> Path:
    """Write ``report.md``, ``report.json`` and the plots; return the markdown path.

    ``rows``: one dict per model with ``name`` and the metric keys of ``COLUMNS``; the rows
    named ``teacher`` and ``checkpoint-0`` anchor ``gap_closed`` for the others.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by = {r["name"]: r for r in rows}
    if "teacher" in by and "checkpoint-0" in by:
        t, c = by["teacher"]["perplexity"], by["checkpoint-0"]["perplexity"]
        for r in rows:
            if r["name"] not in ("teacher",):
                r["gap_closed"] = gap_closed(c, r["perplexity"], t)
    md = ["# moedistill report", "", "## Models on the validation split", "", markdown_table(rows), ""]
    md += ["`gap closed` = (ppl(checkpoint-0) − ppl(model)) / (ppl(checkpoint-0) − ppl(teacher)).", ""]
    md += ["![perplexity per model](perplexity.png)", ""]
    plot_perplexity(rows, out / "perplexity.png")
    if curves:
        plot_losses(curves, boundaries or {}, out / "losses.png")
        md += ["## Training curves", "",
               "ce_loss and kl_loss as logged by the trainer; dashed lines mark stage boundaries.",
               "", "![losses](losses.png)", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if settings:
        md += ["## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    report = {"models": rows, "settings": settings or {}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    return path
