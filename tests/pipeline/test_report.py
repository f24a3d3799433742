"""report.html for a reader (#19 item 3), read as HTML: findings first, most probable first,
with their source slices and pictures; the legend; links that land; nothing collapsed.
The browser's view of it: test_report_browser.py."""
import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline import preview
from pipeline.report import write_report
from synth.report_demo import write_quick_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_quick_run(tmp_path_factory.mktemp("report"))


class _Page(HTMLParser):
    """Ids, links, images and the findings table's rows (cell texts) of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.hrefs, self.imgs, self.rows, self.tags = [], [], [], [], []
        self._table, self._cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "table":
            self._table = attrs.get("id")
        if tag == "tr" and self._table == "findings-table":
            self.rows.append([])
        if tag == "td" and self._table == "findings-table":
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None
        if tag == "table":
            self._table = None


def test_findings_come_first_most_probable_first_with_known_values(run):
    text = run["report"].read_text()
    page = _Page(text)
    rows = [r for r in page.rows if r]
    want = run["findings"]
    assert len(rows) == len(want) == 3
    for row, (_, f) in zip(rows, want.iterrows()):
        # #, scan, rank, probability, diameter, type, x, y, z, source slice, InstanceNumber, picture
        assert row[1] == f["scan_id"] and row[2] == str(f["rank"])
        assert row[3] == f"{f['probability']:.3f}" and row[4] == f"{f['diameter_mm']:.1f}"
        assert row[5] == "nodule"
        assert row[6:9] == [f"{f[c]:.1f}" for c in ("coordX", "coordY", "coordZ")]
    assert [r[3] for r in rows] == ["0.910", "0.620", "0.350"]  # across scans
    assert rows[1][10] == "\u2014"  # NRRD: no InstanceNumber
    # findings, legend and pictures before the scans' status
    order = [text.index(s) for s in ('id="findings-table"', 'id="legend"', 'id="f1"', 'id="scans-table"')]
    assert order == sorted(order)
    words = re.sub(r"data:[^\"']*", "", text)  # without the pictures' base64
    assert "<details" not in words and "score" not in words.lower()  # the probability is called so


def test_every_link_lands_and_every_picture_is_embedded(run):
    text = run["report"].read_text()
    page = _Page(text)
    local = [h[1:] for h in page.hrefs if h.startswith("#")]
    assert len(local) == len(page.hrefs) and set(local) <= set(page.ids), set(local) - set(page.ids)
    assert [f"f{n}" for n in (1, 2, 3)] == [h for h in local if re.fullmatch(r"f\d+", h)]
    assert len(page.imgs) == 3
    for img in page.imgs:
        assert img["src"].startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            assert im.format == "JPEG" and im.size == (3 * 10 + 2 * preview.FINDING_PANEL_PX,
                                                        2 * 10 + 40 + preview.FINDING_PANEL_PX)
    assert not re.search(r"""(src|href)=["'](https?:|//)""", text)  # nothing fetched: works offline
    assert "ANON" not in text  # the phantoms' patient name and ID


def test_legend_sorting_and_the_scans_status(run):
    text = run["report"].read_text()
    for words in ("red ring", "dashed yellow ring", "cyan square", "green line", "lung window",
                  "width 1500 HU, level -600 HU", "InstanceNumber (0020,0013)"):
        assert words in text, words
    assert text.count('class="sortable"') == 2 and 'addEventListener("click"' in text
    assert 'data-type="num">probability</th>' in text
    scans = text[text.index('id="scans-table"'):]
    assert "no CT image series found (empty folder)" in scans and "replaced by interpolation" in scans
    assert "2 scans done, 1 failed" in text


def test_source_slice_is_the_dicom_slice_and_its_instance_number(run):
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in run["dicom"].iterdir()]
    z_mm = sorted(float(h.ImagePositionPatient[2]) for h in headers)
    number_at = {float(h.ImagePositionPatient[2]): int(h.InstanceNumber) for h in headers}
    scan_dir = Path(run["results"][0].out_dir)
    facts = json.loads((scan_dir / preview.FINDINGS_JSON).read_text())["findings"]
    assert len(facts) == 2
    for f in facts:
        k = int(np.argmin(np.abs(np.array(z_mm) - f["coordZ"])))
        assert (f["source_slice"], f["n_source_slices"]) == (k + 1, len(z_mm))
        assert f["instance_number"] == number_at[z_mm[k]] == 1000 - k  # not the slice's place


def test_finding_picture_is_zoomed_and_centred_on_the_finding(run):
    scan_dir = Path(run["results"][0].out_dir)
    facts = json.loads((scan_dir / preview.FINDINGS_JSON).read_text())["findings"]
    with Image.open(scan_dir / facts[0]["picture"]) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    side = preview.FINDING_PANEL_PX
    crop = rgb[50:50 + side, 10:10 + side]  # below the 40 px title, inside the 10 px margin
    red = (crop[..., 0] > 170) & (crop[..., 1] < 90) & (crop[..., 2] < 90)
    rows, cols = np.nonzero(red)
    assert len(rows) > 100
    assert abs(rows.mean() - side / 2) < 4 and abs(cols.mean() - side / 2) < 4
    radius_px = np.hypot(rows - side / 2, cols - side / 2).mean()
    want_px = (facts[0]["diameter_mm"] / 2 + preview.RING_MARGIN_MM) * preview.CROP_PX_PER_MM
    assert abs(radius_px - want_px) < 0.1 * want_px  # drawn at CROP_PX_PER_MM (>= 5 px per mm)
    whole = rgb[50:50 + side, 20 + side:20 + 2 * side]
    cyan = (whole[..., 0] < 90) & (whole[..., 1] > 170) & (whole[..., 2] > 170)
    lime = (whole[..., 0] < 120) & (whole[..., 1] > 170) & (whole[..., 2] < 120)
    assert cyan.sum() > 50 and lime.sum() > 50  # the crop's field and the lung outline


def test_pictures_past_the_limit_are_linked_to_their_files(run, tmp_path):
    report = write_report(run["out"], run["results"], embedded_pictures=1)
    page = _Page(report.read_text())
    srcs = [img["src"] for img in page.imgs]
    assert srcs[0].startswith("data:image/jpeg;base64,") and len(srcs) == 3
    for src in srcs[1:]:
        assert not src.startswith("data:") and (run["out"] / src).is_file()
    assert "Findings 1 to 1 are embedded" in report.read_text()


def test_a_scan_without_findings_json_says_so(run, tmp_path):
    scan_dir = tmp_path / "old"
    scan_dir.mkdir()
    old = type(run["results"][0])(source="x", scan_id="old", status="cached", out_dir=str(scan_dir))
    text = write_report(tmp_path, [old]).read_text()
    assert "No findings pictured" in text and "written by an older lungscreen" in text


def test_the_verdict_of_each_patient_comes_first_by_scan_id(tmp_path):
    import pandas as pd

    from pipeline.report import write_report

    pd.DataFrame([{"id": "PATIENT-NAME-FOLDER", "cancer": 0.8123, "lung_rads": "4B",
                   "lung_rads_reason": "solid 17.0 mm", "n_findings": 3, "largest_diameter_mm": 17.0,
                   "largest_type": "solid", "scans": "1.2.3;1.2.4"},
                  {"id": "other", "cancer": 0.05, "lung_rads": "1", "lung_rads_reason": "no finding",
                   "n_findings": 0, "largest_diameter_mm": float("nan"), "largest_type": float("nan"),
                   "scans": "9.9"}]).to_csv(tmp_path / "patients.csv", index=False)
    text = write_report(tmp_path, []).read_text()
    verdicts = text[text.index('id="verdicts"'):text.index('id="findings"')]
    assert "1.2.3<br>1.2.4" in verdicts and "0.812" in verdicts and "4B" in verdicts
    assert "solid 17.0 mm" in verdicts and verdicts.index("1.2.3") < verdicts.index("9.9")
    assert "PATIENT-NAME-FOLDER" not in text and ">nan<" not in verdicts
