"""What every analysis command adds to its outputs: the provenance block in its JSON and, with ``--out``, the
``index.html`` page (:mod:`cifarbench.report_html`) that shows its figures, tables, provenance and result."""
from __future__ import annotations

from pathlib import Path

INDEX = "index.html"


def command_provenance(model=None, data=None, backend=None, precision=None, device=None, extra=None) -> dict:
    """:func:`cifarbench.provenance.provenance` with the command line of the running ``cifarbench`` call (the
    arguments ``cli.main`` got, also when called in-process)."""
    from .. import cli
    from ..provenance import provenance

    return provenance(command_line=cli.COMMAND_LINE, model=model, data=data, backend=backend,
                      precision=precision, device=device, extra=extra)


def figure_caption(prov: dict, changed: str | None = None) -> str:
    from ..provenance import caption

    return caption(prov, changed)


def write_page(out: Path | None, title: str, prov: dict, sections: list[dict], result) -> Path | None:
    """``out/index.html`` (None without ``--out``); figures that do not exist (a figure skipped for lack of
    images) are left out rather than linked broken."""
    if out is None:
        return None
    from ..report_html import write_index

    kept = []
    for section in sections:
        figs = [f for f in section.get("figures") or () if Path(f["path"] if isinstance(f, dict) else f).is_file()]
        kept.append({**section, "figures": figs})
    return write_index(out, title, prov, kept, result=result)


def write_page_file(path: Path, title: str, prov: dict, sections: list[dict], result) -> Path:
    """The same page under another name (bench's ``--out`` is a file: ``run.json`` -> ``run.html``)."""
    from ..io import write_text
    from ..report_html import render_index

    write_text(path, render_index(title, prov, sections, path.parent, result))
    return path


def percent_rows(mapping: dict, columns=("class", "accuracy")) -> dict:
    """A table of ``{name: fraction}`` (fractions as in the JSON, so the page's numbers equal it)."""
    return {"columns": list(columns), "rows": [[k, v] for k, v in mapping.items()]}
