"""A lab whose assert fails, run by `olab test` inside the real user image: the CLI and
test-notebooks' artifact both name the lab, the cell and its first line, and show the
traceback (no ANSI colours), and the command still ends with its one-line reason."""

from __future__ import annotations

import pytest

from olab.cli import main
from tests.flows.test_lifecycle import latest_artifact
from tests.tasks.conftest import missing, oci_site

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
]

HEADLINE = "bad_pendulum: failed in cell 3 [period = 2 * np.pi * np.sqrt(L / g)]: AssertionError: period 2.006s is not 1 s"
FAILING_LINE = 'assert abs(period - 1.0) < 1e-3, f"period {period:.3f}s is not 1 s"'
LAST_LINE = "AssertionError: period 2.006s is not 1 s"


def test_olab_test_names_the_failing_cell_and_shows_its_traceback(user_image, make_site, broken_labs,
                                                                  registry_address, capsys):
    path = oci_site(make_site, "authorbroken", registry_address, labs={"path": str(broken_labs)})
    assert main(["test", "--site", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "\x1b" not in "\n".join(err)
    at = err.index(HEADLINE)
    traceback = []
    for line in err[at + 1:]:
        if not line.startswith("    "):
            break
        traceback.append(line.removeprefix("    "))
    # IPython's frame of the cell, with an arrow at the failing line, then the exception.
    assert any(FAILING_LINE in line and "---->" in line for line in traceback), traceback
    assert traceback[-1] == LAST_LINE
    assert not any("radioactive_decay" in line for line in err[at:-1])
    # The last line is still the command's one-line reason.
    assert err[-1].startswith("olab test: FAILED: 1 of 2 labs failed: bad_pendulum: failed in cell 3")

    markdown = latest_artifact("authorbroken-test-notebooks").data
    assert "\x1b" not in markdown
    assert "| radioactive_decay | passed" in markdown  # (cached) when it passed before in this image
    assert "| bad_pendulum | failed |" in markdown and "3: `period = 2 * np.pi * np.sqrt(L / g)`" in markdown
    section = markdown[markdown.index("### bad_pendulum: failed in cell 3"):]
    assert "first line: `period = 2 * np.pi * np.sqrt(L / g)`" in section
    fenced = section.split("```")[1]
    assert FAILING_LINE in fenced and fenced.strip().splitlines()[-1] == LAST_LINE
