"""report.html in a real browser (#19 item 3): headless Chromium (Debian's ``chromium``) renders
it, the first finding's row and picture are on the first screen, its picture decodes, and
clicking a column heading sorts the table."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.report_demo import WINDOW_SIZE, chromium, chromium_path, write_quick_run

pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="no chromium or chromium-browser on PATH (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_quick_run(tmp_path_factory.mktemp("report_browser"))


def _with_script(run, tmp_path, script: str):
    """A copy of the report (beside the original, so relative links still resolve) that runs
    ``script`` once the page has loaded."""
    page = run["out"] / f"probe_{tmp_path.name}.html"
    page.write_text(run["report"].read_text().replace(
        "</html>", f"<script>window.addEventListener('load', function () {{ {script} }});</script></html>"))
    return page


def _rows(dom: str) -> dict[str, list[str]]:
    """The findings table's rows in page order: row id -> the texts of its cells."""
    body = dom[dom.index('id="findings-table"'):]
    body = body[:body.index("</table>")]
    return {row_id: [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row_id, row in re.findall(r"<tr id=\"(row-f\d+)\">(.*?)</tr>", body, re.S)}


def test_report_renders_and_shows_the_first_finding(run, tmp_path):
    # where the first picture sits once it has decoded (the same window as the screenshot)
    page = _with_script(run, tmp_path,
                        "var i = document.querySelector('#f1 img'), r = i.getBoundingClientRect();"
                        "document.body.dataset.firstPicture = [r.left + i.clientLeft, r.top + i.clientTop, "
                        "i.clientWidth, i.clientHeight].map(Math.round).join(' ');")
    dom = chromium(page, dump_dom=True)
    first = run["findings"].iloc[0]
    row = _rows(dom)["row-f1"]
    assert row[1] == first["scan_id"] and row[3] == f"{first['probability']:.3f}"
    assert row[4] == f"{first['diameter_mm']:.1f}" and row[6] == f"{first['coordX']:.1f}"
    assert row[11] == "finding 1"
    img = re.search(r'<figure id="f1"><img ([^>]*)>', dom).group(1)
    assert 'src="data:image/jpeg;base64,' in img
    picture = Path(run["results"][0].out_dir) / "finding_01.jpg"  # scan A's most probable
    with Image.open(picture) as im:
        want = np.asarray(im.convert("RGB")).astype(float)
    assert int(re.search(r'data-natural-width="(\d+)"', img).group(1)) == want.shape[1]  # decoded
    left, top, width, height = map(int, re.search(r'data-first-picture="([^"]*)"', dom).group(1).split())
    assert (width, height) == (want.shape[1], want.shape[0]) and top + height <= WINDOW_SIZE[1]

    shot = tmp_path / "report.png"
    chromium(run["report"], screenshot=shot)
    with Image.open(shot) as im:
        assert im.size == WINDOW_SIZE
        rgb = np.asarray(im.convert("RGB")).astype(float)
    assert rgb.std() > 30  # rendered: text, tables and the CT, not a blank page
    shown = rgb[top:top + height, left:left + width]
    assert np.abs(shown - want).mean() < 8  # the first finding's picture, whole, in the window
    other = rgb[top:top + height, left:left + width][::-1]
    assert np.abs(other - want).mean() > 20  # (the comparison can tell pictures apart)


def test_clicking_a_heading_sorts_the_findings(run, tmp_path):
    # probability: the first click sorts lowest first, the second highest first
    click = "document.querySelectorAll('#findings-table th')[{}].click();"
    script = ("var order = function () { return Array.prototype.map.call("
              "document.querySelectorAll('#findings-table tbody tr'), "
              "function (r) { return r.id; }).join(' '); };"
              + click.format(3) + "document.body.dataset.up = order();"
              + click.format(3) + "document.body.dataset.down = order();"
              + click.format(9) + "document.body.dataset.slice = order();")
    dom = chromium(_with_script(run, tmp_path, script), dump_dom=True)
    up = re.search(r'data-up="([^"]*)"', dom).group(1).split()
    down = re.search(r'data-down="([^"]*)"', dom).group(1).split()
    assert up == ["row-f3", "row-f2", "row-f1"] and down == ["row-f1", "row-f2", "row-f3"]
    by_slice = re.search(r'data-slice="([^"]*)"', dom).group(1).split()
    rows = _rows(dom)
    assert list(rows) == by_slice  # the page as the last click left it
    slices = [int(rows[r][9].split(" of ")[0]) for r in by_slice]
    assert slices == sorted(slices) and len(set(slices)) > 1
