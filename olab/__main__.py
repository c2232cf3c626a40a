"""The ``olab`` command's entry point (``python -m olab``, and the console script): a command
that runs a flow goes to the warm process when one answers (``olab.warm``: Prefect and olab
already imported there), else it runs in this process as ``olab.cli`` does.

This module imports nothing heavy before it knows: only ``olab.warm``'s client part (the
standard library). Which commands go to the warm process, and why the others do not:

- the lifecycle commands (up, build, test, deploy, provision, teardown, restore, stop) run a
  flow: importing Prefect and the flows is most of what they cost;
- status asks Prefect for the site's last runs: the same import;
- not server (it stops and shows the warm process itself, and must work when that one is
  stale or hung), serve and preview (long-running servers with their own Ctrl-C handling, whose
  start-up is not what anyone waits on), credentials, secrets, doctor and lock (no Prefect;
  credentials and secrets handle secrets, which then stay in this process), nor --help or
  anything argparse would refuse.
"""

from __future__ import annotations

import sys

from olab import warm

WARM_COMMANDS = frozenset({"up", "build", "test", "deploy", "provision", "teardown", "restore", "stop", "status"})


def main() -> int:
    if warm.command_of(sys.argv[1:]) in WARM_COMMANDS:
        try:
            status = warm.run(sys.argv)
        except KeyboardInterrupt:  # before the go (olab.warm._follow): the command never started
            print("olab: interrupted", file=sys.stderr)
            return 130
        if status is not None:
            return status
    from olab.cli import main as run_here

    return run_here(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
