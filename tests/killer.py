"""Run the schedsearch command line and SIGKILL this very process on the n-th call of a chosen
function: a real kill at a chosen point of a study, for tests/test_kill_phases.py.

    python tests/killer.py MODULE:QUALNAME N schedsearch-arguments...
"""

import importlib
import os
import signal
import sys


def arm(target: str, n: int) -> None:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from schedsearch.cli import main

    sys.exit(main(sys.argv[3:]))
