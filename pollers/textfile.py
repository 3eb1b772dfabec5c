"""Prometheus figures as a textfile, for node_exporter's textfile collector:
how the edge agent (on site, with no HTTP listener of its own) is scraped.
Written to a temporary file and renamed, so a scrape never reads half a file."""
from __future__ import annotations

from pathlib import Path


def render(prefix: str, figures) -> str:
    """``figures``: (name, "gauge" or "counter", help text, value) each."""
    lines = []
    for name, kind, doc, value in figures:
        lines += [f"# HELP {prefix}{name} {doc}", f"# TYPE {prefix}{name} {kind}",
                  f"{prefix}{name} {value}"]
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, prefix: str, figures) -> None:
    """Replace ``path`` with the rendered figures; OSError if it cannot."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(render(prefix, figures))
    tmp.replace(path)
