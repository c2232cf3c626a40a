"""The lab index students land on: every lab with its title and one line, linking to its
dashboard and to the same notebook in JupyterLab (core/lab_index.py), and its staging beside
the labs (tasks/notebooks.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from core.config import load_site
from core.files import sha256_file
from core.lab_index import index_notebook
from core.models import LabSource
from tasks.notebooks import discover_labs, stage_index, stage_lab
from tests.conftest import REPO

FRONT = """---
jupytext:
  notebook_metadata_filter: olab
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
    jupytext_version: 1.19.6
kernelspec:
  display_name: Python 3 (ipykernel)
  language: python
  name: python3
{olab}---
"""


def myst_lab(folder: Path, name: str, body: str, summary: str | None = None) -> LabSource:
    olab = f"olab:\n  summary: {summary}\n" if summary else ""
    path = folder / f"{name}.md"
    path.write_text(FRONT.format(olab=olab) + "\n" + body)
    return LabSource(name=name, path=path, content_hash=sha256_file(path))


def index_text(labs: list[LabSource]) -> str:
    notebook = nbformat.reads(index_notebook(labs), as_version=4)
    nbformat.validate(notebook)
    assert [cell.cell_type for cell in notebook.cells] == ["markdown"], "the index runs no code"
    return notebook.cells[0].source


def test_each_lab_has_its_title_its_line_and_two_relative_links(tmp_path):
    labs = [
        myst_lab(tmp_path, "waves", "# Standing waves on a string\n\nIntro text.\n", summary="Nodes, modes and frequencies."),
        myst_lab(tmp_path, "decay", "# Radioactive decay\n\nMore text.\n", summary="Count nuclei as they decay."),
    ]
    text = index_text(labs)
    # Sorted by name; the title opens the dashboard beside the index (voila/render/labs/),
    # "notebook" the file in JupyterLab at the server's root.
    assert text.index("Radioactive decay") < text.index("Standing waves")
    assert "**[Standing waves on a string](waves.ipynb)** ([notebook](../../../lab/tree/labs/waves.ipynb))" in text
    assert "**[Radioactive decay](decay.ipynb)** ([notebook](../../../lab/tree/labs/decay.ipynb))" in text
    assert "  Nodes, modes and frequencies." in text.splitlines()
    assert "  Count nuclei as they decay." in text.splitlines()


def test_the_same_labs_give_the_same_bytes(tmp_path):
    labs = [myst_lab(tmp_path, "waves", "# Waves\n\nText.\n", summary="One line.")]
    assert index_notebook(labs) == index_notebook(list(reversed(labs))) == index_notebook(labs)


def test_without_a_summary_the_first_sentence_of_prose_and_without_a_heading_the_name(tmp_path):
    labs = [
        myst_lab(
            tmp_path,
            "orbit",
            "# Kepler orbits\n\n$$\nr = \\frac{p}{1 + e \\cos\\theta}\n$$\n\n"
            "A planet moves on an ellipse. The Sun sits at one focus.\n",
        ),
        myst_lab(tmp_path, "untitled", "Only prose here, and no heading at all. More.\n"),
    ]
    lines = index_text(labs).splitlines()
    assert "  A planet moves on an ellipse." in lines, "the formula is skipped, the first sentence kept"
    assert any(line.startswith("- **[untitled](untitled.ipynb)**") for line in lines)
    assert "  Only prose here, and no heading at all." in lines


def test_a_title_cannot_break_out_of_its_link(tmp_path):
    labs = [myst_lab(tmp_path, "brackets", "# Fits [with] errors\n\nText.\n", summary="Line.")]
    assert "**[Fits \\[with\\] errors](brackets.ipynb)**" in index_text(labs)


def test_an_ipynb_lab_is_listed_from_its_metadata(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# Projectile motion\n\nThrow things."), nbformat.v4.new_code_cell("1 + 1")],
        metadata={"olab": {"summary": "Parabolas with air drag."}},
    )
    path = tmp_path / "projectile.ipynb"
    nbformat.write(notebook, path)
    text = index_text([LabSource(name="projectile", path=path, content_hash=sha256_file(path))])
    assert "**[Projectile motion](projectile.ipynb)**" in text
    assert "  Parabolas with air drag." in text.splitlines()


def test_the_index_is_marked_as_olabs_page_with_a_kernel(tmp_path):
    notebook = json.loads(index_notebook([myst_lab(tmp_path, "waves", "# Waves\n", summary="Line.")]))
    # The template leaves out "open as notebook" and the spawn refreshes it by this mark.
    assert notebook["metadata"]["olab"] == {"index": True}
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


def test_every_lab_in_the_repository_has_a_title_and_a_summary():
    labs = discover_labs(REPO / "labs")
    lines = index_text(labs).splitlines()
    for lab in labs:
        entry = next(i for i, line in enumerate(lines) if f"]({lab.name}.ipynb)" in line)
        assert not lines[entry].startswith(f"- **[{lab.name}]"), f"{lab.name} has no '# ' title"
        summary = lines[entry + 1]
        assert summary.startswith("  ") and len(summary.strip()) > 20, f"{lab.name} has no summary"
    source = (REPO / "labs" / "lorenz.md").read_text()
    assert "olab:\n  summary:" in source, "the summaries are the labs' own front matter"


def test_a_lab_named_index_is_refused_in_one_line(tmp_path):
    myst_lab(tmp_path, "waves", "# Waves\n")
    myst_lab(tmp_path, "index", "# My own index\n")
    with pytest.raises(ValueError) as refused:
        discover_labs(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert "index.md" in message and "cannot be named 'index'" in message


def test_the_index_is_staged_beside_the_labs_and_rewritten_only_when_it_changes(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    labs = [myst_lab(source, "waves", "# Waves\n", summary="First line.")]
    staged = tmp_path / "staged"
    for lab in labs:
        stage_lab(lab, staged)
    index = stage_index(labs, staged)
    assert index == staged / "index.ipynb"
    assert sorted(p.name for p in staged.iterdir()) == ["index.ipynb", "waves.ipynb"], "no temporary file left"
    os.utime(index, (1, 1))
    stage_index(labs, staged)
    assert index.stat().st_mtime == 1, "an unchanged index is not written again"
    labs = [myst_lab(source, "waves", "# Waves\n", summary="Second line.")]
    stage_index(labs, staged)
    assert "Second line." in index.read_text() and index.stat().st_mtime != 1


def test_each_start_writes_the_index_again_and_leaves_the_students_labs(make_site, tmp_path):
    """The hub's spawn-time copy (jupyterhub_config._give_labs): labs are the student's once
    copied, the index is olab's and replaced at each start, never written through a link."""
    from types import SimpleNamespace as ns

    from tests.tasks.test_local_hub import VENV, hub_config, render

    site = load_site(str(make_site("idx")))
    source, staged, homes = tmp_path / "src", tmp_path / "staged", tmp_path / "homes"
    source.mkdir()
    (homes / "ann").mkdir(parents=True)
    labs = [myst_lab(source, "waves", "# Waves\n", summary="First line.")]
    stage_lab(labs[0], staged)
    stage_index(labs, staged)
    _, scope, _ = hub_config(tmp_path, {**render(site, VENV), "homes": str(homes), "labs": str(staged)})
    warnings = []
    ann = ns(user=ns(name="ann"), log=ns(warning=lambda *args: warnings.append(args[0] % args[1:])))
    give = scope["_give_labs"]

    give(ann)
    mine = homes / "ann" / "labs"
    assert sorted(p.name for p in mine.iterdir()) == ["index.ipynb", "waves.ipynb"]
    (mine / "waves.ipynb").write_text("ann's own work")
    (mine / "index.ipynb").write_text("ann's scribbles")
    labs = [myst_lab(source, "waves", "# Waves\n", summary="Second line.")]
    stage_lab(labs[0], staged)
    stage_index(labs, staged)
    give(ann)
    assert (mine / "waves.ipynb").read_text() == "ann's own work", "a student's lab is never overwritten"
    assert (mine / "index.ipynb").read_bytes() == (staged / "index.ipynb").read_bytes(), "the index is this release's"
    assert "Second line." in (mine / "index.ipynb").read_text()

    secret = tmp_path / "shadow"
    secret.write_text("root's")
    (mine / "index.ipynb").unlink()
    (mine / "index.ipynb").symlink_to(secret)
    give(ann)
    assert secret.read_text() == "root's", "the refresh wrote through the student's link"
    assert not (mine / "index.ipynb").is_symlink() and (mine / "index.ipynb").read_bytes() == (staged / "index.ipynb").read_bytes()

    (mine / "index.ipynb").unlink()
    (mine / "index.ipynb").mkdir()
    give(ann)  # a folder in its place: the start goes on, the hub's log says so
    assert (mine / "index.ipynb").is_dir() and warnings and "labs/index.ipynb not refreshed" in warnings[0]
    assert sorted(p.name for p in mine.iterdir()) == ["index.ipynb", "waves.ipynb"], "no temporary file left"
