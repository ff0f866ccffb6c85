"""Serialise the first-time set-up of a local sqlite database between processes.

Two workers started together on a fresh ``sqlite:///`` store both try to create its tables (MLflow
runs alembic migrations, Optuna creates its schema) and one of them fails. An exclusive ``flock``
on a file beside the database makes the second wait until the first is done. Server databases
(PostgreSQL, MySQL) handle this themselves; for them this is a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def sqlite_init_lock(url: str):
    if not url.startswith("sqlite:///"):
        yield
        return
    path = url[len("sqlite:///"):]
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
