"""Helpers for the HTTP server tests: start a REAL `python -m sglang.launch_server` subprocess on a free
port, wait until /health answers 200 (the warm-up finished), and stop it checking that no child process
(controller, workers, detokenizer) outlives it.

    with ServerProcess(model_dir, "--api-key", "k") as srv:
        requests.post(srv.url + "/generate", json=...)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import psutil
import requests

START_TIMEOUT_S = float(os.environ.get("SGLANG_TEST_SERVER_START_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, *extra_args: str, api_key: Optional[str] = None,
                 start_timeout: float = START_TIMEOUT_S):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir, "--port", str(self.port),
                "--device", "cpu", *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.children: List[psutil.Process] = []
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop(check=False)
            raise

    # ---- lifecycle -------------------------------------------------------------------------------------
    def log_tail(self, chars: int = 6000) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-chars:]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    self.children = psutil.Process(self.proc.pid).children(recursive=True)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, check: bool = True, sig: int = signal.SIGTERM) -> List[str]:
        """Signal the server (SIGTERM or SIGINT); return the processes that outlived it (killed afterwards)."""
        try:
            self.children = list({p.pid: p for p in self.children + psutil.Process(
                self.proc.pid).children(recursive=True)}.values())
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(self.children, timeout=10)
        orphans = []
        for p in alive:
            try:
                orphans.append(f"pid {p.pid} {p.name()} {' '.join(p.cmdline())[:200]}")
                p.kill()
            except psutil.Error:
                pass
        return orphans

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---- requests ----------------------------------------------------------------------------------------
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        return requests.get(self.url + path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        return requests.post(self.url + path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    def generate(self, **body) -> dict:
        r = self.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def internal_states(self) -> List[dict]:
        r = self.get("/get_server_info")
        assert r.status_code == 200, r.text
        return r.json()["internal_states"]

    def wait_idle(self, timeout: float = 60.0) -> List[dict]:
        """Poll until no instance has running or waiting requests; return the states."""
        deadline = time.time() + timeout
        while True:
            states = self.internal_states()
            if all(s.get("running", 0) == 0 and s.get("waiting", 0) == 0 for s in states):
                return states
            if time.time() > deadline:
                raise AssertionError(f"server still busy after {timeout} s: {states}")
            time.sleep(0.2)


def stop_and_check(server: ServerProcess, sig: int = signal.SIGTERM) -> None:
    orphans = server.stop(sig=sig)
    # 0: the signal was handled (every child stopped by the server itself), not a default-action death
    assert server.proc.returncode == 0, f"server exit code {server.proc.returncode}:\n{server.log_tail(3000)}"
    assert not orphans, f"processes outlived the server: {orphans}"


def sse_events(resp: requests.Response) -> List[str]:
    """The data payloads of an SSE response, in order ("[DONE]" included)."""
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            events.append(line[len("data:"):].strip())
    return events
