"""The report: report.json (every number), one PNG per suite, report.html (self-contained), a Rich table.

The output folder is written as a whole into a temporary folder and renamed into place, so a
crash never leaves half a report.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

from plural.store.paths import atomic_dir, write_json_atomic


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "suite"


def flag(diff: dict[str, Any]) -> str:
    """▲ significantly better, ▼ significantly worse than the reference, '' when the interval includes 0."""
    if not diff.get("significant"):
        return ""
    return "▲" if diff["better"] else "▼"


def plot_suite(suite: dict[str, Any], variants: list[str]) -> bytes | None:
    """Grouped bars (one group per metric, one bar per variant) with 95% intervals, as PNG bytes."""
    if not suite["metrics"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [m["name"] for m in suite["metrics"]]
    x = np.arange(len(names))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) * max(1, len(variants)) * 0.45 + 2), 3.6), dpi=100)
    for j, v in enumerate(variants):
        vals = np.array([m["values"][v]["value"] for m in suite["metrics"]])
        lo = np.array([m["values"][v]["lo"] for m in suite["metrics"]])
        hi = np.array([m["values"][v]["hi"] for m in suite["metrics"]])
        ax.bar(x + (j - (len(variants) - 1) / 2) * width, vals, width, label=v,
               yerr=np.vstack([vals - lo, hi - vals]), capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    arrows = ", ".join(f"{m['name']} {'↑' if m['higher_is_better'] else '↓'}" for m in suite["metrics"] if "/" not in m["name"])
    ax.set_title(f"{suite['name']} ({suite['kind']}) — better: {arrows}; bars: 95% bootstrap CI", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(variants)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict[str, Any], out_dir: Path, overwrite: bool = False) -> Path:
    """report.json, <suite>.png and report.html in `out_dir` (written atomically)."""
    variants = [v["name"] for v in report["variants"]]
    pngs: dict[str, bytes] = {}
    for s in report["suites"]:
        png = plot_suite(s, variants)
        if png is not None:
            pngs[s["name"]] = png
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        for s in report["suites"]:
            if s["name"] in pngs:
                fname = f"{_slug(s['name'])}.png"
                (tmp / fname).write_bytes(pngs[s["name"]])
                s["plot"] = fname
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.html").write_text(render_html(report, pngs), encoding="utf-8")
    return Path(out_dir)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.up{color:#0a7d32;font-weight:600}.down{color:#b3261e;font-weight:600}.ci{color:#777;font-size:.85em}
.meta{color:#555;font-size:.9em}pre{white-space:pre-wrap;margin:0;font-family:inherit}
"""


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One HTML file with inline CSS and the plots as data: URIs, so it opens offline anywhere."""
    e = html.escape
    variants = [v["name"] for v in report["variants"]]
    ref = report["reference"]
    b = report["bootstrap"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>plural eval</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>plural eval — {e(report['model']['name'])}</h1>",
        f"<p class='meta'>{e(report['created'])} · base fingerprint {e(report['model']['fingerprint'][:23])}… · "
        f"{b['resamples']} bootstrap resamples (seed {b['seed']}), {int(b['confidence'] * 100)}% intervals · "
        f"differences against <b>{e(ref)}</b>; <span class='up'>▲</span>/<span class='down'>▼</span> = the interval of the "
        f"difference excludes 0 (better/worse) · {report['seconds']['total']:.1f} s</p>",
        "<table><tr><th>variant</th><th>adapter</th><th>method</th><th>sha256</th></tr>",
    ]
    for v in report["variants"]:
        parts.append(f"<tr><td>{e(v['name'])}</td><td>{e(v['adapter'] or '(base model)')}</td><td>{e(v['method'] or '')}</td>"
                     f"<td class='ci'>{e((v['sha256'] or '')[:23])}</td></tr>")
    parts.append("</table>")
    for s in report["suites"]:
        parts.append(f"<h2>{e(s['name'])} <span class='meta'>({e(s['kind'])}, {s['items']} items, {e(s['path'])})</span></h2>")
        if s["metrics"]:
            head = "".join(f"<th>{e(v)}</th>" for v in variants)
            parts.append(f"<table><tr><th>metric</th><th>n</th>{head}</tr>")
            for m in s["metrics"]:
                cells = []
                for v in variants:
                    val = m["values"][v]
                    cell = f"{fmt(val['value'])} <span class='ci'>[{fmt(val['lo'])}, {fmt(val['hi'])}]</span>"
                    d = m["diffs"].get(v)
                    if d is not None:
                        cls = "up" if flag(d) == "▲" else "down" if flag(d) == "▼" else "ci"
                        cell += (f"<br><span class='{cls}'>{flag(d)} {d['value']:+.4f}</span> "
                                 f"<span class='ci'>[{d['lo']:+.4f}, {d['hi']:+.4f}]</span>")
                    cells.append(f"<td class='num'>{cell}</td>")
                arrow = "↑" if m["higher_is_better"] else "↓"
                parts.append(f"<tr><td>{e(m['name'])} {arrow}</td><td class='num'>{m['values'][ref]['n']}</td>{''.join(cells)}</tr>")
            parts.append("</table>")
        if s["name"] in pngs:
            data = base64.b64encode(pngs[s["name"]]).decode("ascii")
            parts.append(f"<img alt='{e(s['name'])}' src='data:image/png;base64,{data}'>")
        if s["samples"]:
            head = "".join(f"<th>{e(v)}</th>" for v in variants)
            parts.append(f"<details{' open' if s['kind'] == 'samples' else ''}><summary>outputs side by side ({len(s['samples'])})</summary>"
                         f"<table><tr><th>prompt</th><th>reference</th>{head}</tr>")
            for row in s["samples"]:
                cells = []
                for v in variants:
                    sc = row["scores"].get(v)
                    mark = "" if sc is None else (" <span class='up'>✓</span>" if sc >= 1 else " <span class='down'>✗</span>" if sc <= 0 else "")
                    cells.append(f"<td><pre>{e(str(row['outputs'].get(v) or ''))}</pre>{mark}</td>")
                parts.append(f"<tr><td><pre>{e(str(row['prompt'] or ''))}</pre></td><td><pre>{e(str(row['reference'] or ''))}</pre></td>{''.join(cells)}</tr>")
            parts.append("</table></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def rich_table(report: dict[str, Any]):
    """The terminal summary: one row per suite metric, one column per variant (value, difference, flag)."""
    from rich.table import Table

    variants = [v["name"] for v in report["variants"]]
    ref = report["reference"]
    t = Table(title=f"plural eval — {report['model']['name']} (95% CI; ▲/▼ differ from {ref})", show_lines=False)
    t.add_column("suite")
    t.add_column("metric")
    t.add_column("n", justify="right")
    for v in variants:
        t.add_column(v, justify="right")
    for s in report["suites"]:
        if not s["metrics"]:
            t.add_row(s["name"], f"({s['kind']}: {len(s['samples'])} outputs in report.html)", "", *[""] * len(variants))
            continue
        for i, m in enumerate(s["metrics"]):
            cells = []
            for v in variants:
                val = m["values"][v]
                cell = f"{val['value']:.4f} ±{(val['hi'] - val['lo']) / 2:.4f}"
                d = m["diffs"].get(v)
                if d is not None:
                    f = flag(d)
                    style = "green" if f == "▲" else "red" if f == "▼" else "dim"
                    cell += f" [{style}]{d['value']:+.4f}{f}[/]"
                cells.append(cell)
            arrow = "↑" if m["higher_is_better"] else "↓"
            t.add_row(s["name"] if i == 0 else "", f"{m['name']} {arrow}", str(m["values"][ref]["n"]), *cells)
    return t
