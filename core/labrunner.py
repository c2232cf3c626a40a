"""Execute one lab notebook inside a user environment and report as JSON.

This file runs with the *user environment's* Python (a venv or, later, an
image), so it imports nothing from olab: only nbformat and nbclient, which
every user environment carries. Its last stdout line is the JSON result.

    python labrunner.py LAB.ipynb --name NAME --timeout SECONDS
"""

import argparse
import json
import re
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A traceback tells the author where their cell went wrong in its last frames; a lab that
# fails deep inside scipy should not fill the CLI or the artifact with hundreds of lines.
TRACEBACK_FRAMES = 3
TRACEBACK_CHARS = 4000


def _first_line(source):
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line[:80]
    return ""


def _traceback(cell, fallback):
    """The failing cell's traceback without ANSI colours: IPython's header dropped, the last
    frames and the exception line kept, at most TRACEBACK_CHARS (its tail)."""
    parts = next((out.get("traceback") for out in cell.get("outputs", []) if out.get("output_type") == "error"), None)
    parts = [ANSI.sub("", part).rstrip() for part in (parts or fallback.splitlines())]
    parts = [p for p in parts if p and set(p) != {"-"} and not p.endswith("Traceback (most recent call last)")]
    if not parts:
        return None
    frames, last = parts[:-1], parts[-1]
    kept = frames[-TRACEBACK_FRAMES:]
    if len(frames) > len(kept):
        kept.insert(0, f"... {len(frames) - len(kept)} earlier frames")
    text = "\n".join([*kept, last])
    return text if len(text) <= TRACEBACK_CHARS else "...\n" + text[-TRACEBACK_CHARS:].split("\n", 1)[-1]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("notebook")
    parser.add_argument("--name", required=True)
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    started = time.monotonic()
    nb = nbformat.read(args.notebook, as_version=4)
    current = {"index": None}

    def on_cell_start(cell, cell_index, **_):
        current["index"] = cell_index

    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name="python3",
        allow_errors=False,
        on_cell_start=on_cell_start,
        resources={"metadata": {"path": "."}},
    )
    result = {"lab": args.name, "status": "passed", "failing_cell": None, "cell_excerpt": None, "error": None,
              "traceback": None}
    try:
        client.execute()
    except CellExecutionError as exc:
        result.update(status="failed", error=f"{exc.ename}: {exc.evalue}".strip())
        if current["index"] is not None:
            result["traceback"] = _traceback(nb.cells[current["index"]], exc.traceback)
    except CellTimeoutError:
        result.update(status="timeout", error=f"a cell ran longer than {args.timeout}s")
    except DeadKernelError as exc:
        result.update(status="error", error=f"kernel died: {exc}")
    except Exception as exc:  # the result must always be reported
        result.update(status="error", error=f"{type(exc).__name__}: {exc}")
    if result["status"] != "passed" and current["index"] is not None:
        index = current["index"]
        result["failing_cell"] = index + 1
        result["cell_excerpt"] = _first_line(nb.cells[index].source)
    result["seconds"] = round(time.monotonic() - started, 3)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0 if result["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
