"""The compression report: what checkpoint-0 costs and how much it loses, before any training.

- parameters before/after (experts and the whole model) and the compression ratios;
- per layer and projection, the relative reconstruction error of the expert weights,
  ``sqrt(sum_i ||W_i - W^_i||^2) / sqrt(sum_i ||W_i||^2)``, and, when Gram matrices of
  the calibration inputs are at hand, the same on the routed inputs (the quantity the
  activation-aware SVD minimises): ``sqrt(sum_i tr(D_i G_i D_i^T)) / sqrt(sum_i tr(W_i G_i W_i^T))``;
- validation perplexity (and KL to / top-1 agreement with the teacher) of the teacher
  and checkpoint-0, and, for ``compress.report_ranks``, of every variant
  (mean|frequency core x plain|activation SVD) at each rank: a markdown table and a
  PNG plot of perplexity against the expert compression ratio.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from moedistill.compression.init import (
    DEFAULT_DAMPING,
    CalibrationStats,
    build_student,
    compression_record,
    expert_ratio,
    layer_errors,
    teacher_expert_weights,
)
from moedistill.compression.modeling_moedistill import PROJECTIONS, count_parameters, find_moe_blocks
from moedistill.evaluate import evaluate_model
from moedistill.files import atomic_path, atomic_write_text

VARIANTS = (("mean", "plain"), ("frequency", "plain"), ("mean", "activation"), ("frequency", "activation"))
REPORT_SEQUENCES = 32  # validation blocks for the report's perplexities: a few dozen keep a rank sweep fast


def parameter_counts(model: nn.Module) -> dict:
    """``{"total", "experts"}``: unique parameters, and those inside ``mlp.experts`` modules
    (per-expert ranks: the allocated components, without the zero padding)."""
    total = count_parameters(model)
    experts = total - sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    return {"total": total, "experts": experts}


@torch.no_grad()
def reconstruction_errors(teacher: nn.Module, student: nn.Module, stats: CalibrationStats | None = None) -> list[dict]:
    """Per MoE layer: relative weight error of each projection (and on the routed inputs, given Grams).

    ``layer_errors`` on the student's factors, a few experts at a time (``compress_layers``
    computes the same rows while each layer's Grams are in memory)."""
    rows = []
    t_blocks, s_blocks = find_moe_blocks(teacher), find_moe_blocks(student)
    for l, ((name, tb), (_, sb)) in enumerate(zip(t_blocks, s_blocks)):
        ex = sb.experts
        core = {p: ex.core(p) for p in PROJECTIONS}
        B = {p: ex.wrapper(p)[0] for p in PROJECTIONS}
        A = {p: ex.wrapper(p)[1] for p in PROJECTIONS}
        has = stats is not None and stats.has_gram
        rows.append({"layer": name, **layer_errors(teacher_expert_weights(tb.experts), core, B, A,
                                                   stats.gram_in[l] if has else None,
                                                   stats.gram_mid[l] if has else None)})
    return rows


def eval_summary(model, blocks, teacher=None, batch_size: int = 8, desc: str = "eval") -> dict:
    """Perplexity (and exact KL / agreement given the teacher) on packed blocks, via ``moedistill.evaluate``."""
    m = evaluate_model(model, blocks, teacher=teacher, batch_size=batch_size, desc=desc)
    return {k: m[k] for k in ("perplexity", "ce", "kl_exact", "agreement", "tokens") if k in m}


def build_report(
    teacher, student, eval_blocks, *, factors: dict, stats: CalibrationStats | None, report_ranks: list[int],
    batch_size: int, header: dict, checkpoint_0: dict, eval_info: dict,
    errors: dict | None = None, svd_check: list | None = None,
) -> dict:
    """The report of checkpoint-0 ``student`` and of every variant at ``report_ranks``.

    Args:
        factors: ``{(core, svd): LayerFactors list}`` at the largest rank needed (sliced per rank).
        header: ``teacher``, ``checkpoint``, ``settings`` (copied to the top of the report).
        checkpoint_0: ``rank``, ``core``, ``svd`` of the student, and ``rank_allocation`` and ``ranks``
            (per layer and expert; None for uniform) when allocated.
        eval_info: ``split``, ``sequences``, ``seq_len`` of ``eval_blocks``.
        errors: ``{(core, svd, rank): rows}`` from ``compress_layers`` (computed while the Grams
            were in memory); without it, ``reconstruction_errors`` from ``stats``.
        svd_check: ``compress_layers``' float32-vs-float64 rows, copied into the report.
    """
    errors = errors or {}
    teacher_eval = eval_summary(teacher, eval_blocks, batch_size=batch_size, desc="teacher")
    c0_eval = eval_summary(student, eval_blocks, teacher=teacher, batch_size=batch_size, desc="checkpoint-0")
    t_counts, s_counts = parameter_counts(teacher), parameter_counts(student)
    report = {
        **header,
        "parameters": {
            "teacher": t_counts,
            "student": s_counts,
            "expert_compression_ratio": s_counts["experts"] / t_counts["experts"],
            "model_compression_ratio": s_counts["total"] / t_counts["total"],
        },
        "teacher_eval": teacher_eval,
        "checkpoint_0": {**checkpoint_0, **c0_eval},
        # per-expert ranks: the errors of the student's own factors (those at the uniform rank are another model's)
        "reconstruction_error": (None if checkpoint_0.get("ranks") else
                                 errors.get((checkpoint_0["core"], checkpoint_0["svd"], checkpoint_0["rank"])))
        or reconstruction_errors(teacher, student, stats),
        "svd_vs_fp64": svd_check or [],
        "eval": eval_info,
        "sweep": [
            _sweep_row(teacher, factors[variant], variant, r, eval_blocks, stats, batch_size, errors.get((*variant, r)))
            for variant in (VARIANTS if report_ranks else [])
            for r in report_ranks
        ],
    }
    report["comparison"] = comparison(report["sweep"])
    return report


def _sweep_row(teacher, factors, variant: tuple[str, str], rank: int, eval_blocks, stats, batch_size: int,
               errs: list[dict] | None = None) -> dict:
    """One variant at one rank: built from the shared factors, evaluated, then dropped."""
    core, svd = variant
    ex = find_moe_blocks(teacher)[0][1].experts
    record = compression_record(teacher, rank, core=core, svd=svd, stats=stats, damping=DEFAULT_DAMPING)
    student = build_student(teacher, factors, rank, record)
    m = eval_summary(student, eval_blocks, teacher=teacher, batch_size=batch_size, desc=f"{core}+{svd} r={rank}")
    errs = errs or reconstruction_errors(teacher, student, stats)
    on_inputs = [e[k] for e in errs for k in e if k.endswith("_on_inputs")]
    return {
        "rank": rank, "core": core, "svd": svd,
        "expert_compression_ratio": expert_ratio(rank, ex.num_experts, ex.hidden_dim, ex.intermediate_dim),
        "weight_error": sum(e["mean"] for e in errs) / len(errs),
        "input_error": sum(on_inputs) / len(on_inputs) if on_inputs else None,
        **m,
    }


def comparison(sweep: list[dict]) -> list[dict]:
    """Per rank: each variant's perplexity minus that of mean+plain (negative = better than plain)."""
    out = []
    for r in sorted({row["rank"] for row in sweep}):
        at = {(row["core"], row["svd"]): row for row in sweep if row["rank"] == r}
        base = at.get(("mean", "plain"))
        if base is None:
            continue
        entry = {"rank": r, "mean+plain": base["perplexity"]}
        for (core, svd), row in at.items():
            if (core, svd) != ("mean", "plain"):
                entry[f"{core}+{svd} - mean+plain"] = row["perplexity"] - base["perplexity"]
        best = min(at.values(), key=lambda row: row["perplexity"])
        entry["best"] = f"{best['core']}+{best['svd']}"
        out.append(entry)
    return out


def markdown(report: dict) -> str:
    """The report as markdown: parameters, checkpoint-0, the sweep table, per-layer errors."""
    p = report["parameters"]
    c0 = report["checkpoint_0"]
    lines = [
        "# Compression report (zero-shot checkpoint-0)",
        "",
        f"teacher `{report['teacher']}` -> `{report['checkpoint']}`",
        "",
        "| | teacher | checkpoint-0 | ratio |",
        "|---|---:|---:|---:|",
        f"| expert parameters | {p['teacher']['experts']:,} | {p['student']['experts']:,} | "
        f"{p['expert_compression_ratio']:.4f} |",
        f"| all parameters | {p['teacher']['total']:,} | {p['student']['total']:,} | "
        f"{p['model_compression_ratio']:.4f} |",
        "",
        f"checkpoint-0: core={c0['core']}, svd={c0['svd']}, rank={c0['rank']}; "
        f"validation perplexity {c0['perplexity']:.3f} (teacher {report['teacher_eval']['perplexity']:.3f}), "
        f"exact KL to teacher {c0.get('kl_exact', float('nan')):.4f} nats/token, "
        f"top-1 agreement {c0.get('agreement', float('nan')):.3f} "
        f"({report['eval']['sequences']} sequences x {report['eval']['seq_len']} tokens of split "
        f"'{report['eval']['split']}')",
        "",
    ]
    if c0.get("ranks"):
        uniform = next((row for row in report["sweep"] if (row["core"], row["svd"], row["rank"])
                        == (c0["core"], c0["svd"], c0["rank"])), None)
        lines += [
            f"Ranks allocated by `{c0['rank_allocation']}` within the parameters of rank {c0['rank']} everywhere "
            f"(per MoE layer: each expert's rank)"
            + (f"; the same variant at uniform rank {c0['rank']}: perplexity {uniform['perplexity']:.3f}"
               if uniform else "") + ":",
            "",
            "| layer | ranks | min | mean | max |",
            "|---|---|---:|---:|---:|",
        ]
        for l, ranks in enumerate(c0["ranks"]):
            lines.append(f"| {l} | {' '.join(map(str, ranks))} | {min(ranks)} | {sum(ranks) / len(ranks):.2f} | "
                         f"{max(ranks)} |")
        lines.append("")
    if report.get("sweep"):
        lines += [
            f"## Validation perplexity by rank and variant (teacher: {report['teacher_eval']['perplexity']:.3f})",
            "",
            "| rank | expert ratio | " + " | ".join(f"{c}+{s}" for c, s in VARIANTS) + " | best |",
            "|---:|---:|" + "---:|" * len(VARIANTS) + "---|",
        ]
        for r in sorted({row["rank"] for row in report["sweep"]}):
            at = {(row["core"], row["svd"]): row for row in report["sweep"] if row["rank"] == r}
            ratio = next(iter(at.values()))["expert_compression_ratio"]
            cells = [f"{at[v]['perplexity']:.3f}" if v in at else "-" for v in VARIANTS]
            best = min(at.values(), key=lambda row: row["perplexity"])
            lines.append(f"| {r} | {ratio:.3f} | " + " | ".join(cells) + f" | {best['core']}+{best['svd']} |")
        others = [v for v in VARIANTS if v != ("mean", "plain")]
        lines += ["", "Perplexity change against mean+plain at the same rank (negative = better than plain):", ""]
        lines += ["| rank | " + " | ".join(f"{c}+{s}" for c, s in others) + " |", "|---:|" + "---:|" * len(others)]
        for entry in report.get("comparison", []):
            base = entry["mean+plain"]
            cells = []
            for c, sv in others:
                d = entry.get(f"{c}+{sv} - mean+plain")
                cells.append("-" if d is None else f"{d:+.3f} ({100 * d / base:+.1f}%)")
            lines.append(f"| {entry['rank']} | " + " | ".join(cells) + " |")
        for key, title, fmt in [
            ("kl_exact", "exact KL(teacher || checkpoint), nats/token", "{:.4f}"),
            ("weight_error", "relative weight error, mean over layers and projections", "{:.4f}"),
            ("input_error", "relative error on the routed calibration inputs, mean over layers and projections",
             "{:.4f}"),
        ]:
            lines += ["", f"{title}:", ""]
            lines += ["| rank | " + " | ".join(f"{c}+{s}" for c, s in VARIANTS) + " |",
                      "|---:|" + "---:|" * len(VARIANTS)]
            for r in sorted({row["rank"] for row in report["sweep"]}):
                at = {(row["core"], row["svd"]): row for row in report["sweep"] if row["rank"] == r}
                # max(0, .): a full-rank KL of -1e-9 is rounding, not a negative divergence
                cells = [fmt.format(max(0.0, at[v][key])) if v in at and at[v].get(key) is not None else "-"
                         for v in VARIANTS]
                lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Relative reconstruction error of the expert weights (checkpoint-0)",
        "",
        "| layer | gate | up | down | gate on inputs | up on inputs | down on inputs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if c0.get("ranks"):
        lines[-3:-3] = ["", "Per-expert ranks: the errors on the weights only (the calibration Grams are gone by "
                              "the time the ranks are chosen)."]
    for row in report["reconstruction_error"]:
        on = [f"{row[f'{p}_on_inputs']:.4f}" if f"{p}_on_inputs" in row else "-" for p in PROJECTIONS]
        lines.append(
            f"| {row['layer']} | {row['gate']:.4f} | {row['up']:.4f} | {row['down']:.4f} | " + " | ".join(on) + " |"
        )
    if report.get("svd_vs_fp64"):
        worst = max(report["svd_vs_fp64"], key=lambda r: abs(r["relative_difference"]))
        lines += [
            "",
            "Batched float32 SVD against the float64 `torch.linalg.svd` reference (one expert per layer and "
            f"projection, {len(report['svd_vs_fp64'])} checked): largest relative difference of the "
            f"reconstruction error {worst['relative_difference']:+.2e} ({worst['layer']}, {worst['projection']}, "
            f"expert {worst['expert']}: {worst['error_fp32']:.6f} vs {worst['error_fp64']:.6f}).",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """PNG: perplexity and KL vs expert compression ratio per variant; per-layer reconstruction error."""
    import matplotlib  # lazy: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    teacher_ppl = report["teacher_eval"]["perplexity"]
    c0 = report["checkpoint_0"]
    c0_ratio = report["parameters"]["expert_compression_ratio"]
    for ax, key, label in ((ax1, "perplexity", "validation perplexity"),
                           (ax2, "kl_exact", "exact KL(teacher || student), nats/token")):
        for core, svd in VARIANTS:
            rows = sorted((r for r in report.get("sweep", []) if r["core"] == core and r["svd"] == svd),
                          key=lambda r: r["rank"])
            # log axes: leave out the exact (full-rank) points, whose KL is rounding noise
            rows = [r for r in rows if r.get(key) is not None and (key != "kl_exact" or r[key] > 1e-6)]
            if rows:
                ax.plot([r["expert_compression_ratio"] for r in rows], [r[key] for r in rows], "o-",
                        label=f"{core}+{svd}")
        if c0.get(key) is not None:
            ax.plot([c0_ratio], [c0[key]], "k*", ms=14, label="checkpoint-0")
        ax.set_xscale("log")
        ticks = sorted({round(r["expert_compression_ratio"], 3) for r in report.get("sweep", [])}
                       | {round(c0_ratio, 3)})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks], rotation=45, fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("expert parameters, student / teacher")
        ax.set_ylabel(label)
    ax1.axhline(teacher_ppl, color="gray", ls="--", label=f"teacher {teacher_ppl:.2f}")
    ax1.set_yscale("log")
    ax1.set_title("zero-shot perplexity vs compression")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title("zero-shot KL to the teacher vs compression")
    errs = report["reconstruction_error"]
    xs = range(len(errs))
    width = 0.25
    for j, p in enumerate(PROJECTIONS):
        pos = [x + (j - 1) * width for x in xs]
        ax3.bar(pos, [r[p] for r in errs], width, label=f"{p} (weights)")
        if f"{p}_on_inputs" in errs[0]:
            ax3.plot(pos, [r[f"{p}_on_inputs"] for r in errs], "kx", label="on routed inputs" if j == 0 else None)
    ax3.set_xticks(list(xs))
    ax3.set_xticklabels([r["layer"].replace("model.layers.", "L").replace(".mlp", "") for r in errs])
    ax3.set_ylabel("relative error")
    ax3.set_ylim(0, 1.35 * max(max(r[p] for p in PROJECTIONS) for r in errs) + 1e-9)
    ax3.set_title(f"checkpoint-0 experts (rank {c0['rank']}, {c0['core']}+{c0['svd']})")
    ax3.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``; print the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "png": out_dir / "report.png"}

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    atomic_write_text(paths["json"], json.dumps(clean(report), indent=2) + "\n")
    md = markdown(report)
    atomic_write_text(paths["markdown"], md)
    plot(report, paths["png"])
    print(md)
    print(f"[compress] report: {paths['json']}, {paths['markdown']}, {paths['png']}")
    return paths
