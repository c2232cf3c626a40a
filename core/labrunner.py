"""Execute one lab notebook inside a user environment and report as JSON.

This file runs with the *user environment's* Python (a venv or, later, an
image), so it imports nothing from olab: only nbformat and nbclient, which
every user environment carries. Its last stdout line is the JSON result.

    python labrunner.py LAB.ipynb --name NAME --timeout SECONDS
"""

import argparse
import json
import sys
import time


def _first_line(source):
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line[:80]
    return ""


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
    result = {"lab": args.name, "status": "passed", "failing_cell": None, "cell_excerpt": None, "error": None}
    try:
        client.execute()
    except CellExecutionError as exc:
        result.update(status="failed", error=f"{exc.ename}: {exc.evalue}".strip())
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
