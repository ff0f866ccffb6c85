"""``schedsearch ui``: the MLflow UI on a study's tracking store, on loopback."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import webbrowser
from pathlib import Path

from ..locks import check_existing_sqlite, check_sqlite_file
from . import UserError, options


# MLflow keeps the chosen columns in the browser: what to add once, with *Columns*
COLUMNS = ("columns worth showing: fid, fid_heldout, best_minus_this_heldout, nfe and the params "
           "solver, schedsearch.role")


def register(sub) -> None:
    p = options.command(
        sub, "ui", help="open the MLflow dashboard of a run folder",
        description="Serve the MLflow UI for a study's tracking store on 127.0.0.1 and print (and "
                    "open, where a browser exists) the study's runs table sorted by FID: every "
                    "trial and baseline side by side, the recommended run marked ★, the study "
                    "run's description holding the comparison.",
        examples=["schedsearch ui --out schedsearch-runs/digits-5nfe",
                  "schedsearch ui --out schedsearch-runs/digits-5nfe --port 5001 --no-browser"])
    p.add_argument("--out", default=None, help="the run folder (holds mlflow.db); default: the "
                                               "newest folder under schedsearch-runs/")
    p.add_argument("--tracking-uri", help="any MLflow tracking URI instead of --out")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--no-browser", action="store_true", help="print the URL, open no browser")
    p.set_defaults(handler=run)


def runs_url(uri: str, root: str) -> str:
    """The study's runs table in Model-training mode sorted by FID (MLflow 3 opens experiments in
    its GenAI view otherwise); the server's root when the store holds no study."""
    from mlflow.tracking import MlflowClient  # mlflow: heavy

    exps = [e for e in MlflowClient(tracking_uri=uri).search_experiments()
            if e.name != "Default"]
    root = root.rstrip("/") + "/"
    if not exps:
        return root
    newest = max(exps, key=lambda e: e.last_update_time or 0)
    return (f"{root}#/experiments/{newest.experiment_id}/runs?workflowType=machine_learning"
            f"&orderByKey=metrics.%60fid%60&orderByAsc=true")


def server_command(uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", artifacts.resolve().as_uri(), "--host", host,
            "--port", str(port), "--workers", "1"]


def run(args) -> int:
    if args.tracking_uri and args.out:
        raise ValueError("give --out (a run folder) or --tracking-uri (any MLflow store), not both")
    if args.tracking_uri:
        uri, artifacts = args.tracking_uri, Path("mlartifacts")
        check_store(uri)
        if uri.split("://", 1)[0].lower() in ("http", "https"):
            return _remote(args, uri)
    else:
        out = Path(args.out) if args.out else _newest_run()
        db = out / "mlflow.db"
        if not db.is_file():
            raise FileNotFoundError(f"no mlflow.db in {out}; run `schedsearch run` first or pass "
                                    f"--tracking-uri")
        uri, artifacts = f"sqlite:///{db.resolve()}", out / "mlartifacts"
        check_sqlite_file(str(db))
    check_port(args.host, args.port)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = runs_url(uri, f"http://{args.host}:{args.port}/")
    print(f"starting the MLflow server (store {uri}) ...", flush=True)
    return serve(server_command(uri, artifacts, args.host, args.port), env, args.host, args.port,
                 url, browser=not args.no_browser)


def check_store(uri: str) -> None:
    """A --tracking-uri that names nothing is one line, not a server on an empty store (a sqlite
    file that is not there: MLflow would create it, or fail in the background) or minutes of
    MLflow's retries (a database or server that does not answer)."""
    from ..tracking import check_reachable   # mlflow-free: the check comes before the heavy import

    check_existing_sqlite(uri, "--tracking-uri", "mlflow.db")
    check_reachable(uri, source=("--tracking-uri", "pass --out DIR for a run folder's own "
                                                  "mlflow.db"))


def _remote(args, uri: str) -> int:
    """A tracking server serves its own UI: print (and open) its runs table, start nothing."""
    from ..tracking import without_credentials

    url = runs_url(uri, without_credentials(uri))
    print(f"MLflow UI: {url}\n  (served by the tracking server itself; {COLUMNS})", flush=True)
    if not args.no_browser and _has_screen():
        webbrowser.open(url)
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse a port the server cannot have: mlflow server does not fail when it cannot bind, it
    exits 0 and the URL shows whatever else listens there."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; pass --port N with N in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r} does not resolve ({exc.strerror}); pass an address "
                        "such as 127.0.0.1") from None
    with socket.socket(family, kind, proto) as s:
        # The same option uvicorn sets, so a port that only lingers in TIME_WAIT is not refused.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise UserError(_bind_problem(host, port, exc)) from None


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another MLflow UI or another server?); "
                f"pass --port N with a free port, or stop the program that holds {port}")
    if exc.errno == errno.EACCES:
        return f"port {port} needs privileges to listen on; pass --port N with N >= 1024"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; pass --host 127.0.0.1"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host"


def serve(cmd: list[str], env: dict, host: str, port: int, url: str | None = None,
          browser: bool = False) -> int:
    """Run the server in its own process group and take the whole group down with us: mlflow
    server starts uvicorn and job workers that would otherwise outlive a terminated parent. The
    URL is printed once the server answers, so a server that never came up shows no URL."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    previous = signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    try:
        if not _wait_until_reachable(proc, host, port):
            raise UserError(f"the MLflow server exited with status {proc.returncode} before it "
                            f"served on {host}:{port}; its messages above say why")
        url = url or f"http://{host}:{port}/"
        print(f"MLflow UI: {url}\n  (Ctrl-C to stop; {COLUMNS})", flush=True)
        if browser and _has_screen():
            webbrowser.open(url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous)


def _wait_until_reachable(proc: subprocess.Popen, host: str, port: int) -> bool:
    """True once something accepts connections on the port while the server runs; False when the
    server exits first. Our own bind check just before makes "something" the server."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    while proc.poll() is None:
        try:
            socket.create_connection((target, port), timeout=1).close()
            return proc.poll() is None
        except OSError:
            time.sleep(0.2)
    return False


def _has_screen() -> bool:
    """Only open a browser on a desktop: without a display, Python's webbrowser falls back to a
    text browser that would take over the terminal the server logs to."""
    return (sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY"))
            or bool(os.environ.get("WAYLAND_DISPLAY")))


def _newest_run() -> Path:
    root = Path("schedsearch-runs")
    runs = sorted((p for p in root.glob("*") if (p / "mlflow.db").is_file()),
                  key=lambda p: (p / "mlflow.db").stat().st_mtime)
    if not runs:
        raise FileNotFoundError("no run folder under schedsearch-runs/; pass --out DIR")
    return runs[-1]
