"""Local sqlite databases used by several processes: their first-time set-up serialised, and
their commits made cheap.

Two workers started together on a fresh ``sqlite:///`` store both try to create its tables (MLflow
runs alembic migrations, Optuna creates its schema) and one of them fails. An exclusive ``flock``
on a file beside the database makes the second wait until the first is done. Server databases
(PostgreSQL, MySQL) handle this themselves; for them this is a no-op.

A study commits a few dozen times per trial (every suggested parameter, report, attribute and
MLflow call is a transaction). With sqlite's default rollback journal each commit waits for the
disk (~10 ms here, a third of a digits trial). ``sqlite_wal`` switches every sqlite connection of
this process to the write-ahead log with ``synchronous=NORMAL``: readers and one writer work at
once across processes, and a commit no longer syncs the disk (a power cut may lose the last
commits, never corrupt the file — an interrupted trial is re-run anyway).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
import sqlite3


@contextlib.contextmanager
def sqlite_init_lock(url: str):
    if not url.startswith("sqlite:///"):
        yield
        return
    sqlite_wal()
    path = sqlite_path(url)
    check_sqlite_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sqlite_path(url: str) -> str | None:
    """The file a ``sqlite:///`` URL names ('' when it names none); None for any other URL."""
    return url[len("sqlite:///"):] if url.lower().startswith("sqlite:///") else None


def check_existing_sqlite(url: str, flag: str, what: str) -> None:
    """A sqlite URL given to read a run's database must name a file that is there: opening one
    that is not creates it, empty (folders and all, for an MLflow server), and then finds nothing
    in it. ``what``: the file a run folder holds (study.db, mlflow.db)."""
    path = sqlite_path(url)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {url}: there is no file {path or '(none named)'}; pass "
                                f"the {what} of a run folder, or --out DIR")


# the first 16 bytes of every SQLite 3 database file (sqlite.org/fileformat.html, 1.3)
SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_file(path: str) -> None:
    """A file that is there but is no SQLite database (damaged, or another program's) is one
    line naming it, not SQLAlchemy's traceback from the first pragma. A missing or empty file is
    fine: SQLite makes a new database in it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a database file") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head and head != SQLITE_MAGIC:
        raise ValueError(f"{path} is not an SQLite database (damaged, or another program's "
                         f"file): move it aside, and a study started there makes a new one")
    if head:
        st = os.stat(path)   # a file this process found sound and nobody wrote since: once
        if (os.path.realpath(path), st.st_mtime_ns, st.st_size) not in _SOUND:
            _check_pages(path)
            _SOUND.add((os.path.realpath(path), st.st_mtime_ns, st.st_size))


# (file, mtime, size) of the databases this process has checked page by page: a run checks its
# mlflow.db before the model loads and again when MLflow opens it, a second each on a large one
_SOUND: set = set()


def _check_pages(path: str) -> None:
    """A file with SQLite's header whose pages are damaged (cut short, overwritten) was a
    traceback from deep inside Optuna or MLflow, after the model had loaded (MLflow's retries
    first: minutes). quick_check reads every page once: a second on a large MLflow database. A
    locked or busy database is another worker's, not damage."""
    try:
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            found = con.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError:   # locked, busy, no read access: not this check's to say
        return
    except sqlite3.DatabaseError as exc:
        found = (str(exc),)
    if found and found[0] != "ok":
        why = " ".join(str(found[0]).replace("*** in database main ***", "").split())
        raise ValueError(f"{path} is a damaged SQLite database ({why}): move it aside, and a "
                         f"study started there makes a new one (or restore it from a backup)")


_WAL = False


def sqlite_wal() -> None:
    """Every sqlite connection this process opens from now on uses WAL and normal sync."""
    global _WAL
    if _WAL:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(connection, record):  # noqa: ARG001 — SQLAlchemy's listener signature
        if isinstance(connection, sqlite3.Connection):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    _WAL = True
