"""A failing lab as its author reads it: the traceback the lab runner keeps (no colours, the
last frames, bounded) and how the CLI and test-notebooks' artifact show it. The real run, a
broken lab in the real image through `olab test`, is tests/tasks/test_lab_failures.py."""

from __future__ import annotations

from core import labrunner
from core.models import ImageRef, LabReport, LabResult

IMAGE = ImageRef(name="u", tag="a" * 16, digest="sha256:" + "a" * 64, location="/envs/u")

# What IPython puts in a failing cell's error output: a header, one part per frame, then
# the exception, each part coloured with ANSI escapes.
HEADER = ["\x1b[0;31m" + "-" * 75 + "\x1b[0m",
          "\x1b[0;31mValueError\x1b[0m                                Traceback (most recent call last)"]


def frame(n: int) -> str:
    return f"File \x1b[0;32m/opt/olab/lib/mod{n}.py:{n}\x1b[0m, in \x1b[0;36mf{n}\x1b[0m\n\x1b[1;32m----> {n}\x1b[0m call{n}()"


def error_cell(parts: list[str]) -> dict:
    return {"outputs": [{"output_type": "stream", "text": "x"}, {"output_type": "error", "traceback": parts}]}


def test_the_traceback_keeps_the_last_frames_without_colours():
    parts = HEADER + [frame(n) for n in range(1, 8)] + ["\x1b[0;31mValueError\x1b[0m: x must be positive"]
    text = labrunner._traceback(error_cell(parts), "unused")
    lines = text.splitlines()
    assert "\x1b" not in text
    assert lines[0] == "... 4 earlier frames"
    assert "mod5.py" in text and "mod7.py" in text and "mod4.py" not in text
    assert lines[-1] == "ValueError: x must be positive"
    assert "Traceback (most recent call last)" not in text and "-----" not in text


def test_a_long_traceback_is_cut_to_its_tail():
    parts = HEADER + [frame(1), "line\n" * 5000 + "ValueError: the end"]
    text = labrunner._traceback(error_cell(parts), "unused")
    assert len(text) <= labrunner.TRACEBACK_CHARS + 4
    assert text.startswith("...\n") and text.endswith("ValueError: the end")


def test_without_an_error_output_the_exceptions_own_text_is_used():
    text = labrunner._traceback({"outputs": []}, "An error occurred\n\x1b[0;31mKeyError\x1b[0m: 'g'")
    assert text.splitlines()[-1] == "KeyError: 'g'"


FAILED = LabResult(
    lab="bad_pendulum", status="failed", seconds=1.5, failing_cell=3, cell_excerpt="x = a | b  # `tick`",
    error="AssertionError: period 6.283s is not 1 s",
    traceback="Cell In[2], line 2\n----> 2 assert abs(period - 1.0) < 1e-3\n```\nAssertionError: period 6.283s is not 1 s",
)
REPORT = LabReport(image=IMAGE, results=[LabResult(lab="decay", status="passed", seconds=2.0), FAILED], seconds=4.0)


def test_the_cli_lines_name_the_cell_and_indent_the_traceback():
    lines = FAILED.failure_lines()
    assert lines[0] == "bad_pendulum: failed in cell 3 [x = a | b  # `tick`]: AssertionError: period 6.283s is not 1 s"
    assert lines[1:] == ["    Cell In[2], line 2", "    ----> 2 assert abs(period - 1.0) < 1e-3", "    ```",
                         "    AssertionError: period 6.283s is not 1 s"]


def test_the_artifact_has_a_row_per_lab_and_each_failure_with_its_traceback():
    markdown = REPORT.markdown("lab")
    lines = markdown.splitlines()
    assert lines[0] == "# test-notebooks: lab: FAILED"
    row = next(line for line in lines if line.startswith("| bad_pendulum "))
    # The first line's pipe does not split the table's row, its backticks do not end the code.
    assert row.count(" | ") == 4 and "3: `` x = a \\| b # `tick` ``" in row
    assert "| decay | passed | 2.00 |" in markdown
    start = lines.index("### bad_pendulum: failed in cell 3")
    fence = lines[start + 4]
    # The traceback holds a ``` line, so its fence is longer: it cannot close early.
    assert fence == "````" and lines[start + 5 : start + 9] == FAILED.traceback.splitlines() and lines[start + 9] == fence
