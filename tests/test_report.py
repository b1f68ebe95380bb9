"""The report for people (`tsesnet.serving.report`): the lesion's numbers and kinetic curve type on
synthetic arrays with known answers, the picture, and `report.html` opened in a real headless
Chromium (skipped where Chromium is absent): it renders, lists every case and every picture loads.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tsesnet.serving.report import (
    curve_type,
    lesion_numbers,
    overlay_png,
    write_report_html,
)

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM, reason="no chromium (Debian: apt-get install chromium)"
)


def _case(means, shape=(12, 20, 20)) -> tuple[np.ndarray, np.ndarray]:
    """(T, Z, Y, X) image whose cube lesion has mean signal `means[t]` per phase; its mask."""
    mask = np.zeros(shape, np.uint8)
    mask[4:8, 6:12, 6:12] = 1
    image = np.full((len(means), *shape), 50.0, np.float32)
    for t, m in enumerate(means):
        image[t][mask > 0] = m
    return image, mask


@pytest.mark.parametrize(
    ("means", "expected"),
    [
        ((100, 200, 250), "persistent"),  # +25 % from early to late
        ((100, 200, 222), "persistent"),  # +11 %
        ((100, 200, 219), "plateau"),  # +9.5 %
        ((100, 200, 200), "plateau"),
        ((100, 200, 181), "plateau"),  # -9.5 %
        ((100, 200, 170), "wash-out"),  # -15 %
        ((100, 300, 250, 200), "wash-out"),  # late is the last phase: -33 %
        ((100, 200), "n/a"),  # no late phase
    ],
)
def test_curve_types_with_the_10_percent_thresholds(means, expected):
    image, mask = _case(means)
    numbers = lesion_numbers(image, mask, (1.0, 1.0, 1.0))
    assert numbers.curve_type == expected
    assert numbers.enhancement_pct == pytest.approx(
        [100.0 * (m - means[0]) / means[0] for m in means]
    )
    assert numbers.peak_phase == 1 + int(np.argmax(means[1:]))


def test_an_empty_mask_has_no_curve_and_no_size():
    image, mask = _case((100, 200, 250))
    numbers = lesion_numbers(image, np.zeros_like(mask), (2.0, 0.7, 0.7))
    assert (numbers.volume_ml, numbers.diameter_mm, numbers.curve_type) == (0.0, 0.0, "n/a")
    assert numbers.enhancement_pct == () and curve_type(()) == "n/a"


def test_volume_in_ml_and_largest_diameter_in_mm_use_the_spacing():
    mask = np.zeros((20, 30, 30), np.uint8)
    mask[2:12, 5:15, 5:15] = 1  # 1000 voxels of 2 x 0.5 x 0.5 mm = 500 mm^3
    mask[15, 20, 10:21] = 1  # a smaller component: a line of 11 voxels along X
    image = np.ones((3, *mask.shape), np.float32)
    numbers = lesion_numbers(image, mask, (2.0, 0.5, 0.5))
    assert numbers.volume_ml == pytest.approx((1000 + 11) * 0.5 / 1000)
    # the cube's space diagonal between voxel centres: 9 steps of 2, 0.5 and 0.5 mm
    assert numbers.diameter_mm == pytest.approx(np.sqrt(18**2 + 4.5**2 + 4.5**2))
    line = np.zeros_like(mask)
    line[15, 20, 10:21] = 1
    assert lesion_numbers(image, line, (2.0, 0.5, 0.7)).diameter_mm == pytest.approx(7.0)


def test_the_picture_is_a_png_and_the_same_case_gives_the_same_bytes():
    import matplotlib.image

    image, mask = _case((100, 200, 170))
    numbers = lesion_numbers(image, mask, (2.0, 0.7, 0.7))
    png = overlay_png(image, mask, (2.0, 0.7, 0.7), numbers, "case-1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == overlay_png(image, mask, (2.0, 0.7, 0.7), numbers, "case-1")
    import io

    pixels = matplotlib.image.imread(io.BytesIO(png))
    assert pixels.shape[:2] == (512, 1040) and pixels.std() > 0.05  # 13 x 6.4 in at 80 dpi
    empty = np.zeros_like(mask)
    assert overlay_png(image, empty, (1, 1, 1), lesion_numbers(image, empty, (1, 1, 1)), "e")


# --------------------------------------------------------------------------------------------
# report.html in a real browser
# --------------------------------------------------------------------------------------------


def chromium(*args: str, profile: Path, timeout: float = 120) -> str:
    """Headless Chromium with a fresh profile, no network services; its stdout."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM of `page` (opened from disk) after its scripts ran on load."""
    return chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=profile)


def check_report_page(page: Path, case_ids, with_pictures, profile: Path) -> str:
    """Asserts that `page` renders in Chromium, lists every case and that every picture loads
    (the page's own load handler counts images with a natural width > 0); returns the DOM."""
    dom = rendered_dom(page, profile)
    assert '<table id="cases">' in dom
    listed = [html.unescape(c) for c in re.findall(r"<tr id=\"case-([^\"]+)\"", dom)]
    assert sorted(listed) == sorted(case_ids)
    n = len(with_pictures)
    assert f'data-images="{n}/{n}"' in dom, re.search(r'data-images="[^"]*"', dom)
    assert "> picture missing" not in dom  # what the load handler inserts after a broken img
    return dom


def _report_folder(folder: Path) -> list[dict]:
    rows = []
    for i, means in enumerate([(100, 200, 250), (100, 200, 170), (100, 200, 205)]):
        image, mask = _case(means)
        n = lesion_numbers(image, mask, (2.0, 0.7, 0.7))
        case = f"case_{i}"
        (folder / "report").mkdir(parents=True, exist_ok=True)
        (folder / "report" / f"{case}.png").write_bytes(
            overlay_png(image, mask, (2.0, 0.7, 0.7), n, case)
        )
        rows.append(
            {
                "case_id": case,
                "status": "ok",
                "volume_ml": n.volume_ml,
                "diameter_mm": n.diameter_mm,
                "curve_type": n.curve_type,
                "image": f"report/{case}.png",
            }
        )
    rows.append(
        {"case_id": "bad <x>", "status": "error", "error": "x.nii.gz: truncated", "image": ""}
    )
    return rows


@needs_chromium
def test_report_html_renders_lists_every_case_and_loads_every_picture(tmp_path):
    rows = _report_folder(tmp_path / "out")
    page = tmp_path / "out" / "report.html"
    page.write_bytes(write_report_html(rows, ["model: m version 3 (@champion)"], {"input": "x"}))
    dom = check_report_page(page, [r["case_id"] for r in rows], rows[:3], tmp_path / "p1")
    assert "model: m version 3 (@champion)" in dom and "x.nii.gz: truncated" in dom
    for kind in ("persistent", "wash-out", "plateau"):
        assert f'data-v="{kind}"' in dom

    # The check can fail: a picture gone is seen by the browser and said on the page.
    (tmp_path / "out" / "report" / "case_1.png").unlink()
    dom = rendered_dom(page, tmp_path / "p2")
    assert 'data-images="2/3"' in dom and "> picture missing: case_1" in dom
