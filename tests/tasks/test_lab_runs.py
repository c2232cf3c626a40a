"""What a lab test means, now that every lab of a run goes through one lab runner (one
container of the image, or the venv's Python) and each lab's kernel is forked from a zygote
that did the imports the labs share: each lab still gets a kernel of its own with nothing
from another lab in it, a lab that times out does not stop the others, and inside the image
no lab has a network. Real kernels, real labs, the real image.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from core.config import load_site
from core.runner import pid_alive, run
from flows.build_image import build_image
from flows.test_notebooks import test_notebooks as run_lab_flow
from tasks.notebooks import discover_labs, labs_command, run_labs, runner_result, stage_lab
from tests.conftest import SiteFactory
from tests.tasks.conftest import missing, oci_site

pytestmark = pytest.mark.slow


def myst(*cells: str) -> str:
    head = ("---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
            "kernelspec:\n  display_name: Python 3 (ipykernel)\n  language: python\n  name: python3\n---\n\n# A test lab\n")
    return head + "".join(f"\n```{{code-cell}} ipython3\n{textwrap.dedent(cell).strip()}\n```\n" for cell in cells if cell)


def state_labs(folder: Path, out: Path | None = None) -> Path:
    """Two labs that import numpy and scipy.stats (so the zygote imports them once): the
    first leaves state everywhere a lab could (a global, a module's attribute, the
    environment, a file in its working folder), the second asserts it finds none of it.
    With ``out``, each also writes what it saw there (this process can read a venv lab's)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = "" if out is None else f"""
        import json, os
        with open({str(out)!r} + "/" + NAME + ".json", "w") as f:
            json.dump({{"pid": os.getpid(), "draw": int(np.random.randint(2**62)), "warm": WARM}}, f)
    """
    first = textwrap.dedent("""
        import os, sys
        WARM = "numpy" in sys.modules  # imported before the lab's own import: by the zygote
        IN_RUNNER_CONTAINER = "labrunner.py" in open("/proc/1/cmdline").read()
    """)
    (folder / "a_leaves_state.md").write_text(myst(
        first + 'NAME = "a_leaves_state"',
        "import numpy as np\nfrom scipy import stats",
        """
        LEAKED = 1
        np.olab_mark = 1
        os.environ["OLAB_LEAK"] = "1"
        with open("scratch.txt", "w") as f:
            f.write("from a")
        """,
        record,
    ))
    (folder / "b_finds_none.md").write_text(myst(
        first + 'NAME = "b_finds_none"',
        "import numpy as np\nfrom scipy import stats",
        """
        assert "LEAKED" not in globals()
        assert not hasattr(np, "olab_mark")
        assert "OLAB_LEAK" not in os.environ
        assert not os.path.exists("scratch.txt") and os.listdir(".") == []
        assert len(In) == 4  # this kernel has run this lab's three cells and nothing else
        """,
        record,
    ))
    return folder


def staged(labs: Path, dest: Path) -> list[Path]:
    dest.mkdir()
    return [stage_lab(lab, dest) for lab in discover_labs(labs)]


@pytest.fixture(scope="module")
def venv_image(tmp_path_factory, prefect_server):
    path = SiteFactory(tmp_path_factory.mktemp("lab-runs"))("labruns")
    return build_image(site=str(path))


def test_each_lab_of_a_run_gets_a_fresh_kernel_with_the_shared_imports_done(venv_image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    notebooks = staged(state_labs(tmp_path / "labs", out), tmp_path / "staged")
    results = run_labs.fn(venv_image, notebooks, 120, 1, None)
    assert [(r.lab, r.status) for r in results] == [("a_leaves_state", "passed"), ("b_finds_none", "passed")], results
    a, b = (json.loads((out / f"{name}.json").read_text()) for name in ("a_leaves_state", "b_finds_none"))
    # Forked from the zygote (numpy was there before the lab imported it), each in its own
    # process, each with numpy's generator seeded anew as a fresh process would be.
    assert a["warm"] and b["warm"]
    assert a["pid"] != b["pid"]
    assert a["draw"] != b["draw"]
    assert not pid_alive(a["pid"]) and not pid_alive(b["pid"])


def test_ordinary_kernels_on_request(venv_image, tmp_path):
    """--kernels fresh (what the benchmark compares against) starts each kernel as
    jupyter_client does: nothing imported ahead, and the labs pass the same."""
    out = tmp_path / "out"
    out.mkdir()
    notebooks = staged(state_labs(tmp_path / "labs", out), tmp_path / "staged")
    work = tmp_path / "work"
    work.mkdir()
    argv, env = labs_command(venv_image, notebooks, 120, 1, work, None)
    argv[2:2] = ["--kernels=fresh"]
    done = run(argv, cwd=work, env=env, check=False, timeout=600)
    results = [r for line in done.output.splitlines() if (r := runner_result(line))]
    assert done.returncode == 0 and [(r.lab, r.status) for r in results] == [
        ("a_leaves_state", "passed"), ("b_finds_none", "passed")], done.output[-2000:]
    assert "fresh kernels" in done.output
    a, b = (json.loads((out / f"{name}.json").read_text()) for name in ("a_leaves_state", "b_finds_none"))
    assert not a["warm"] and not b["warm"] and a["pid"] != b["pid"]


def test_a_lab_that_times_out_does_not_stop_the_others(venv_image, tmp_path):
    labs = tmp_path / "labs"
    labs.mkdir()
    pid_file = tmp_path / "hanging.pid"
    (labs / "a_hangs.md").write_text(myst(
        f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "import time\ntime.sleep(600)",
        "print('never reached')",
    ))
    (labs / "b_quick.md").write_text(myst("x = 1 + 1", "assert x == 2"))
    notebooks = staged(labs, tmp_path / "staged")
    # One at a time: the quick lab starts only after the hanging one has timed out.
    hangs, quick = run_labs.fn(venv_image, notebooks, 5, 1, None)
    assert hangs.status == "timeout" and hangs.failing_cell == 3 and hangs.cell_excerpt == "import time"
    assert hangs.error == "a cell ran longer than 5s"
    assert quick.passed
    # The hanging kernel was killed, not left behind.
    assert not pid_alive(int(pid_file.read_text()))


@pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root")
def test_labs_in_the_image_run_in_one_container_offline_and_share_nothing(user_image, make_site, registry_address,
                                                                            tmp_path):
    _, image = user_image
    labs = state_labs(tmp_path / "labs")
    # Each lab checks for itself: it runs in the lab runner's container (its PID 1), where
    # the zygote imported numpy, and no network but loopback exists.
    for lab in labs.iterdir():
        lab.write_text(lab.read_text() + "\n```{code-cell} ipython3\nassert WARM and IN_RUNNER_CONTAINER\n```\n")
    (labs / "c_offline.md").write_text(myst(
        """
        import socket
        assert [name for _, name in socket.if_nameindex()] == ["lo"]
        for address in [("1.1.1.1", 53), ("10.88.0.1", 80)]:
            try:
                socket.create_connection(address, timeout=3).close()
            except OSError:
                pass
            else:
                raise AssertionError(f"reached {address}")
        """,
    ))
    path = oci_site(make_site, "labruns", registry_address, labs={"path": str(labs), "parallelism": 1})
    # Passes are cached per (image, lab) across sites of this olab home: start cold.
    shutil.rmtree(load_site(str(path)).paths.lab_cache, ignore_errors=True)
    report = run_lab_flow(site=str(path), image=image)
    assert [(r.lab, r.status, r.cached) for r in report.results] == [
        ("a_leaves_state", "passed", False), ("b_finds_none", "passed", False), ("c_offline", "passed", False)]
