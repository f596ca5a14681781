"""The report page's HTML primitives: escaping, images, cards, tables (sortable), the page itself with its
style and script. No outside assets: the page is one self-contained file."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence


def esc(text: object) -> str:
    return html.escape(str(text))


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def cards(items: dict[str, str]) -> str:
    return (
        '<div class="cards">'
        + "".join(f'<div class="card">{esc(k)}<b>{esc(v)}</b></div>' for k, v in items.items())
        + "</div>"
    )


def table_html(
    rows: Sequence[dict], columns: Sequence[str], float_fmt: str = "{:.3f}", *, sortable: bool = False
) -> str:
    """A table, numbers right-aligned; ``sortable``: clicking a column header sorts the rows by it (numbers as
    numbers)."""

    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def cell(v: object) -> str:
        text = esc(float_fmt.format(v) if isinstance(v, float) else v)
        return f'<td class="num">{text}</td>' if number(v) else f"<td>{text}</td>"

    def head(c: str) -> str:
        numeric = ' class="num"' if rows and number(rows[0][c]) else ""
        label = f'<button type="button">{esc(c)}</button>' if sortable else esc(c)
        return f'<th{numeric} aria-sort="none">{label}</th>' if sortable else f"<th{numeric}>{label}</th>"

    body = "".join("<tr>" + "".join(cell(r[c]) for c in columns) + "</tr>" for r in rows)
    opening = '<table class="sortable">' if sortable else "<table>"
    return f"{opening}<thead><tr>{''.join(map(head, columns))}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} section{margin:2.5em 0} h3{font-size:1em;margin:1.2em 0 .4em}
nav{margin:.6em 0 1.5em;font-size:.9em} nav a{margin-right:.9em}
table{border-collapse:collapse;font-size:.85em} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} .num{text-align:right;font-variant-numeric:tabular-nums} img{max-width:100%}
th button{all:unset;cursor:pointer} th[aria-sort=ascending] button::after{content:" \\25B2"}
th[aria-sort=descending] button::after{content:" \\25BC"}
details{margin:.6em 0} .row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
.row img{max-width:calc(50% - 1em)} .cards{display:flex;gap:1em;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em} .card b{display:block;font-size:1.5em}
"""

# Sortable tables: click a header to sort by that column, again to reverse. Cells that read as numbers sort as numbers.
SORT_SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, col) => th.querySelector("button").addEventListener("click", () => {
    const dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    const key = (row) => {
      const text = row.cells[col].textContent.replace(/,/g, ""), n = Number(text);
      return text !== "" && !isNaN(n) ? n : text;
    };
    const rows = [...table.tBodies[0].rows].sort((a, b) => {
      const x = key(a), y = key(b);
      return dir * (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y)));
    });
    heads.forEach((h) => h.setAttribute("aria-sort", "none"));
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    table.tBodies[0].append(...rows);
  }));
}
"""


def render_html(title: str, headline_html: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A complete page: title, headline, a contents line, then (id, heading, trusted HTML body) sections."""
    nav = "".join(f'<a href="#{sid}">{esc(h.split(" (")[0])}</a>' for sid, h, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(h)}</h2>{content}</section>' for sid, h, content in sections)
    # No timestamp: the same model and data give the same page, byte for byte (DVC and git see no change).
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><p>{headline_html}</p><nav>{nav}</nav>{body}"
        f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )
