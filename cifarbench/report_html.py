"""``DIR/index.html``: one self-contained page per analysis, to open from the file system.

No server, no network: no external CSS, fonts or scripts (the style sheet is inline, there is no JavaScript).
Figures are linked by a path relative to the page when they lie in its folder (the page and its PNGs travel
together), else embedded as base64 PNG. Every number in a table is written with its exact value in a
``data-value`` attribute next to the rounded text, so a reader (or a test) can check the page against the JSON.

``write_index(out_dir, title, provenance, sections, result=None)``; a section is a dict with any of

- ``"title"``: its heading; ``"text"``: a paragraph (plain text, escaped);
- ``"figures"``: paths, or dicts ``{"path": ..., "caption": ..., "embed": bool}``;
- ``"tables"`` (or one ``"table"``): dicts ``{"columns": [...], "rows": [[...], ...], "caption": ...}``, or a
  list of row dicts (the columns are their keys, in order).
"""
from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import urllib.parse
from pathlib import Path

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}td.num{text-align:right}th{background:#f4f4f4}
figure{margin:1em 0}figure img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}pre,code{background:#f6f6f6;font-size:.9em}pre{padding:.6em;overflow-x:auto}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:.1em 1em}dl.prov dt{font-weight:600}
dl.prov dd{margin:0;word-break:break-all}
""".strip()


def format_number(value, digits: int = 4) -> str:
    """How a table shows a number: integers whole (thousands separated), floats rounded to ``digits``
    significant figures (never scientific notation between 1e-4 and 1e6)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-4 <= abs(value) < 1e6:
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(value)))) if value else 0
        text = f"{value:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value:.{digits - 1}e}"


def _cell(value) -> str:
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        exact = json.dumps(int(value) if isinstance(value, numbers.Integral) else float(value))
        return f'<td class="num" data-value="{html.escape(exact)}">{html.escape(format_number(value))}</td>'
    if value is None:
        return "<td></td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(table) -> str:
    if isinstance(table, list):
        columns = list(dict.fromkeys(k for row in table for k in row))
        table = {"columns": columns, "rows": [[row.get(c) for c in columns] for row in table]}
    out = ["<table>"]
    if table.get("caption"):
        out.append(f"<caption>{html.escape(str(table['caption']))}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table["columns"])
               + "</tr></thead><tbody>")
    for row in table["rows"]:
        out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _figure(fig, out_dir: Path) -> str:
    if not isinstance(fig, dict):
        fig = {"path": fig}
    path = Path(fig["path"])
    # a relative path is the page's own (``confusion.png``), unless it was built as ``out / name`` from a relative
    # --out (``abl1/confusion.png`` with out_dir ``abl1``): that one is relative to the working folder already
    inside = out_dir.parts and path.parts[:len(out_dir.parts)] == out_dir.parts
    full = path if path.is_absolute() or inside else out_dir / path
    caption = fig.get("caption") or ""
    alt = html.escape(caption or path.name, quote=True)
    try:
        rel = Path(os.path.relpath(full.resolve(), out_dir.resolve()))
    except ValueError:  # another drive on Windows
        rel = None
    if not fig.get("embed") and rel is not None and not rel.parts[0] == "..":
        # a URL, not a path: "#", "?" and "%" in a file name would cut or change the link
        src = html.escape(urllib.parse.quote(rel.as_posix()), quote=True)
    else:
        src = "data:image/png;base64," + base64.b64encode(full.read_bytes()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{alt}">{cap}</figure>'


def _provenance(prov: dict) -> str:
    rows = []
    for key, value in (prov or {}).items():
        if key == "command":
            continue
        if isinstance(value, (dict, list)):
            text = f"<code>{html.escape(json.dumps(value, sort_keys=True))}</code>"
        else:
            text = html.escape("" if value is None else str(value))
        rows.append(f"<dt>{html.escape(str(key))}</dt><dd>{text}</dd>")
    return '<dl class="prov">' + "".join(rows) + "</dl>"


def render_index(title: str, provenance: dict, sections: list[dict], out_dir: str | Path = ".",
                 result=None) -> str:
    """The page as a string (see :func:`write_index`)."""
    out_dir = Path(out_dir)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    command = (provenance or {}).get("command")
    if command:
        parts.append(f'<p>Made by:</p><pre class="command">{html.escape(str(command))}</pre>')
    for section in sections:
        if section.get("title"):
            parts.append(f"<h2>{html.escape(str(section['title']))}</h2>")
        if section.get("text"):
            parts.append(f"<p>{html.escape(str(section['text']))}</p>")
        for fig in section.get("figures") or ():
            parts.append(_figure(fig, out_dir))
        tables = list(section.get("tables") or ())
        if section.get("table") is not None:
            tables.append(section["table"])
        for table in tables:
            parts.append(_table(table))
    parts.append("<h2>Provenance</h2>")
    parts.append(_provenance(provenance))
    if result is not None:
        # the full result, as data (a JSON script block is never executed); "</" is escaped so it cannot end
        # the element early
        from .io import to_json

        data = to_json(result).replace("</", "<\\/")
        parts.append(f'<script type="application/json" id="result">{data}</script>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_index(out_dir, title: str, provenance: dict, sections: list[dict], result=None) -> Path:
    """Write ``out_dir/index.html`` atomically and return its path. Figures must already exist (they are
    linked relative when inside ``out_dir``, embedded otherwise)."""
    from .io import write_text

    out_dir = Path(out_dir)
    path = out_dir / "index.html"
    write_text(path, render_index(title, provenance, sections, out_dir, result))
    return path
