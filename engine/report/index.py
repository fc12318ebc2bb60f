"""The run-level index of an output folder: `report/index.html`, one row per tomogram.

Each row has the tomogram's thumbnail (linking to its report PNG), its counts, threshold, warnings
and seconds, and the checks that single it out from the rest of the run (a failed run, a warning,
no vesicles, a count or radius far from the run's median, many candidates removed); rows with a
check are tinted, so a failed or odd tomogram stands out at a glance. Above the table, `report/run.png`
holds the run-level histograms. The page is one self-contained file with inline CSS and JavaScript
(click a header to sort): it works offline and from a shared filesystem.
"""

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.io.tables import active_mask
from cryoves.engine.report.tomogram import OUTCOME_COLORS, REPORT_DIR, outcomes, save_png, stage_counts

COUNT_RATIO = 2.0
"""A tomogram whose vesicle count is more than this factor from the run's median is flagged."""
RADIUS_RATIO = 1.3
"""Likewise for its median vesicle radius."""
REMOVED_FRACTION = 0.3
"""A tomogram that lost more than this fraction of its candidates in post-processing is flagged."""
THRESHOLD_DIFFERENCE = 0.1
"""Likewise a global threshold this far from the run's median."""
MIN_TOMOGRAMS_FOR_MEDIANS = 3
"""Run medians are compared against only when the run has at least this many segmented tomograms."""
MAX_NAMED_BARS = 40
"""Up to this many tomograms the run figure has one named bar each; more get a histogram."""
_FLAGGED_COLOR = "#ffb000"


@dataclass(frozen=True)
class IndexRow:
    """What the index shows of one tomogram; numbers are NaN where the run failed."""

    name: str
    status: str
    error: str
    n_final: int
    n_repaired: int
    n_removed: int
    n_candidates: int
    median_radius_nm: float
    threshold: float
    seconds: float
    warnings: tuple[str, ...]
    checks: tuple[str, ...] = ()


def read_rows(out_dir) -> list[IndexRow]:
    """One row per run record in `out_dir/runs/`, by name; the run-relative checks are filled in."""
    out_dir = Path(out_dir)
    rows = []
    for path in sorted((out_dir / "runs").glob("*.parquet")):
        records = pq.read_table(path).to_pylist() if path.is_file() else []
        if not records:
            continue  # not a run record (e.g. a folder in its place)
        record = records[0]
        rows.append(_row(out_dir, str(record.get("tomogram") or path.stem), record))
    return with_checks(rows)


def _row(out_dir: Path, name: str, record: dict) -> IndexRow:
    warnings = tuple(json.loads(record.get("warnings") or "[]"))
    if record.get("status") != "ok":
        return IndexRow(name, str(record.get("status")), str(record.get("error") or ""), 0, 0, 0, 0,
                        float("nan"), float("nan"), float("nan"), warnings)
    table = pq.read_table(out_dir / "vesicles" / f"{name}.parquet", columns=["outcome", "stage", "radius_nm"])
    counts = stage_counts(table)
    radii = table.column("radius_nm").to_numpy(zero_copy_only=False)[active_mask(table)]
    seconds = record.get("total_seconds")
    return IndexRow(name, "ok", "", counts.final, counts.repaired, counts.removed, counts.candidates,
                    float(np.median(radii)) if len(radii) else float("nan"), float(record["threshold"]),
                    float("nan") if seconds is None else float(seconds), warnings)


def with_checks(rows: list[IndexRow]) -> list[IndexRow]:
    """The rows with `checks`: why each one deserves a look, judged against the run's medians."""
    ok = [r for r in rows if r.status == "ok"]
    compare = len(ok) >= MIN_TOMOGRAMS_FOR_MEDIANS
    median_count = float(np.median([r.n_final for r in ok])) if ok else 0.0
    found = [r.median_radius_nm for r in ok if np.isfinite(r.median_radius_nm)]
    median_radius = float(np.median(found)) if found else float("nan")
    median_threshold = float(np.median([r.threshold for r in ok])) if ok else float("nan")
    checked = []
    for row in rows:
        checks = list(row.warnings)
        if row.status != "ok":
            checks.insert(0, f"failed: {row.error}")
        elif row.n_final == 0:
            checks.append("no vesicles found")
        else:
            if compare and not median_count / COUNT_RATIO <= row.n_final <= median_count * COUNT_RATIO:
                checks.append(f"{row.n_final} vesicles against a run median of {median_count:g}")
            if compare and not median_radius / RADIUS_RATIO <= row.median_radius_nm <= median_radius * RADIUS_RATIO:
                checks.append(f"median radius {row.median_radius_nm:.1f} nm against a run median of "
                              f"{median_radius:.1f} nm")
            if compare and abs(row.threshold - median_threshold) > THRESHOLD_DIFFERENCE:
                checks.append(f"threshold {row.threshold:.2f} against a run median of {median_threshold:.2f}")
            if row.n_removed > REMOVED_FRACTION * row.n_candidates:
                checks.append(f"{row.n_removed} of {row.n_candidates} candidates removed")
        checked.append(IndexRow(**{**row.__dict__, "checks": tuple(checks)}))
    return checked


def write_index(out_dir) -> Path:
    """Write `report/run.png` and `report/index.html` over every tomogram in `out_dir`; returns the html's path."""
    out_dir = Path(out_dir)
    report_dir = out_dir / REPORT_DIR
    rows = read_rows(out_dir)
    _write_run_figure(out_dir, rows, report_dir / "run.png")
    page = _page(out_dir, rows, report_dir)
    path = report_dir / "index.html"
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _write_run_figure(out_dir: Path, rows: list[IndexRow], path: Path) -> None:
    from matplotlib.figure import Figure

    ok = [r for r in rows if r.status == "ok"]
    radius, correlation, outcome = [], [], []
    for row in ok:
        table = pq.read_table(out_dir / "vesicles" / f"{row.name}.parquet",
                              columns=["outcome", "radius_nm", "profile_correlation"])
        radius.append(table.column("radius_nm").to_numpy(zero_copy_only=False))
        correlation.append(table.column("profile_correlation").to_numpy(zero_copy_only=False))
        outcome.append(outcomes(table))
    radius, correlation, outcome = (np.concatenate(a) if a else np.empty(0) for a in (radius, correlation, outcome))
    figure = Figure(figsize=(15, 3.2), layout="constrained")
    axes = figure.subplots(1, 3)
    counts = [r.n_final for r in ok]
    if len(ok) <= MAX_NAMED_BARS:
        axes[0].bar(range(len(ok)), counts, color=[_FLAGGED_COLOR if r.checks else OUTCOME_COLORS["kept"] for r in ok])
        axes[0].set_xticks(range(len(ok)), [r.name for r in ok], rotation=45, ha="right", fontsize=8)
        axes[0].set_ylabel("vesicles")
        axes[0].set_title("vesicles per tomogram (amber: has checks)", fontsize=10)
    else:
        axes[0].hist(counts, bins=30, color=OUTCOME_COLORS["kept"])
        axes[0].set_xlabel("vesicles per tomogram")
        axes[0].set_ylabel("tomograms")
    for ax, values, label in ((axes[1], radius, "radius (nm)"), (axes[2], correlation, "profile correlation")):
        groups = [values[(outcome == o) & np.isfinite(values)] for o in OUTCOME_COLORS]
        if sum(len(g) for g in groups):
            ax.hist(groups, bins=30, stacked=True, color=list(OUTCOME_COLORS.values()), label=list(OUTCOME_COLORS))
        ax.set_xlabel(label)
        ax.set_ylabel("vesicles")
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{len(ok)} of {len(rows)} tomograms segmented, {sum(counts)} vesicles", fontsize=11)
    save_png(figure, path, dpi=80)


_COLUMNS = (("tomogram", "text"), ("vesicles", "num"), ("repaired", "num"), ("removed", "num"),
            ("candidates", "num"), ("median radius (nm)", "num"), ("threshold", "num"), ("seconds", "num"),
            ("checks and warnings", "num"))


def _page(out_dir: Path, rows: list[IndexRow], report_dir: Path) -> str:
    header = "".join(f'<th data-type="{kind}">{html.escape(title)}</th>' for title, kind in _COLUMNS)
    body = "\n".join(_table_row(row, report_dir) for row in rows)
    n_flagged = sum(bool(r.checks) for r in rows)
    title = html.escape(f"cryoves report: {out_dir.resolve()}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; vertical-align: middle; }}
th {{ cursor: pointer; background: #f0f0f0; position: sticky; top: 0; user-select: none; }}
th:after {{ content: " \\2195"; color: #aaa; }}
td.text, th.text {{ text-align: left; }}
tr.flagged {{ background: #fff4d6; }}
tr.failed {{ background: #ffe0e0; }}
td.checks {{ color: #a00000; text-align: left; max-width: 32em; }}
img.thumb {{ height: 110px; }}
</style></head><body>
<h1>{title}</h1>
<p>{len(rows)} tomograms; {n_flagged} with checks or warnings (tinted; failed runs in red). Click a column header
to sort; click a thumbnail for the tomogram's full report.</p>
<img src="run.png" alt="run-level histograms" style="max-width: 100%;">
<table id="tomograms"><thead><tr><th data-type="none">slice</th>{header}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>
document.querySelectorAll("#tomograms th").forEach(function (th, column) {{
  var type = th.dataset.type;
  if (type === "none") return;
  th.addEventListener("click", function () {{
    var body = document.querySelector("#tomograms tbody");
    var rows = Array.from(body.rows);
    var ascending = th.dataset.order !== "ascending";
    th.dataset.order = ascending ? "ascending" : "descending";
    rows.sort(function (a, b) {{
      var x = a.cells[column].dataset.sort, y = b.cells[column].dataset.sort, order;
      if (type === "num") {{
        x = isNaN(parseFloat(x)) ? -Infinity : parseFloat(x);
        y = isNaN(parseFloat(y)) ? -Infinity : parseFloat(y);
        order = x < y ? -1 : x > y ? 1 : 0;
      }} else {{
        order = x.localeCompare(y);
      }}
      return ascending ? order : -order;
    }});
    rows.forEach(function (row) {{ body.appendChild(row); }});
  }});
}});
</script>
</body></html>
"""


def _table_row(row: IndexRow, report_dir: Path) -> str:
    name = html.escape(row.name)
    png, thumb = report_dir / f"{row.name}.png", report_dir / f"{row.name}.thumb.png"
    image = (f'<a href="{html.escape(png.name)}"><img class="thumb" src="{html.escape(thumb.name)}" '
             f'alt="{name}" loading="lazy"></a>' if thumb.is_file() else "")
    link = f'<a href="{html.escape(png.name)}">{name}</a>' if png.is_file() else name
    ok = row.status == "ok"
    cells = [(link, row.name, "text"), *((str(v) if ok else "", v if ok else "", "num")
                                          for v in (row.n_final, row.n_repaired, row.n_removed, row.n_candidates)),
             (_number(row.median_radius_nm, 1), row.median_radius_nm, "num"),
             (_number(row.threshold, 3), row.threshold, "num"), (_number(row.seconds, 1), row.seconds, "num"),
             ("<br>".join(html.escape(c) for c in row.checks), len(row.checks), "checks")]
    tds = "".join(f'<td class="{kind}" data-sort="{html.escape(str(key))}">{shown}</td>' for shown, key, kind in cells)
    css = "failed" if not ok else "flagged" if row.checks else ""
    return f'<tr class="{css}"><td class="text" data-sort="">{image}</td>{tds}</tr>'


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else ""
