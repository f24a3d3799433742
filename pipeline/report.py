"""``OUT_DIR/report.html``: what a reader opens first.

Top to bottom, nothing collapsed:

0. The **verdict** of each patient (``OUT_DIR/patients.csv``, :mod:`pipeline.patients`): cancer
   probability and Lung-RADS category with the finding that sets it, listed by scan id.
1. **Findings** of every scan in one table, the most probable first: probability, diameter,
   type, world position, the source slice (its 1-based number in the series and, for DICOM,
   its InstanceNumber: what a viewer shows), each row linked to its picture.  Click a column
   heading to sort by it (a few lines of inline JavaScript).
2. A **legend**: the rings, the square, the outline, the window, the columns.
3. The **pictures** (``finding_NN.jpg``, written per scan by
   :func:`pipeline.preview.save_finding_pictures`): a zoomed 60 mm crop beside the whole slice.
4. The **scans**: status, candidates, timings, errors and flags (repaired slices...).

One file that works offline: the pictures are embedded as ``data:`` URIs (base64 JPEG, about
65 kB each, 85 kB as base64) so the report can be mailed, attached to a ticket or opened
from anywhere and still shows them; no external script, style sheet or font.  Past
:data:`EMBEDDED_PICTURES` findings (a large batch) the rest are linked to their file in the
scan folder instead, which works while the report stays in its run folder, and the report
says so.  Only scan ids (UIDs or file stems) appear, never patient names or IDs.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from pipeline.io import write_text
from pipeline.preview import CROP_FIELD_MM, CROP_PX_PER_MM, FINDINGS_JSON, RING_MARGIN_MM, WINDOW_HU

__all__ = ["write_report", "report_findings", "EMBEDDED_PICTURES"]

#: Finding pictures embedded in ``report.html`` (the most probable first): about 9 MB.
EMBEDDED_PICTURES = 100

_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#111}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#ddd}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.failed{color:#b00}.flag{color:#a60}.note{color:#555;font-size:13px}
.legend{border:1px solid #ccc;padding:4px 12px;margin:1em 0;font-size:13px;max-width:75em}
.legend li{margin:2px 0}.sw{display:inline-block;width:14px;height:14px;vertical-align:middle;
margin-right:4px;box-sizing:border-box}td.id{font-size:11px;word-break:break-all;min-width:16em}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #ccc;display:block}
figcaption{font-size:13px;margin-top:4px;max-width:62em}:target{outline:3px solid #fc0}"""

#: Sorts a table.sortable by the clicked column: numbers by ``data-v`` (blanks last), text
#: alphabetically; a second click reverses.
_SORT_JS = """document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending", num = th.dataset.type === "num";
      table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col], v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
        if (!num) return v.toLowerCase();
        var x = parseFloat(v);
        return isNaN(x) ? (asc ? Infinity : -Infinity) : x;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});"""


def report_findings(results) -> list[dict]:
    """The pictured findings of every finished scan, most probable first.

    Parameters
    ----------
    results : list of pipeline.run.ScanResult
        Failed scans and scans without ``findings.json`` contribute nothing.

    Returns
    -------
    list of dict
        The dicts of each scan's ``findings.json`` (see
        :func:`pipeline.preview.save_finding_pictures`) plus ``scan_id`` and ``path`` (the
        picture file), sorted by probability (highest first; rows without one last), then
        scan id and rank.
    """
    rows = []
    for r in results:
        if r.status == "failed" or not r.out_dir:
            continue
        path = Path(r.out_dir) / FINDINGS_JSON
        if path.exists():
            for item in json.loads(path.read_text())["findings"]:
                rows.append({**item, "scan_id": r.scan_id, "path": Path(r.out_dir) / item["picture"]})
    return sorted(rows, key=lambda f: (f["probability"] is None, -(f["probability"] or 0.0),
                                       f["scan_id"], f["rank"]))


def _num(value, digits: int) -> str:
    """A sortable numeric cell: ``data-v`` holds the value (empty when missing)."""
    if value is None:
        return '<td class="num" data-v="">&mdash;</td>'
    return f'<td class="num" data-v="{value}">{value:.{digits}f}</td>'


#: The findings table's columns: heading, and whether it sorts as numbers.
_FINDING_COLUMNS = [("#", True), ("scan", False), ("rank in scan", True), ("probability", True),
                    ("diameter (mm)", True), ("type", False), ("x (mm)", True), ("y (mm)", True),
                    ("z (mm)", True), ("source slice", True), ("InstanceNumber", True), ("picture", True)]


def _findings_table(findings: list[dict]) -> list[str]:
    head = "".join(f'<th data-type="{"num" if num else "text"}">{h}</th>' for h, num in _FINDING_COLUMNS)
    out = [f'<table id="findings-table" class="sortable"><thead><tr>{head}</tr></thead><tbody>']
    for n, f in enumerate(findings, start=1):
        scan = html.escape(f["scan_id"])
        out.append(
            f'<tr id="row-f{n}">{_num(n, 0)}'
            f'<td class="id" data-v="{scan}"><a href="#scan-{scan}">{scan}</a></td>'
            f'{_num(f["rank"], 0)}{_num(f["probability"], 3)}{_num(f["diameter_mm"], 1)}'
            f'<td>{html.escape(f["finding"])}</td>'
            f'{_num(f["coordX"], 1)}{_num(f["coordY"], 1)}{_num(f["coordZ"], 1)}'
            f'<td class="num" data-v="{f["source_slice"]}">{f["source_slice"]} of {f["n_source_slices"]}</td>'
            f'{_num(f["instance_number"], 0)}<td class="num" data-v="{n}"><a href="#f{n}">finding {n}</a></td>'
            "</tr>")
    out.append("</tbody></table>")
    return out


def _legend() -> str:
    low, high = WINDOW_HU
    items = [
        '<span class="sw" style="border:2px solid red;border-radius:50%"></span>'
        f"red ring: the finding, drawn {RING_MARGIN_MM:g} mm outside its measured diameter so "
        "that its edge stays visible",
        '<span class="sw" style="border:2px dashed #ee0;border-radius:50%"></span>'
        "dashed yellow ring and number: another pictured finding of the same scan on that slice, "
        "with its rank in the scan",
        '<span class="sw" style="border:2px solid cyan"></span>'
        f"cyan square (whole slice): the {CROP_FIELD_MM:g} x {CROP_FIELD_MM:g} mm field shown "
        f"zoomed on the left, drawn at {CROP_PX_PER_MM:g} pixels per mm (bilinear interpolation of "
        "the scan's own pixels)",
        '<span class="sw" style="border-bottom:2px solid lime;height:7px"></span>'
        "green line (whole slice): outline of the lung mask",
        '<span class="sw" style="background:linear-gradient(90deg,#000,#fff)"></span>'
        f"window: lung window, width 1500 HU, level -600 HU: black at {low:g} HU and below, "
        f"white at {high:+g} HU and above",
        "orientation: axial slices as radiologists read them, the patient's right (R) on the "
        "viewer's left, front up; the white bars are 10 mm (zoom) and 50 mm (whole slice)",
        "probability: the classifier's probability (0 to 1) that the finding is a nodule; "
        "diameter: its measured size (a nodule: mean extent along the three axes; a mass: the "
        "diameter of a sphere of its volume); type: nodule (up to 30 mm) or mass (over 30 mm); "
        "texture (solid, part-solid, ground glass) is not estimated by this pipeline",
        "x, y, z: world position in mm, DICOM patient coordinates (LPS: x towards the patient's "
        "left, y towards the back, z towards the head), the coordX/Y/Z of candidates.csv; "
        "source slice: the slice of the series as read, counted from 1 along the slice normal "
        "(feet to head in the usual axial series), and its DICOM InstanceNumber (0020,0013), the "
        "image number most viewers show",
    ]
    return ('<div class="legend" id="legend"><h2>Legend</h2><ul>'
            + "".join(f"<li>{item}</li>" for item in items) + "</ul></div>")


def _figure(n: int, f: dict, out_dir: Path, embed: bool) -> str:
    scan = html.escape(f["scan_id"])
    if embed:
        src = "data:image/jpeg;base64," + base64.b64encode(f["path"].read_bytes()).decode("ascii")
    else:
        src = html.escape(Path(os.path.relpath(f["path"], out_dir)).as_posix())
    prob = "no probability" if f["probability"] is None else f"probability {f['probability']:.3f}"
    number = "" if f["instance_number"] is None else f", InstanceNumber {f['instance_number']}"
    caption = (f"<b>Finding {n}</b>: scan {scan}, rank {f['rank']} in its scan, {prob}, "
               f"{html.escape(f['finding'])} {f['diameter_mm']:.1f} mm at (x, y, z) = "
               f"({f['coordX']:.1f}, {f['coordY']:.1f}, {f['coordZ']:.1f}) mm; {f['plane']} source "
               f"slice {f['source_slice']} of {f['n_source_slices']}{number}. Left: "
               f"{CROP_FIELD_MM:g} mm around it; right: the whole slice. Lung window W1500 / L-600. "
               f'<a href="#row-f{n}">back to the table</a>')
    return (f'<figure id="f{n}"><img src="{src}" alt="finding {n}: scan {scan}, rank {f["rank"]}" '
            f'onload="this.dataset.naturalWidth = this.naturalWidth">'
            f"<figcaption>{caption}</figcaption></figure>")


def _verdict_table(out_dir: Path) -> list[str]:
    """The run's ``patients.csv`` as a table, by scan id (a patient's folder name may identify
    them, so the report names scans only)."""
    import pandas as pd

    csv = out_dir / "patients.csv"
    if not csv.exists():
        return []
    table = pd.read_csv(csv, dtype={"id": str, "scans": str, "lung_rads": str})
    rows = []
    for _, v in table.sort_values("cancer", ascending=False).iterrows():
        scans = "<br>".join(html.escape(s) for s in str(v["scans"]).split(";"))
        size = None if pd.isna(v["largest_diameter_mm"]) else float(v["largest_diameter_mm"])
        kind = "" if pd.isna(v["largest_type"]) else str(v["largest_type"])
        rows.append(f'<tr><td class="id">{scans}</td>{_num(float(v["cancer"]), 3)}'
                    f'<td>{html.escape(str(v["lung_rads"]))}</td>'
                    f'<td>{html.escape(str(v["lung_rads_reason"]))}</td>{_num(int(v["n_findings"]), 0)}'
                    f"{_num(size, 1)}<td>{html.escape(kind)}</td></tr>")
    return ['<h2 id="verdicts">Verdict per patient</h2><p class="note">Cancer probability (the '
            "patient model, see the README: trained on a proxy label, LIDC readers' malignancy "
            "ratings) and the Lung-RADS v2022 category of a baseline exam (no prior: no growth) "
            "from the largest finding of probability 0.5 or more.</p>",
            '<table class="sortable"><thead><tr><th>scan(s)</th><th data-type="num">cancer '
            'probability</th><th>Lung-RADS</th><th>set by</th><th data-type="num">findings</th>'
            '<th data-type="num">largest (mm)</th><th>type</th></tr></thead><tbody>', *rows,
            "</tbody></table>"]


def _scans_table(results) -> list[str]:
    out = ['<table id="scans-table" class="sortable"><thead><tr><th>scan</th><th>status</th>'
           '<th data-type="num">findings pictured</th><th data-type="num">candidates</th>'
           "<th>seconds</th><th>error</th><th>flags</th></tr></thead><tbody>"]
    for r in sorted(results, key=lambda r: (r.status == "failed", r.scan_id, r.source)):
        secs = ", ".join(f"{k} {v}" for k, v in r.seconds.items() if k != "peak_rss_mb")
        name = html.escape(r.scan_id or Path(r.source).name)
        pictured = ""
        if r.status != "failed" and r.out_dir:
            path = Path(r.out_dir) / FINDINGS_JSON
            pictured = (str(len(json.loads(path.read_text())["findings"])) if path.exists()
                        else "none: written by an older lungscreen (rerun with --force)")
        out.append(f'<tr id="scan-{name}" class="{r.status}"><td class="id">{name}</td><td>{r.status}</td>'
                   f"<td class='num'>{pictured}</td><td class='num'>{r.n_candidates}</td>"
                   f"<td>{html.escape(secs)}</td><td>{html.escape(r.error)}</td>"
                   f"<td class='flag'>{html.escape('; '.join(r.flags))}</td></tr>")
    out.append("</tbody></table>")
    return out


def write_report(out_dir, results, *, embedded_pictures: int = EMBEDDED_PICTURES) -> Path:
    """Write ``report.html`` for ``results`` (list of :class:`pipeline.run.ScanResult`).

    Parameters
    ----------
    out_dir : str or Path
        The run's output folder (the scans' folders are named in the results).
    results : list of pipeline.run.ScanResult
        Every scan of the run, failed ones included.
    embedded_pictures : int
        Pictures embedded in the file (the most probable findings'); the rest are linked.

    Returns
    -------
    Path
        ``out_dir / "report.html"``.
    """
    out_dir = Path(out_dir)
    findings = report_findings(results)
    n_ok = sum(r.status != "failed" for r in results)
    n_scans = len({f["scan_id"] for f in findings})
    parts = ["<!doctype html><html lang='en'><meta charset='utf-8'><title>lungscreen report</title>"
             f"<style>{_STYLE}</style>",
             f"<h1>lungscreen: {n_ok} scan{'s' * (n_ok != 1)} done, {len(results) - n_ok} failed</h1>",
             f'<h2 id="findings">Findings</h2><p class="note">{len(findings)} finding'
             f"{'s' * (len(findings) != 1)} pictured in {n_scans} scan{'s' * (n_scans != 1)} (the most "
             "probable of each scan: the run's --pictures), the most probable first. Click a column "
             "heading to sort; a finding's link shows its picture.</p>"]
    parts[2:2] = _verdict_table(out_dir)
    parts += _findings_table(findings) if findings else ["<p>No findings pictured.</p>"]
    parts.append(_legend())
    if findings:
        parts.append('<h2 id="pictures">Pictures</h2>')
        if len(findings) > embedded_pictures:
            parts.append(f'<p class="note">Findings 1 to {embedded_pictures} are embedded; the '
                         "others are linked to their file in the scan's folder (keep this report "
                         "in its run folder to see them).</p>")
        parts += [_figure(n, f, out_dir, embed=n <= embedded_pictures)
                  for n, f in enumerate(findings, start=1)]
    parts.append('<h2 id="scans">Scans</h2>')
    parts += _scans_table(results)
    parts.append(f"<script>{_SORT_JS}</script></html>")
    return write_text("\n".join(parts) + "\n", out_dir / "report.html")
