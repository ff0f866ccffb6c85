"""A screenshot of the dashboard as a user first sees it: `schedsearch ui` on a study's run folder,
the URL it prints opened in headless Chromium (Debian's `chromium` package), saved as a PNG.

    python analysis/dashboard_screenshot.py --out schedsearch-runs/digits-5nfe \
        --png docs/dashboard.png [--description docs/dashboard-study.png]

It checks what the page must show before saving: the runs table in Model-training mode (not the
GenAI view), the ★ run, and the study's description with the comparison table (a second
screenshot of the study run's page, with --description).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def start_ui(out: str, port: int) -> tuple[subprocess.Popen, str]:
    """`schedsearch ui` in its own process group; the URL it prints once the server answers."""
    proc = subprocess.Popen([sys.executable, "-m", "schedsearch", "ui", "--out", out, "--port",
                             str(port), "--no-browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    for line in proc.stdout:
        match = re.search(r"MLflow UI: (\S+)", line)
        if match:
            return proc, match.group(1)
        if time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("schedsearch ui printed no URL")


def chromium(args: list[str], timeout: float = 120) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium here: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    return done.stdout


def shoot(url: str, png: str, size: str = "1600,1000") -> str:
    """Save a screenshot and return the rendered DOM (to check what the page shows)."""
    dom = chromium(["--virtual-time-budget=25000", "--dump-dom", url])
    chromium([f"--window-size={size}", "--virtual-time-budget=25000", f"--screenshot={png}", url])
    return dom


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a schedsearch run folder (holds mlflow.db)")
    p.add_argument("--png", default="docs/dashboard.png")
    p.add_argument("--description", default=None,
                   help="also a screenshot of the study run's page (its description)")
    p.add_argument("--port", type=int, default=5077)
    args = p.parse_args()
    proc, url = start_ui(args.out, args.port)
    try:
        dom = shoot(url, args.png)
        checks = {"runs table": "workflowType=machine_learning" in url,
                  "★ run listed": "★" in dom, "trial runs listed": "trial " in dom}
        print(f"{url}\n  saved {args.png}; " + ", ".join(f"{k}: {v}" for k, v in checks.items()))
        if args.description:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{Path(args.out).resolve()}/mlflow.db")
            exp = url.split("/experiments/")[1].split("/")[0]
            run = client.search_runs([exp], "tags.`schedsearch.role` = 'study'")[0]
            page = url.split("#")[0] + f"#/experiments/{exp}/runs/{run.info.run_id}"
            dom = shoot(page, args.description, "1600,1400")
            print(f"{page}\n  saved {args.description}; description shown: "
                  f"{'best − this' in dom}")
        return 0 if all(checks.values()) else 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
