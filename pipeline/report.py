"""``OUT_DIR/report.html``: every scan with its status, timings, top candidates and pictures.
Only scan ids (UIDs or file stems) appear, never patient names or IDs."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from pipeline.io import write_text

__all__ = ["write_report"]

_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}
.failed{color:#b00}.flag{color:#a60}img{max-width:100%;border:1px solid #ccc}details{margin:1em 0}"""


def write_report(out_dir, results) -> Path:
    """Write ``report.html`` for ``results`` (list of :class:`pipeline.run.ScanResult`)."""
    out_dir = Path(out_dir)
    ok = [r for r in results if r.status != "failed"]
    failed = [r for r in results if r.status == "failed"]
    rows = []
    for r in sorted(results, key=lambda r: (r.status == "failed", r.scan_id, r.source)):
        secs = ", ".join(f"{k} {v}" for k, v in r.seconds.items() if k != "peak_rss_mb")
        name = html.escape(r.scan_id or Path(r.source).name)
        link = f'<a href="#{name}">{name}</a>' if r.status != "failed" else name
        rows.append(f'<tr class="{r.status}"><td>{link}</td><td>{r.status}</td>'
                    f"<td>{r.n_candidates}</td><td>{html.escape(secs)}</td>"
                    f"<td>{html.escape(r.error)}</td>"
                    f"<td class='flag'>{html.escape('; '.join(r.flags))}</td></tr>")
    parts = [f"<!doctype html><meta charset='utf-8'><title>lungscreen report</title><style>{_STYLE}</style>",
             f"<h1>lungscreen: {len(ok)} scans done, {len(failed)} failed</h1>",
             "<table><tr><th>scan</th><th>status</th><th>candidates</th><th>seconds</th><th>error</th><th>flags</th></tr>",
             *rows, "</table>"]
    for r in sorted(ok, key=lambda r: r.scan_id):
        scan_dir = Path(r.out_dir)
        name = html.escape(r.scan_id)
        parts.append(f'<details id="{name}"><summary>{name}</summary>')
        for flag in r.flags:
            parts.append(f"<p class='flag'>&#9888; {html.escape(flag)}</p>")
        if (scan_dir / "preview.png").exists():
            parts.append(f'<img src="{html.escape(r.scan_id)}/preview.png" alt="preview">')
        csv = scan_dir / "candidates.csv"
        if csv.exists():
            top = pd.read_csv(csv).head(10)
            parts.append(top.drop(columns=["seriesuid"], errors="ignore").to_html(
                index=False, float_format=lambda v: f"{v:.2f}"))
        for png in sorted(scan_dir.glob("candidate_*.png")):
            parts.append(f'<img src="{html.escape(r.scan_id)}/{png.name}" alt="{png.stem}">')
        parts.append("</details>")
    return write_text("\n".join(parts) + "\n", out_dir / "report.html")
