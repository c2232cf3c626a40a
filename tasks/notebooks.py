"""Lab notebooks: found in labs/, staged as .ipynb, executed in a user environment.

Execution happens in a child process running the environment's own Python
(``core/labrunner.py``; for an OCI image, in one container of it for all the labs of a
run), so a lab sees exactly the packages the hub's users see.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import nbformat
from prefect import task
from prefect.cache_policies import NO_CACHE
from core.logs import task_logger

from core.files import atomic_write, sha256_file, write_json
from core.labrunner import RESULT_MARK
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
LABS_IN_CONTAINER = "/labs"


def labs_command(
    image: ImageRef, notebooks: list[Path], cell_timeout: int, parallelism: int, work_dir: Path, engine: Engine | None
) -> tuple[list[str], dict[str, str]]:
    """How to run the labs: the lab runner with the venv's Python, or in ONE throwaway
    container of the image (labs read-only, no network) for all of them."""
    folders = {notebook.parent for notebook in notebooks}
    if len(folders) != 1:
        raise ValueError(f"the labs of one run are staged in one folder, not {len(folders)}")
    runner_args = ["--timeout", str(cell_timeout), "--parallel", str(parallelism)]
    if engine is not None:
        argv = engine.run_prefix([(folders.pop(), LABS_IN_CONTAINER), (labrunner_script(), RUNNER_IN_CONTAINER)])
        argv += ["-e", "MPLBACKEND=agg", image.pinned, "python3", RUNNER_IN_CONTAINER, *runner_args]
        return argv + [f"{LABS_IN_CONTAINER}/{notebook.name}" for notebook in notebooks], engine.env
    # Alone in its folder, as in the container: a script's folder comes first on its
    # sys.path, and olab's core/ would shadow the standard library there (core/secrets.py).
    runner = work_dir / "runner" / "labrunner.py"
    runner.parent.mkdir()
    shutil.copyfile(labrunner_script(), runner)
    env = private_lab_env(image.bin, work_dir)
    return [str(image.python), str(runner), *runner_args, *map(str, notebooks)], env


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


def runner_result(line: str) -> LabResult | None:
    """One lab's result, from the lab runner's line for it (None for any other line)."""
    if not line.startswith(RESULT_MARK + " "):
        return None
    try:
        return LabResult.model_validate(json.loads(line[len(RESULT_MARK) + 1 :]))
    except ValueError:
        return None


@task(name="run-labs", cache_policy=NO_CACHE)
def run_labs(
    image: ImageRef, notebooks: list[Path], cell_timeout: int, parallelism: int, engine: Engine | None = None
) -> list[LabResult]:
    """Execute the staged labs in the image, ``parallelism`` at a time, each in a kernel of
    its own (core/labrunner.py); one result per lab in the order given, never raises for a
    lab failure. Each lab is logged as it ends."""
    logger = task_logger()
    names = [notebook.stem for notebook in notebooks]
    results: dict[str, LabResult] = {}

    def on_line(line: str) -> None:
        result = runner_result(line)
        if result is None:
            if line.startswith("labrunner: "):
                logger.info(line)
            return
        results[result.lab] = result
        done = f"({len(results)}/{len(names)})"
        if result.passed:
            logger.info("%s %s", result.describe(), done)
        else:
            logger.error("\n".join([f"{result.describe()} {done}", *result.failure_lines()[1:]]))

    # The per-cell timeout bounds each cell; this bounds a runner that never ends: every
    # lab's own bound (a kernel that never starts included), one lab after the other.
    bound = (cell_timeout * 4 + 120) * len(notebooks)
    with tempfile.TemporaryDirectory(prefix="olab-labs-run-") as work:
        argv, env = labs_command(image, notebooks, cell_timeout, parallelism, Path(work), engine)
        try:
            out = run(argv, cwd=Path(work), env=env, check=False, timeout=bound, on_line=on_line)
            missing = LabResult(lab="", status="error", seconds=out.seconds,
                                error="lab runner failed: " + " | ".join(out.output.strip().splitlines()[-3:]))
        except CommandError as exc:
            missing = LabResult(lab="", status="timeout", seconds=float(bound), error=str(exc))
    for name in names:
        if name not in results:
            results[name] = missing.model_copy(update={"lab": name})
            logger.error(results[name].describe())
    return [results[name] for name in names]
