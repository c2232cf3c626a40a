"""Lab notebooks: found in labs/, staged as .ipynb, executed in a user environment.

Execution happens in a child process running the environment's own Python
(``olab/labrunner.py``), so a lab sees exactly the packages the hub's users see.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import nbformat
from prefect import task
from prefect.cache_policies import NO_CACHE
from core.logs import task_logger

from core.files import atomic_write, sha256_file, write_json
from core.lab_index import INDEX_NAME, index_notebook, read_lab
from core.models import ImageRef, LabResult, LabSource
from core.runner import CommandError, run
from tasks.oci import Engine

LAB_SUFFIXES = (".md", ".ipynb")


def _is_lab(path: Path) -> bool:
    if path.suffix == ".ipynb":
        return True
    head = path.read_text(encoding="utf-8", errors="replace")[:2000]
    # A MyST notebook opens with front matter naming its kernel; README.md does not.
    return head.startswith("---") and "kernelspec:" in head


def discover_labs(folder: Path, only: list[str] | None = None) -> list[LabSource]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: labs folder does not exist")
    labs = [
        LabSource(name=p.stem, path=p, content_hash=sha256_file(p))
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in LAB_SUFFIXES and _is_lab(p)
    ]
    names = [lab.name for lab in labs]
    if INDEX_NAME in names:
        taken = next(lab.path for lab in labs if lab.name == INDEX_NAME)
        raise ValueError(f"{taken}: a lab cannot be named {INDEX_NAME!r}, the lab index's name beside the labs; rename it")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{folder}: two labs share the name {', '.join(duplicates)} (one .md and one .ipynb?)")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"no lab named {', '.join(unknown)} in {folder} (labs: {', '.join(names)})")
        labs = [lab for lab in labs if lab.name in only]
    if not labs:
        raise ValueError(f"{folder}: no labs found (MyST .md notebooks or .ipynb files)")
    return labs


def stage_lab(lab: LabSource, dest: Path) -> Path:
    """Write the lab as a plain .ipynb (what kernels and Voilà read)."""
    return _write_notebook(dest / f"{lab.name}.ipynb", notebook_text(lab))


def stage_index(labs: list[LabSource], dest: Path) -> Path:
    """Write the lab index beside the staged labs (what students land on)."""
    return _write_notebook(dest / f"{INDEX_NAME}.ipynb", index_notebook(labs))


def _write_notebook(out: Path, text: str) -> Path:
    # Readers (a spawn copying the labs) see the old file or the new one, never half;
    # an unchanged one is not touched.
    if not out.exists() or out.read_text(encoding="utf-8") != text:
        atomic_write(out, text)
    return out


def notebook_text(lab: LabSource) -> str:
    """The lab as .ipynb text (what kernels and Voilà read), from its MyST or notebook file;
    the same text for the same file (cell ids by position, where jupytext draws random ones),
    so an unchanged lab is an unchanged release."""
    notebook = read_lab(lab)
    if lab.path.suffix == ".md":
        for number, cell in enumerate(notebook.cells, 1):
            cell["id"] = f"cell-{number}"
    return nbformat.writes(notebook)


def labrunner_script() -> Path:
    return Path(str(resources.files("core").joinpath("labrunner.py")))


def cached_result(cache: Path, key: str) -> LabResult | None:
    path = cache / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return LabResult.model_validate_json(path.read_text())
    except ValueError:
        return None


def store_result(cache: Path, key: str, result: LabResult) -> None:
    write_json(cache / f"{key}.json", result.model_dump(mode="json"))


RUNNER_IN_CONTAINER = "/opt/olab-runner/labrunner.py"


def lab_command(
    image: ImageRef, lab: LabSource, notebook: Path, cell_timeout: int, work_dir: Path, engine: Engine | None
) -> tuple[list[str], dict[str, str]]:
    """How to run one lab: with the venv's Python, or in a throwaway container of the image."""
    runner_args = ["--name", lab.name, "--timeout", str(cell_timeout)]
    if engine is not None:
        argv = engine.run_prefix([(notebook.parent, "/labs"), (labrunner_script(), RUNNER_IN_CONTAINER)])
        argv += ["-e", "MPLBACKEND=agg", image.pinned, "python3", RUNNER_IN_CONTAINER, f"/labs/{notebook.name}", *runner_args]
        return argv, engine.env
    env = private_lab_env(image.bin, work_dir)
    return [str(image.python), str(labrunner_script()), str(notebook), *runner_args], env


def private_lab_env(bin_dir: Path, home: Path) -> dict[str, str]:
    """A private Jupyter/IPython home: no user-level kernelspec can shadow the environment's."""
    return {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "JUPYTER_DATA_DIR": str(home / "jupyter-data"),
        "JUPYTER_CONFIG_DIR": str(home / "jupyter-config"),
        "IPYTHONDIR": str(home / "ipython"),
        "MPLBACKEND": "agg",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }


@task(name="run-lab", cache_policy=NO_CACHE, task_run_name="run-lab-{lab.name}")
def run_lab(image: ImageRef, lab: LabSource, notebook: Path, cell_timeout: int, engine: Engine | None = None) -> LabResult:
    """Execute one staged lab in the image; never raises for a lab failure."""
    logger = task_logger()
    with tempfile.TemporaryDirectory(prefix=f"olab-lab-{lab.name}-") as work:
        argv, env = lab_command(image, lab, notebook, cell_timeout, Path(work), engine)
        # The per-cell timeout bounds each cell; this bounds a kernel that never starts.
        try:
            out = run(argv, cwd=Path(work), env=env, check=False, timeout=cell_timeout * 4 + 120)
        except CommandError as exc:
            return LabResult(lab=lab.name, status="timeout", seconds=0.0, error=str(exc))
    last = out.output.strip().splitlines()[-1] if out.output.strip() else ""
    try:
        result = LabResult.model_validate(json.loads(last))
    except ValueError:
        tail = " | ".join(out.output.strip().splitlines()[-3:])
        result = LabResult(lab=lab.name, status="error", seconds=out.seconds, error=f"lab runner failed: {tail}")
    if result.passed:
        logger.info(result.describe())
    else:
        logger.error("\n".join(result.failure_lines()))
    return result
