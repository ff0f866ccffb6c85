"""``schedsearch ui``: the MLflow UI on a study's tracking store, on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ui", help="open the MLflow dashboard of a run folder",
                       description="Serve the MLflow UI for a study's tracking store (trials and "
                                   "baselines side by side) on 127.0.0.1.")
    p.add_argument("--out", default=None, help="the run folder (holds mlflow.db); default: the "
                                               "newest folder under schedsearch-runs/")
    p.add_argument("--tracking-uri", help="any MLflow tracking URI instead of --out")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(handler=run)


def server_command(uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", artifacts.resolve().as_uri(), "--host", host,
            "--port", str(port), "--workers", "1"]


def run(args) -> int:
    if args.tracking_uri:
        uri, artifacts = args.tracking_uri, Path("mlartifacts")
    else:
        out = Path(args.out) if args.out else _newest_run()
        db = out / "mlflow.db"
        if not db.is_file():
            raise FileNotFoundError(f"no mlflow.db in {out}; run `schedsearch run` first or pass "
                                    f"--tracking-uri")
        uri, artifacts = f"sqlite:///{db.resolve()}", out / "mlartifacts"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    print(f"MLflow UI on http://{args.host}:{args.port}  (store {uri}); Ctrl-C to stop", flush=True)
    return serve(server_command(uri, artifacts, args.host, args.port), env)


def serve(cmd: list[str], env: dict) -> int:
    """Run the server in its own process group and take the whole group down with us: mlflow
    server starts uvicorn and job workers that would otherwise outlive a terminated parent."""
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
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous)


def _newest_run() -> Path:
    root = Path("schedsearch-runs")
    runs = sorted((p for p in root.glob("*") if (p / "mlflow.db").is_file()),
                  key=lambda p: (p / "mlflow.db").stat().st_mtime)
    if not runs:
        raise FileNotFoundError("no run folder under schedsearch-runs/; pass --out DIR")
    return runs[-1]
