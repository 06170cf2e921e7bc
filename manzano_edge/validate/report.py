"""Write a validation report: report.json (schema manzano-edge/validate@2), report.md, plots."""

from __future__ import annotations

import json
from pathlib import Path

from manzano_edge.fsutil import atomic_output_dir


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


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = [r for r in report["graphs"] if _graph_psnr(r) is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 3.6))
        labels = [f"{r['graph']}\n{r['format']}" for r in rows]
        values = [_graph_psnr(r) for r in rows]
        ax.bar(range(len(rows)), values, color=["tab:green" if r["passed"] else "tab:red" for r in rows])
        bars = sorted({c["bar"] for r in rows for c in r["checks"] if "PSNR" in c["name"]})
        for bar in bars:
            ax.axhline(bar, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=60)
        ax.set_ylabel("min output PSNR dB")
        ax.set_title(f"per-graph accuracy vs float, recipe {report['bundle']['recipe']}")
        fig.tight_layout()
        fig.savefig(out / "graphs_psnr.png", dpi=110)
        plt.close(fig)
        files.append("graphs_psnr.png")
    if report["end_to_end"]:
        keys = ["vqa_accuracy", "caption_accuracy", "shapes_eval"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        width = 0.8 / (1 + len(report["end_to_end"]))
        ax.bar([i for i in range(len(keys))], [report["end_to_end"][0]["float"][k] for k in keys], width,
               label="float")
        for j, r in enumerate(report["end_to_end"]):
            ax.bar([i + (j + 1) * width for i in range(len(keys))], [r["bundle"][k] for k in keys], width,
                   label=f"{r['format']} {r['recipe']}")
        ax.set_xticks([i + width * len(report["end_to_end"]) / 2 for i in range(len(keys))], keys)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("end to end, float vs bundle")
        fig.tight_layout()
        fig.savefig(out / "end_to_end.png", dpi=110)
        plt.close(fig)
        files.append("end_to_end.png")
    return files
