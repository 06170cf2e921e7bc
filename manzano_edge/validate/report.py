"""Write a validation report: report.json (schema manzano-edge/validate@2), report.md, plots."""

from __future__ import annotations

import json
from pathlib import Path

from manzano_edge.fsutil import atomic_output_dir
from manzano_edge.metrics import EXACT_DB


def write_report(report: dict, out: str | Path, overwrite: bool = False) -> Path:
    """All files appear together or not at all (temp directory, renamed at the end)."""
    out = Path(out)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        plots = plot(report, tmp)
        (tmp / "report.md").write_text(markdown(report, plots))
    return out


def format_value(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _graph_psnr(row: dict) -> float | None:
    values = [m["psnr_db"] for m in row["metrics"].values() if isinstance(m, dict) and m.get("psnr_db") is not None]
    return min(values) if values else None


def failed_checks(report: dict) -> list[tuple[str, str, dict]]:
    """(graph or "end to end", format, check) for every check that missed its bar."""
    return [(r.get("graph", "end to end"), r["format"], c) for r in report["graphs"] + report["end_to_end"]
            for c in r["checks"] if not c["passed"]]


def _top1(tf: dict) -> str:
    """'decisive (n) / all (n)': the gated agreement first, then every position."""
    if not tf:
        return "–"
    return (f"{format_value(tf['decisive_top1_agreement'], 4)} ({tf['decisive_positions']}) / "
            f"{format_value(tf['top1_agreement'], 4)} ({tf['positions']})")


def markdown(report: dict, plots: list[str]) -> str:
    b = report["bundle"]
    lines = [f"# Validation report: `{b['recipe']}` bundle", "",
             f"- bundle: `{b['path']}`", f"- reference: {report['reference']['checkpoint']}",
             f"- result: **{'PASS' if report['passed'] else 'FAIL'}**", ""]
    for note in report["notes"]:
        lines.append(f"> **Note.** {note}")
        lines.append("")
    lines += ["## Per graph", "",
              "| graph | format | recipe | verified by | min PSNR dB | cosine | SQNR dB | ids agree | "
              "top-1 decisive / all | KL | greedy exact | size MB | pass |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["graphs"]:
        floats = [m for m in r["metrics"].values() if isinstance(m, dict) and "psnr_db" in m]
        ids = [m["agreement"] for m in r["metrics"].values() if isinstance(m, dict) and "agreement" in m]
        tf, gr = r["metrics"].get("teacher_forcing", {}), r["metrics"].get("greedy", {})
        lines.append(f"| {r['graph']} | {r['format']} | {r['recipe']} | {r['verified_by']} | {format_value(_graph_psnr(r))} | "
                     f"{format_value(min((m['cosine'] for m in floats), default=None), 5)} | "
                     f"{format_value(min((m['sqnr_db'] for m in floats), default=None))} | "
                     f"{format_value(min(ids, default=None), 3)} | {_top1(tf)} | "
                     f"{format_value(tf.get('kl'), 5)} | {format_value(gr.get('exact_match'), 2)} | {r['bytes'] / 1e6:.2f} | "
                     f"{'yes' if r['passed'] else '**no**'} |")
    if report["end_to_end"]:
        lines += ["", "## End to end (float reference vs bundle, same prompts and seeds)", "",
                  "| format | metric | float | bundle | drop (points) |", "|---|---|---|---|---|"]
        for r in report["end_to_end"]:
            for k in ("vqa_accuracy", "caption_accuracy", "understanding_accuracy", "shapes_eval"):
                drop = r["drop_points"].get(k)
                lines.append(f"| {r['format']} | {k} | {r['float'][k]:.3f} | {r['bundle'][k]:.3f} | {format_value(drop)} |")
            im = r["image_vs_float"]
            lines.append(f"| {r['format']} | image PSNR dB / SSIM vs float (same tokens, seed) | – | "
                         f"{format_value(im['psnr_db'])} / {format_value(im['ssim'], 4)} | |")
    lines += ["", "## Failed checks", ""]
    lines += [f"- {g} / {f}: {c['name']} = {format_value(c['value'], 4)} (bar {c['bar']})"
              for g, f, c in failed_checks(report)] or ["none"]
    lines += ["", "## Thresholds", "", "```json", json.dumps(report["thresholds"], indent=2), "```", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


PSNR_AXIS_MIN_DB = 70.0  # the PSNR axis shows at least 0..70 dB; higher values are drawn capped and labelled


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = [r for r in report["graphs"] if _graph_psnr(r) is not None]
    if rows:
        _plot_psnr(plt, rows, report["bundle"]["recipe"], out / "graphs_psnr.png")
        files.append("graphs_psnr.png")
    if report["end_to_end"]:
        _plot_e2e(plt, report["end_to_end"], out / "end_to_end.png")
        files.append("end_to_end.png")
    return files


def _plot_psnr(plt, rows: list[dict], recipe: str, path: Path) -> None:
    """Min output PSNR per graph x format against its bar. The axis stops at the larger of 70 dB
    and the highest bar + 20 dB, so the 30-60 dB range where bars are met or missed stays readable;
    a value above it (an exact match is 200 dB) is drawn to the cap, hatched, and labelled."""
    from matplotlib.patches import Patch

    values = [_graph_psnr(r) for r in rows]
    bars = sorted({c["bar"] for r in rows for c in r["checks"] if "PSNR" in c["name"]})
    cap = max(PSNR_AXIS_MIN_DB, max(bars, default=0.0) + 20.0)
    fig, ax = plt.subplots(figsize=(max(6.5, len(rows) * 0.75), 4.2))
    colors = ["tab:green" if r["passed"] else "tab:red" for r in rows]
    drawn = [min(v, cap) for v in values]
    patches = ax.bar(range(len(rows)), drawn, color=colors)
    for patch, v in zip(patches, values):
        if v > cap:
            patch.set_hatch("//")
            patch.set_edgecolor("white")
        text = "exact" if v >= EXACT_DB else (f"{v:.0f}" if v > cap else f"{v:.1f}")
        ax.annotate(text, (patch.get_x() + patch.get_width() / 2, min(v, cap)), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"})
    for bar in bars:
        ax.axhline(bar, color="black", linestyle="--", linewidth=0.9)
        ax.annotate(f"bar {bar:g} dB", (1.0, bar), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", ha="left", fontsize=8)
    ax.set_ylim(0, cap * 1.1)
    ax.set_xticks(range(len(rows)), [f"{r['graph']}\n{r['format']}" for r in rows], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("min output PSNR vs float, dB")
    ax.set_title(f"per-graph accuracy vs float, recipe {recipe}")
    legend = [Patch(color="tab:green", label="meets its bar"), Patch(color="tab:red", label="misses its bar")]
    if any(v > cap for v in values):
        legend.append(Patch(facecolor="grey", hatch="//", edgecolor="white",
                            label=f"above {cap:g} dB, drawn capped ('exact' = identical output)"))
    fig.tight_layout()  # before the legend: it goes right of the axes, and the saved canvas grows to hold it
    ax.legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.1, 1.0), borderaxespad=0.0,
              frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_e2e(plt, e2e: list[dict], path: Path) -> None:
    """Accuracy drop (points, float minus bundle) of each checked metric, one marker per format,
    against the metric's bar (dashed, labelled); below the bar passes."""
    metrics = list(dict.fromkeys(k for r in e2e for k in r["drop_points"]))
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 * len(metrics)), 3.8))
    offsets = [(j - (len(e2e) - 1) / 2) * 0.18 for j in range(len(e2e))]
    for j, r in enumerate(e2e):
        xs = [i + offsets[j] for i, k in enumerate(metrics) if k in r["drop_points"]]
        ys = [r["drop_points"][k] for k in metrics if k in r["drop_points"]]
        failed = {c["name"].split(" ")[0] for c in r["checks"] if not c["passed"]}
        ax.scatter(xs, ys, s=46, zorder=3, label=f"{r['format']} {r['recipe']}",
                   edgecolors=["red" if k in failed else "black" for k in metrics if k in r["drop_points"]],
                   linewidths=[2.0 if k in failed else 0.6 for k in metrics if k in r["drop_points"]])
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:+.1f}", (x, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
    bars: dict[float, list[int]] = {}
    for i, k in enumerate(metrics):
        for r in e2e:
            bars.setdefault(next((c["bar"] for c in r["checks"] if c["name"].startswith(f"{k} ")), None), []).append(i)
    for bar, idx in bars.items():
        if bar is None:
            continue
        for i in sorted(set(idx)):
            ax.hlines(bar, i - 0.4, i + 0.4, colors="black", linestyles="--", linewidth=0.9)
        ax.annotate(f"bar {bar:g} pt", (max(idx) + 0.4, bar), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.6)
    ys = [v for r in e2e for v in r["drop_points"].values()] + [b for b in bars if b is not None]
    lo, hi = min(ys + [0.0]), max(ys + [0.0])
    pad = max(0.5, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(-0.6, len(metrics) - 0.4 + 0.35)
    ax.set_xticks(range(len(metrics)), [k.replace("_", " ") for k in metrics], fontsize=8)
    ax.set_ylabel("drop vs float, accuracy points\n(lower is better; < 0: bundle better)", fontsize=8)
    ax.set_title("end to end: accuracy drop of the bundle vs float")
    fig.tight_layout()  # before the legend, which goes outside the axes (the saved canvas grows to hold it)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
              title="format recipe\n(red edge: misses its bar)", title_fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
