"""A screenshot of the dashboard as a user first sees it: `schedsearch ui` on a study's run folder,
the URL it prints opened in headless Chromium (Debian's `chromium` package), saved as a PNG.

    python analysis/dashboard_screenshot.py --out schedsearch-runs/digits-5nfe \
        --png docs/dashboard.png [--description docs/dashboard-study.png]

Each page is rendered once to read its DOM and checked, and only a page that passes is then
rendered again and saved: the runs table in Model-training mode (not the GenAI view) with the ★
run and the trial runs listed, and, with --description, the study run's page showing its
description with the comparison table. A failed check saves nothing and exits with status 1.
If `schedsearch ui` prints no URL, the error ends with the last lines it printed.
"""

from __future__ import annotations

import argparse
import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def start_ui(out: str, port: int, timeout: float = 180,
             tail_lines: int = 30) -> tuple[subprocess.Popen, str]:
    """`schedsearch ui` in its own process group; the URL it prints once the server answers.

    Without a URL within ``timeout`` seconds (or if the ui exits first), the error carries the
    last lines the ui printed (stdout and stderr together): that is where its reason is."""
    proc = subprocess.Popen([sys.executable, "-m", "schedsearch", "ui", "--out", out, "--port",
                             str(port), "--no-browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # a reader thread, so a ui that hangs without printing still meets the deadline, and one that
    # keeps logging after the URL never blocks on a full pipe
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    tail: collections.deque = collections.deque(maxlen=tail_lines)
    deadline = time.time() + timeout
    while (left := deadline - time.time()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:   # its output closed: it is exiting, give it a moment to finish
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            break
        tail.append(line.rstrip("\n"))
        match = re.search(r"MLflow UI: (\S+)", line)
        if match:
            return proc, match.group(1)
    if proc.poll() is None:
        status = f"no URL after {timeout:g} s"
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    else:
        status = f"it exited with status {proc.returncode}"
    said = "\n".join(f"  {x}" for x in tail) or "  (nothing)"
    raise SystemExit(f"schedsearch ui printed no URL ({status}); its last output:\n{said}")


def chromium(args: list[str], timeout: float = 120) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium here: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    return done.stdout


def page_dom(url: str) -> str:
    """The rendered DOM, to check what the page shows before anything is saved."""
    return chromium(["--virtual-time-budget=25000", "--dump-dom", url])


def screenshot(url: str, png: str, size: str = "1600,1000") -> None:
    chromium([f"--window-size={size}", "--virtual-time-budget=25000", f"--screenshot={png}", url])


def report(url: str, checks: dict) -> bool:
    """Print each check's outcome for the page; True when every one passed."""
    print(f"{url}\n  " + ", ".join(f"{k}: {v}" for k, v in checks.items()))
    return all(checks.values())


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
        dom = page_dom(url)
        if not report(url, {"runs table": "workflowType=machine_learning" in url,
                            "★ run listed": "★" in dom, "trial runs listed": "trial " in dom}):
            print(f"  not saved: {args.png}", file=sys.stderr)
            return 1
        screenshot(url, args.png)
        print(f"  saved {args.png}")
        if args.description:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{Path(args.out).resolve()}/mlflow.db")
            exp = url.split("/experiments/")[1].split("/")[0]
            run = client.search_runs([exp], "tags.`schedsearch.role` = 'study'")[0]
            page = url.split("#")[0] + f"#/experiments/{exp}/runs/{run.info.run_id}"
            if not report(page, {"description shown": "best − this" in page_dom(page)}):
                print(f"  not saved: {args.description}", file=sys.stderr)
                return 1
            screenshot(page, args.description, "1600,1400")
            print(f"  saved {args.description}")
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
