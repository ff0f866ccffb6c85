"""Files written safely: atomic replacement under a unique temporary name, the cache folder, and
UTC timestamps for provenance.

Several workers of one study may write the same file at the same moment (a preset, a cache entry):
each writes its own temporary file beside the target and renames it over the target, so a reader
sees the old file or the whole new one, never half of either.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[str], None]]


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` (text, bytes, or a function that writes a file at the path it is given)
    to ``path`` through a uniquely named temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:   # name the file asked for, not the temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                f.write(content)
        if callable(content):
            content(tmp)
        os.chmod(tmp, _mode_for(path))   # mkstemp makes 0600: others' workers could not read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _mode_for(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would leave: the replaced file's own, else
    0666 less the umask (read from /proc on Linux; elsewhere by setting it and putting it back)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def check_writable(folder: str | os.PathLike) -> Path:
    """Make sure files can be written in ``folder`` (created later, by the command that writes
    there) — before any work whose result would go there. Probes the folder, or the nearest part
    of its path that exists, with a temporary file it removes, so nothing is left behind on bad
    input; an OSError names the path (the CLI turns it into one line)."""
    folder = Path(folder).absolute()
    probe_in = folder
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise NotADirectoryError(20, "not a folder", str(probe_in))
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=probe_in)
    except OSError as exc:   # name the folder asked for, not the probe
        raise type(exc)(exc.errno, exc.strerror, str(folder)) from None
    os.close(fd)
    os.remove(probe)
    return folder


def first_bad_byte(path: str | os.PathLike) -> str:
    """Where a file stops being UTF-8, for the one line that says so ("byte 0x80 on line 1")."""
    # The decoder's own offset is relative to the chunk it was reading, so find it in the file.
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte 0x{data[exc.start]:02x} on line {line}"
    return "it changed while being read"


class CacheWarning(UserWarning):
    """A cache could not be read or written: the result is computed anyway, at a cost."""


def cache_dir(*parts: str) -> Path:
    """``$SCHEDSEARCH_CACHE`` (default ``~/.cache/schedsearch``), joined with ``parts``."""
    root = os.environ.get("SCHEDSEARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "schedsearch")
    return Path(root, *parts)


def utc_now() -> str:
    """The current time as an ISO 8601 string in UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
