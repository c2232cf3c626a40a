"""The lab index: the page a student lands on, every lab with its title and one line.

It is a notebook of markdown only, rendered by Voilà with O-Lab's template at
``voila/render/labs/index.ipynb`` beside the labs (the site's default URL), so its links
are relative: a lab's title opens its dashboard, "notebook" the same file in JupyterLab.
A lab's title is its first ``# `` heading; its line is the ``olab: {summary: ...}`` key of
its front matter (jupytext keeps it as the notebook's ``olab`` metadata), else the first
sentence of its prose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

import jupytext
import nbformat

from core.models import LabSource

# The index's file name (without .ipynb) beside the labs; no lab may take it.
INDEX_NAME = "index"
INDEX_TITLE = "Labs"
# From voila/render/labs/ up to the server's root, where JupyterLab's /lab lives.
NOTEBOOK_VIEW = "../../../lab/tree/labs/"

_SENTENCE_END = re.compile(r"(?<=[.!?:])\s")


@dataclass(frozen=True)
class LabEntry:
    name: str
    title: str
    summary: str


def read_lab(lab: LabSource) -> nbformat.NotebookNode:
    """The lab as the notebook kernels and Voilà read (a MyST .md through jupytext)."""
    if lab.path.suffix == ".md":
        return jupytext.read(lab.path)
    return nbformat.read(lab.path, as_version=4)


def lab_entry(name: str, notebook: nbformat.NotebookNode) -> LabEntry:
    prose = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    lines = [line for source in prose for line in source.splitlines()]
    title = next((line[2:].strip() for line in lines if line.startswith("# ")), name)
    summary = str((notebook.metadata.get("olab") or {}).get("summary") or "").strip()
    return LabEntry(name=name, title=title, summary=" ".join(summary.split()) or _first_sentence(prose))


def _first_sentence(prose: list[str]) -> str:
    """The first sentence of the first paragraph that is text (not a heading, formula or code)."""
    for source in prose:
        for paragraph in re.split(r"\n\s*\n", source):
            text = " ".join(paragraph.split())
            if text and not text.startswith(("#", "$$", "```", "<", "|", ">")):
                return _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(":")
    return ""


def _link_text(text: str) -> str:
    """Text that stays inside a markdown link's brackets."""
    return re.sub(r"([\\\[\]])", r"\\\1", text)


def index_markdown(entries: list[LabEntry]) -> str:
    lines = [
        f"# {INDEX_TITLE}",
        "",
        "Each lab opens as a dashboard; *notebook* opens the same lab in JupyterLab, with its code.",
        "",
    ]
    for entry in entries:
        href = quote(f"{entry.name}.ipynb")
        link = f"- **[{_link_text(entry.title)}]({href})** ([notebook]({NOTEBOOK_VIEW}{href}))"
        # Two trailing spaces: a line break, the summary on a line of its own under the title.
        lines += [f"{link}  ", f"  {entry.summary}"] if entry.summary else [link]
    return "\n".join(lines) + "\n"


def index_notebook(labs: list[LabSource]) -> str:
    """The index of ``labs`` as nbformat JSON text: the same labs give the same bytes."""
    entries = [lab_entry(lab.name, read_lab(lab)) for lab in sorted(labs, key=lambda lab: lab.name)]
    cell = nbformat.v4.new_markdown_cell(index_markdown(entries), id="olab-lab-index")
    notebook = nbformat.v4.new_notebook(
        cells=[cell],
        metadata={
            # Voilà starts a kernel for every page it renders, even one of markdown only.
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            # O-Lab's template shows no "open as notebook" link on olab's own page.
            "olab": {"index": True},
        },
    )
    return nbformat.writes(notebook)
