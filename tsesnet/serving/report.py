"""What a person looks at after `tsesnet predict`: a picture and a few numbers per case, and one
`report.html` that lists them all.

Per case, the picture and the numbers are `tsesnet.common.pictures` (`overlay_png`,
`lesion_numbers`: drawn by the actors where they write the mask; training draws a few validation
cases the same way). `write_report_html` (the driver, at the end) writes one self-contained page:
the model, then a table of every case (sortable by clicking a column head; no server, no network:
a few lines of inline JavaScript), each with its picture as a relative file `report/CASE.png`
beside it.
"""

from __future__ import annotations

import html
import math

# The per-case pictures and numbers, used through this module by `predict` and the tests.
from tsesnet.common.pictures import (
    CURVE_THRESHOLD,
    CURVE_TYPES,
    LesionNumbers,
    curve_type,
    enhancement_text,
    kinetic_curve,
    largest_component,
    largest_diameter_mm,
    lesion_numbers,
    overlay_png,
)

__all__ = [
    "CURVE_THRESHOLD",
    "CURVE_TYPES",
    "LesionNumbers",
    "curve_type",
    "enhancement_text",
    "kinetic_curve",
    "largest_component",
    "largest_diameter_mm",
    "lesion_numbers",
    "overlay_png",
    "write_report_html",
]

# --------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------

#: Table columns: (row key, heading, format).
_COLUMNS = (
    ("case_id", "case", "{}"),
    ("status", "status", "{}"),
    ("volume_ml", "volume (mL)", "{:.2f}"),
    ("diameter_mm", "largest diameter (mm)", "{:.1f}"),
    ("curve_type", "curve", "{}"),
    ("enhancement_pct", "enhancement per phase (%)", "{}"),
    ("dice", "DSC", "{:.3f}"),
    ("hd95_mm", "HD95 (mm)", "{:.2f}"),
    ("warnings", "warnings / error", "{}"),
)

_SORT_JS = """
document.querySelectorAll('th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.dir !== 'asc';
  document.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = r => r.cells[i].dataset.v ?? r.cells[i].textContent;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
    return asc ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}));
window.addEventListener('load', () => {  // say so where a picture is missing
  const imgs = Array.from(document.images);
  const bad = imgs.filter(im => !(im.complete && im.naturalWidth > 0));
  bad.forEach(im => im.insertAdjacentText('afterend', ' picture missing: ' + im.alt));
  document.body.dataset.images = (imgs.length - bad.length) + '/' + imgs.length;
});
"""

_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #eee; cursor: pointer; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
tr.error td { background: #fdd; }
img { max-width: 640px; }
"""


def _cell(key: str, fmt: str, row: dict) -> str:
    v = row.get(key)
    if key == "warnings" and row.get("error"):
        v = row["error"]
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return '<td data-v="">-</td>'
    text = fmt.format(v)
    return f'<td data-v="{html.escape(str(v))}">{html.escape(text)}</td>'


def write_report_html(rows: list[dict], model_lines: list[str], header: dict) -> bytes:
    """The page: the model, the run, and one table row per case with its picture.

    Args:
        rows: one per case (`SUMMARY_COLUMNS`; `image` the picture's path relative to the page,
            "" when none).
        model_lines: what `predict` printed about the model.
        header: a few facts shown as a list (input, output, time...).

    Returns:
        UTF-8 HTML that opens from disk: pictures are relative files beside it.
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in _COLUMNS) + "<th>picture</th>"
    body = []
    for r in rows:
        cells = "".join(_cell(k, f, r) for k, _, f in _COLUMNS)
        img = r.get("image") or ""
        pic = (
            f'<a href="{html.escape(img)}"><img src="{html.escape(img)}" '
            f'alt="{html.escape(r["case_id"])}" loading="eager"></a>'
            if img
            else "-"
        )
        cls = ' class="error"' if r.get("status") != "ok" else ""
        body.append(f'<tr id="case-{html.escape(r["case_id"])}"{cls}>{cells}<td>{pic}</td></tr>')
    facts = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in header.items()
    )
    curve = (
        f"Curve type from the early (phase 1) to the late (last) post-contrast phase: a change "
        f"above +{CURVE_THRESHOLD:.0%} is persistent, below −{CURVE_THRESHOLD:.0%} wash-out, "
        f"else plateau; n/a with fewer than three phases or an empty mask. Volume: the whole "
        f"mask; diameter: its largest component. Click a column head to sort."
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tsesnet predictions</title>
<style>{_CSS}</style></head>
<body data-cases="{len(rows)}">
<h1>tsesnet predictions</h1>
<pre>{html.escape(chr(10).join(model_lines))}</pre>
<ul>{facts}</ul>
<p>{html.escape(curve)}</p>
<table id="cases"><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_SORT_JS}</script>
</body></html>
"""
    return page.encode()
