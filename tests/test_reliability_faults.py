"""Faults at the command boundary are one line that says what to do, exit status 2: an output path
that cannot be written (under a file, a read-only folder, no permission, a full disk), a study
storage that cannot be opened, a preset folder that cannot be written, and a trial that does not
exist. Everything is real: files and folders, small tmpfs mounts filled to the last byte, a closed
TCP port, a PostgreSQL server where one is given, and the CLI in-process or in a subprocess."""

import errno
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from schedsearch import presets, slots
from schedsearch.cli import main

SAMPLE = ["sample", "--steps", "2", "--seeds", "0", "--prompt", "3", "--no-progress"]


def one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"schedsearch {command}: error: "), err
    return lines[0]


def cli(*args, env=None, prefix=(), timeout=600):
    """``schedsearch ARGS`` in a subprocess (optionally under ``prefix``, e.g. setpriv)."""
    full = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    full.pop("SCHEDSEARCH_DEBUG", None)
    return subprocess.run([*prefix, sys.executable, "-m", "schedsearch", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SCHEDSEARCH_DEBUG", raising=False)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte."""
    disk = tmp_path / "full"
    _mount_tmpfs(disk, "size=64k")
    try:
        with open(disk / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def read_only_fs(tmp_path):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "ro,size=64k")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


# -- output folders and files ----------------------------------------------------------------------
@pytest.mark.parametrize("command, below", [(SAMPLE, "sub"),
                                            (["refstats", "--testbed", "digits"], "")])
def test_an_output_under_a_regular_file_is_one_line(tmp_path, capsys, command, below):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / below / "out" if below else blocker / "out"
    assert main([*command, "--out", str(out)]) == 2
    line = one_line(capsys, command[0])
    assert f"'{blocker}' is a file, not a folder" in line and "choose another --out" in line
    assert blocker.read_text() == "not a folder"


def test_a_refstats_output_that_is_a_folder_is_one_line(tmp_path, capsys):
    assert main(["refstats", "--testbed", "digits", "--out", str(tmp_path)]) == 2
    line = one_line(capsys, "refstats")
    assert f"cannot write '{tmp_path}': it is a folder, not a file" in line
    assert os.listdir(tmp_path) == []     # no temporary file left behind


def test_an_output_on_a_read_only_file_system_is_one_line(read_only_fs, capsys):
    assert main([*SAMPLE, "--out", str(read_only_fs / "samples")]) == 2
    line = one_line(capsys, "sample")
    assert f"'{read_only_fs / 'samples'}'" in line and "read-only file system" in line


def test_an_mlflow_store_on_a_read_only_file_system_is_one_line_before_the_study(
        read_only_fs, tmp_path, monkeypatch, capsys):
    """The line came after the model had loaded and the study with its slots was stored."""
    import optuna

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{read_only_fs / 'mlflow.db'}")
    out = tmp_path / "run"
    assert main(["run", "--model", "gmm", "--no-user-preset", "--no-progress", "--out",
                 str(out)]) == 2
    assert "mlflow.db" in one_line(capsys, "run")
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == []


def test_an_output_in_a_folder_without_write_permission_is_one_line(tmp_path):
    """A real EACCES: root drops the capability that lets it write anywhere (setpriv)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions are not enforced")
        caps = "-dac_override,-dac_read_search"
        prefix = ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--")
    try:
        r = cli(*SAMPLE, "--out", str(locked / "samples"), prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"schedsearch sample: error: permission denied for '{locked / 'samples'}'; choose another "
        f"--out in a folder you can write to, or change its permissions"]


@pytest.mark.parametrize("command, target", [
    (SAMPLE, "samples"),                                     # many files: PNGs, grid, JSON
    (["refstats", "--testbed", "digits"], "ref.safetensors"),  # one file, written by safetensors
])
def test_a_full_disk_names_the_path_and_says_to_free_space(full_disk, capsys, command, target):
    out = full_disk / target
    assert main([*command, "--out", str(out)]) == 2
    line = one_line(capsys, command[0])
    assert f"no space left on the disk holding '{out}'" in line
    assert "free some space there or choose another --out" in line
    assert not [p for p in full_disk.rglob(".*.tmp")]   # atomic writes left no temporary file


# -- the study storage ----------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_postgres_server_is_one_line_with_the_password_hidden(tmp_path, capsys):
    url = f"postgresql://alice:s3cret@127.0.0.1:{_closed_port()}/db"
    with pytest.raises(ValueError) as info:
        slots.make_storage(url)
    msg = str(info.value)
    assert "s3cret" not in msg and "postgresql://alice:***@127.0.0.1" in msg
    assert "Connection refused" in msg and "start the database server" in msg
    assert main(["run", "--storage", url, "--out", str(tmp_path)]) == 2
    line = one_line(capsys, "run")
    assert "cannot open the study storage postgresql://alice:***@127.0.0.1" in line
    assert "s3cret" not in line


def test_a_missing_database_driver_says_what_to_install(tmp_path, capsys):
    try:
        import MySQLdb  # noqa: F401
        pytest.skip("MySQLdb is installed here")
    except ImportError:
        pass
    assert main(["run", "--storage", "mysql://u:pw@h/db", "--out", str(tmp_path)]) == 2
    line = one_line(capsys, "run")
    assert "mysql://u:***@h/db" in line and "MySQLdb is not installed" in line
    assert "pip install pymysql and use mysql+pymysql://" in line


def test_an_unknown_database_url_is_one_line():
    with pytest.raises(ValueError, match=r"--storage nosuchdb://x: not a database URL"):
        slots.make_storage("nosuchdb://x")


# -- the MLflow tracking store ---------------------------------------------------------------------
# Before: MLflow retried an unreachable server or database for minutes, silently, at the first run
# it logged (after the model was loaded and the baselines were scored).
def test_an_unreachable_tracking_server_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:pw@127.0.0.1:{_closed_port()}")
    assert main(["run", "--model", "gmm", "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys, "run")
    assert line.startswith("schedsearch run: error: the MLflow tracking server http://bob:***@"
                           "127.0.0.1:") and "Connection refused" in line and "pw" not in line
    assert line.endswith("unset MLFLOW_TRACKING_URI to log to <out>/mlflow.db")
    assert not (tmp_path / "run").exists()


def test_a_tracking_server_that_answers_anything_is_reachable():
    import http.server
    import threading

    from schedsearch.tracking import check_reachable

    for status in (200, 401, 404):   # a server, one behind an auth proxy, one without /health
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            check_reachable(f"http://u:p@127.0.0.1:{server.server_port}/mlflow")
        finally:
            server.shutdown()


def test_an_unreachable_tracking_database_is_one_line_with_the_password_hidden(tmp_path, capsys,
                                                                               monkeypatch):
    from schedsearch.tracking import check_reachable

    url = f"postgresql://alice:s3cret@127.0.0.1:{_closed_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert main(["run", "--model", "gmm", "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys, "run")
    assert "the MLflow tracking database postgresql://alice:***@127.0.0.1" in line
    assert "Connection refused" in line and "s3cret" not in line
    assert not (tmp_path / "run").exists()
    check_reachable(f"sqlite:///{tmp_path / 'nothing-yet.db'}")   # a file: MLflow makes it


@pytest.mark.parametrize("url, meant", [("sqlit:///{d}/m.db", "sqlite"),
                                         ("postgresq://alice:s3cret@localhost/db", "postgresql")])
def test_a_tracking_uri_with_a_mistyped_scheme_is_one_line_before_any_work(tmp_path, capsys,
                                                                           monkeypatch, url, meant):
    """MLflow's traceback came after the study had been made and the model loaded."""
    url = url.format(d=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert main(["run", "--model", "gmm", "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys, "run")
    scheme = url.split("://")[0]
    assert f"MLflow has no tracking store for {scheme}:// (did you mean {meant} for {scheme}?)" \
        in line and "s3cret" not in line
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["ui", "--tracking-uri", url]) == 2
    assert f"--tracking-uri {url.replace('s3cret', '***')}: MLflow has no tracking store" \
        in one_line(capsys, "ui")


def _postgres():
    url = os.environ.get("SCHEDSEARCH_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: set SCHEDSEARCH_TEST_POSTGRES (.ci/run does)")
    return url


def test_a_database_that_does_not_exist_on_a_running_server_is_one_line():
    url = _postgres().rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(ValueError, match=r'database "no_such_database_here" does not exist\); '
                                         r"start the database server"):
        slots.make_storage(url)


def test_a_running_postgres_server_is_a_reachable_tracking_store():
    from schedsearch.tracking import check_reachable

    check_reachable(_postgres())


def _open(url):
    slots.make_storage(url)


def test_workers_creating_the_schema_at_once_all_succeed():
    """The retry for the concurrent-schema-creation race still works (a fresh database, six
    processes creating Optuna's tables at the same moment)."""
    import multiprocessing

    import psycopg

    url = _postgres()
    db = f"ss_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    fresh = url.rsplit("/", 1)[0] + "/" + db
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        pool.map(_open, [fresh] * 6)
    optuna.create_study(storage=slots.make_storage(fresh), study_name="s")


# -- presets: the export command and the study's export -------------------------------------------
def test_export_of_a_trial_that_does_not_exist_says_which_do(legacy, capsys):
    study = optuna.load_study(study_name="legacy-gmm", storage=f"sqlite:///{legacy / 'study.db'}")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)      # trial 4 failed
    base = ["export", "--study", "legacy-gmm", "--name", "x", "--out", str(legacy),
            "--to", str(legacy / "x.json")]
    assert main([*base, "--trial", "99"]) == 2
    assert one_line(capsys, "export").endswith(
        "study 'legacy-gmm' has no trial 99: its trials are 0-4 (completed: 0-3)")
    assert main([*base, "--trial", "4"]) == 2
    assert one_line(capsys, "export").endswith(
        "trial 4 of 'legacy-gmm' did not complete (it is FAIL); completed trials: 0-3")
    assert not (legacy / "x.json").exists()


@pytest.mark.parametrize("folder", ["a file", "a folder under a file", "read-only"])
def test_export_into_an_unwritable_preset_folder_is_one_line(legacy, tmp_path, monkeypatch, capsys,
                                                             request, folder):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    target = {"a file": blocker, "a folder under a file": blocker / "presets"}.get(folder)
    if folder == "read-only":
        target = request.getfixturevalue("read_only_fs")
    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(target))
    assert main(["export", "--study", "legacy-gmm", "--name", "mine", "--out", str(legacy)]) == 2
    line = one_line(capsys, "export")
    assert f"cannot write to the user preset folder {target}" in line
    assert "point $SCHEDSEARCH_PRESETS at a folder you can write to, or give --to FILE" in line


def test_the_studys_export_keeps_its_results_and_returns_a_warning(tmp_path, monkeypatch):
    """report.export_preset: the study's own preset is written; a user folder that cannot be
    written is a warning line for the caller, not an exception that would lose the study's end."""
    from types import SimpleNamespace

    from schedsearch.report import export_preset, recommended_preset
    from schedsearch.study import RunOptions

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(blocker))
    pick = {"key": "best", "fid": 1.0, "fid_heldout": 2.0, "kid_heldout": 0.1}
    best = SimpleNamespace(number=3, params={"p1": 7.0})
    ctx = SimpleNamespace(provenance=lambda: presets.provenance(model="gmm"))
    opts = RunOptions(out=tmp_path / "run", progress=False)
    written = export_preset(recommended_preset(pick, presets.load("sd15-5"), best, ctx, opts,
                                               "mystudy"), opts)
    assert presets.read(written["preset"]).provenance["trial"] == 3
    assert "user_preset" not in written
    assert written["warning"].startswith(f"preset not copied to the user preset folder {blocker}")
    assert "point $SCHEDSEARCH_PRESETS at a folder you can write to" in written["warning"]
    assert written["warning"].endswith(f"the study's preset is in {written['preset']}")


def test_running_out_of_memory_is_one_line_naming_the_batch_size(capsys):
    """torch's own allocation failure (a real one: 4 PiB on the CPU), through the CLI's error
    handling; every batch of a study is as large, so the fix is the batch size."""
    import argparse

    import torch

    from schedsearch.cli import _handle, memory_error

    args = argparse.Namespace(command="score", batch_size=64,
                              handler=lambda a: torch.empty(2 ** 50, dtype=torch.uint8))
    assert _handle(args) == 2
    assert one_line(capsys, "score") == (
        "schedsearch score: error: out of CPU memory allocating 1.05e+06 GiB: lower --batch-size "
        "(now 64); a study resumes where it stopped")
    # CUDA's message, as torch.cuda.OutOfMemoryError words it (no GPU on this machine)
    cuda = type("OutOfMemoryError", (RuntimeError,), {})(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB")
    assert memory_error(cuda, argparse.Namespace(batch_size=None, dtype="auto")) == (
        "out of GPU memory allocating 2.00 GiB: lower --batch-size, or use --dtype fp16; a study "
        "resumes where it stopped")
    assert memory_error(RuntimeError("shape mismatch"), args) is None


def test_a_short_password_is_hidden_without_eating_other_words():
    """With password 'p' the driver's 'port 5432' read '***ort 5432'."""
    url = f"postgresql://alice:p@127.0.0.1:{_closed_port()}/db"
    with pytest.raises(ValueError) as info:
        slots.make_storage(url)
    msg = str(info.value)
    assert "port" in msg and "***ort" not in msg and "alice:***@127.0.0.1" in msg


def test_written_files_keep_the_umask_or_the_replaced_files_mode(tmp_path):
    """atomic_write's temporary file is 0600: presets, statistics and caches came out unreadable
    to the other users and workers of a shared folder."""
    from schedsearch import files

    old = os.umask(0o022)
    try:
        assert files.atomic_write(tmp_path / "new.json", "{}").stat().st_mode & 0o777 == 0o644
        shared = tmp_path / "shared.json"
        shared.write_text("{}")
        shared.chmod(0o664)
        assert files.atomic_write(shared, "{}").stat().st_mode & 0o777 == 0o664
        os.umask(0o077)
        assert files.atomic_write(tmp_path / "private.json", b"").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_new_study_in_a_used_run_folder_gets_its_own_mlflow_run(tmp_path, capsys):
    """With the study.db moved aside (what the damaged-database line advises), the new study of
    the same name took the old one's MLflow parent run: the old trials beside the new ones, and
    the old baseline runs closed as superseded."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    argv = ["run", "--model", "gmm", "--budget", "3", "--trials", "2", "--n-search", "32",
            "--n-heldout", "16", "--baselines", "karras", "--no-user-preset", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gmm-3nfe").experiment_id

    def runs():
        return {r.info.run_id: (r.data.tags.get("mlflow.parentRunId"), r.info.status)
                for r in client.search_runs([exp], max_results=500)}

    first = runs()
    (out / "study.db").rename(out / "study.db.old")
    assert main(argv) == 0   # resumed, the same study keeps its run (tests/test_kill_phases.py)
    second = runs()
    assert {k: v for k, v in second.items() if k in first} == first   # the old runs untouched
    parents = [k for k, (parent, _) in second.items() if parent is None]
    assert len(parents) == 2
    new = [k for k in second if k not in first]
    assert all(second[k][0] in (None, *[p for p in parents if p not in first]) for k in new)
    capsys.readouterr()
