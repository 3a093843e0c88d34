"""``report.html``: the comparison table, the figures embedded (one self-contained file, which the
MLflow UI shows inline as an artifact), and a link to every run of each group in the MLflow UI."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.key { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.85em; }
"""


def run_links(summary_row: dict[str, Any], ui: str) -> str:
    """Links to each run of a group in the MLflow UI (``ui``: its address)."""
    experiment = summary_row.get("experiment_id", "")
    ids = [i for i in summary_row.get("run_ids", "").split() if i]
    links = [f'<a href="{html.escape(ui)}/#/experiments/{experiment}/runs/{i}">{i[:8]}</a>' for i in ids]
    return " ".join(links)


def write_html(path: Path, title: str, header: list[str], rows: list[list[str]], summary: list[dict[str, Any]],
               figures: list[Path], ui: str, note: str) -> Path:  # fmt: skip
    """Write the page; the figures are embedded as base64 PNGs, so the file stands alone."""
    keys = len(header) - 6  # the leading columns are config keys (left-aligned)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*header, "runs (MLflow UI)"])
    body = []
    for cells, s in zip(rows, summary, strict=True):
        tds = "".join(f'<td{" class=key" if i < keys else ""}>{html.escape(c)}</td>' for i, c in enumerate(cells))
        body.append(f"<tr>{tds}<td class=key>{run_links(s, ui)}</td></tr>")
    images = "".join(
        f'<h2>{html.escape(p.stem)}</h2><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in figures
    )
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table><p class=note>{html.escape(note)}</p>{images}</body></html>")  # fmt: skip
    path.write_text(page)
    return path
