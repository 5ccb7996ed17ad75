"""Self-contained HTML tables for `snakemake --report`.

Snakemake 9's report shows PNG/SVG/JPEG, PDF and HTML results inline; any other file (CSV
included) only gets a download button. So each stage that has tables for the report writes
them, next to the CSVs, as one small HTML page (inline CSS, no scripts, no external files).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.atomic import atomic_path

STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
p.note { color: #555; }
"""


def format_value(value: object) -> str:
    """Numbers with 4 significant digits, NaN/None as an empty cell, the rest as text."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_html(table: pd.DataFrame) -> str:
    """One HTML <table> (no index column); an empty table keeps its header row."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False, name=None)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_tables(path: str | Path, title: str, tables: Mapping[str, pd.DataFrame],
                      notes: Sequence[str] = ()) -> None:
    """Write `tables` (heading -> table) as one HTML page, atomically; notes go on top."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    for heading, table in tables.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if table.empty:
            parts.append("<p class='note'>(no rows)</p>")
        parts.append(table_html(table))
    parts.append("</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(parts), encoding="utf-8")
