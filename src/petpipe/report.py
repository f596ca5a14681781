"""The self-contained HTML report: every image is inlined (base64), no external files."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table_html(rows: Sequence[dict], columns: Sequence[str], float_fmt: str = "{:.3f}") -> str:
    def cell(v: object) -> str:
        return html.escape(float_fmt.format(v) if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} section{margin:2em 0}
table{border-collapse:collapse;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} img{max-width:100%}
.cards{display:flex;gap:1em;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
.card b{display:block;font-size:1.5em}
"""


def render_html(title: str, summary: dict[str, str], sections: Sequence[tuple[str, str]]) -> str:
    """A complete HTML page: summary cards, then (heading, trusted HTML body) sections."""
    cards = "".join(f'<div class="card">{html.escape(k)}<b>{html.escape(v)}</b></div>' for k, v in summary.items())
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{content}</section>" for h, content in sections)
    # No timestamp: the same model and data give the same page, byte for byte (DVC and git see no change).
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<div class="cards">{cards}</div>{body}</body></html>\n'
    )
