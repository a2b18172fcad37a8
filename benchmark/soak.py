"""Soak: a live Gyges auto-mode server under a steady mixed load for a long time, watched for leaks and errors.

Starts a real server subprocess (2 CPU "devices" at TP1, a small budget so that long prompts fit only a TP2 merge):

    python -m sglang.launch_server --model-path DIR --device cpu --dp-size 2 --enable-gyges --gyges-policy auto
        --gyges-split-delay 2 --device-memory 1200KiB --page-size 16 --dtype float32
        --max-request-body-size 256KiB --log-level warning --port N

(with the tiny demo checkpoint below that budget gives 272 KV tokens per TP1 instance and 1,072 after a merge) and
drives it for --duration seconds with plain `requests` client threads:

  * `--clients` mixed threads, each request drawn at random: short /generate (input_ids, non-streaming or SSE
    streaming), short OpenAI /v1/completions and /v1/chat/completions, streams cut after the first token
    (client disconnect), non-streaming requests abandoned after 20 ms (client disconnect), and invalid requests
    that must get a documented 4xx: a prompt longer than any instance Gyges can form (400), a negative
    temperature (400), malformed JSON (400), `max_new_tokens: -1` (400), a body above --max-request-body-size
    (413);
  * one long-request thread: a prompt longer than a TP1 instance's whole KV pool (so it is served only after
    a merge), streaming or not, sometimes cut, then 3-10 s of quiet so that the merged instance splits back.

Every --sample-interval seconds a sampler records: latency p50/p99 of the requests finished since the last
sample, the total RSS of the server's processes (psutil: the launch_server process and all its children), KV
pages used (`/get_server_info` internal_states: num_pages - free_pages, summed over instances), the topology and
the merges / splits so far (`GET /gyges/topology` history). At the end the clients stop, the script waits for
the server to be idle and back at TP1, flushes the prefix cache (`POST /flush_cache`) and checks that every page
is free; the server is then stopped with SIGTERM and must exit 0 with no child left.

Checks (the exit code is 1 when any fails):
  * every response is 200 or a 4xx this route documents in /openapi.json, and it is the status the request
    deserved (valid -> 200, each invalid kind -> its 4xx); no 5xx, in-band error (an SSE error event or an
    abort finish_reason with a 5xx), timeout or connection error on a request the client did not cut itself;
  * RSS: median of the last quarter of samples <= median of the first quarter * (1 + --rss-tolerance-frac)
    + --rss-tolerance-mb (defaults 0.03 and 40 MB, ~95 MB on the ~1.8 GB the server's processes hold; the
    measured drift between those medians was 4-10 MB: README "Soak");
  * all KV pages free after flush_cache;
  * at least one merge and one split happened (otherwise the soak did not exercise Gyges);
  * the server stops cleanly on SIGTERM.

Output: a markdown table on stdout, benchmark/results/soak.json (config, summary, samples, every request) and,
with matplotlib (`pip install -e "./python[bench]"`), benchmark/results/soak.png (latency, RSS and KV pages over
time, merges and splits marked).

    python benchmark/soak.py                       # 600 s
    python benchmark/soak.py --duration 300 --clients 3

test/test_soak.py runs the same loop (`Soak`, `evaluate`) for 120 s against a server it starts itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model_name, pct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results"

# The server's shape for a soak. The budget is tied to the model below (see the module docstring).
DEVICE_MEMORY = "1200KiB"
PAGE_SIZE = 16
SPLIT_DELAY_S = 2.0
MAX_BODY = "256KiB"
MAX_BODY_BYTES = 256 * 1024


def server_flags(device_memory: str = DEVICE_MEMORY, split_delay: float = SPLIT_DELAY_S,
                 page_size: int = PAGE_SIZE, max_body: str = MAX_BODY) -> List[str]:
    """launch_server flags (besides --model-path / --port / --device cpu) for a Gyges auto soak."""
    return ["--dp-size", "2", "--enable-gyges", "--gyges-policy", "auto", "--gyges-split-delay", str(split_delay),
            "--device-memory", device_memory, "--page-size", str(page_size), "--dtype", "float32",
            "--max-request-body-size", max_body, "--log-level", "warning"]


def demo_spec():
    """The checkpoint the soak uses: test/conftest.py's "llama_kv4" (2 layers, hidden 64, 4 KV heads)."""
    from sglang.srt.demo_model import DemoModelSpec

    return DemoModelSpec(arch="llama", seed=7, num_key_value_heads=4, intermediate_size=92)


# =====================================================================================================
# Workload
# =====================================================================================================
@dataclass
class SoakConfig:
    duration_s: float = 600.0
    clients: int = 3                      # mixed-load threads (plus one long-request thread)
    sample_interval_s: float = 5.0
    seed: int = 0
    vocab: int = 500                      # input ids drawn from [3, vocab)
    short_prompt: Tuple[int, int] = (8, 64)
    short_new: Tuple[int, int] = (4, 32)
    long_new: Tuple[int, int] = (4, 16)
    long_gap_s: Tuple[float, float] = (3.0, 10.0)   # quiet after each long request (lets the merge split)
    think_s: Tuple[float, float] = (0.0, 0.3)       # pause between a mixed thread's requests
    request_timeout_s: float = 180.0
    rss_tolerance_frac: float = 0.03
    rss_tolerance_mb: float = 40.0
    require_transforms: bool = True
    # weights of the mixed threads' request kinds
    mix: Dict[str, float] = field(default_factory=lambda: {
        "short": 30, "short_stream": 20, "openai_completion": 8, "openai_chat": 8,
        "cut_stream": 10, "abandon": 5,
        "bad_too_long": 4, "bad_temperature": 4, "bad_json": 4, "bad_max_new": 4, "bad_body_too_large": 3,
    })


# what each kind must get back
EXPECTED = {"bad_too_long": 400, "bad_temperature": 400, "bad_json": 400, "bad_max_new": 400,
            "bad_body_too_large": 413}
ROUTES = {"openai_completion": "/v1/completions", "openai_chat": "/v1/chat/completions"}
CUT_KINDS = ("cut_stream", "abandon", "long_cut")


@dataclass
class Rec:
    t: float                    # start, seconds since the soak began
    kind: str
    route: str
    stream: bool
    prompt_tokens: int = 0
    expected: int = 200
    status: Optional[int] = None    # HTTP status (None: no response, e.g. a cut or a timeout)
    inband: str = ""                # SSE error event / abort finish_reason after a 200
    inband_status: Optional[int] = None
    error: str = ""                 # client-side exception or error message
    cut: bool = False               # the client disconnected on purpose
    latency_s: Optional[float] = None
    ttft_s: Optional[float] = None
    completion_tokens: int = 0
    t_end: float = 0.0


def server_rss_bytes(pid: int) -> Tuple[int, int]:
    """Total RSS of process `pid` and all its descendants, and how many processes that is."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = n = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:
            pass
    return total, n


class Soak:
    """The soak loop against a running server (`url`, main process `server_pid`)."""

    def __init__(self, url: str, server_pid: int, cfg: SoakConfig, log=print):
        self.url = url.rstrip("/")
        self.pid = server_pid
        self.cfg = cfg
        self.log = log
        self.records: List[Rec] = []
        self.samples: List[dict] = []
        self.sample_errors: List[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.t0 = 0.0
        self.wall0 = 0.0
        self.documented: Dict[str, set] = {}
        self.cap1 = 0

    # ---- set-up ------------------------------------------------------------------------------------------
    def probe(self) -> None:
        r = requests.get(self.url + "/openapi.json", timeout=30)
        r.raise_for_status()
        paths = r.json()["paths"]
        for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
            self.documented[route] = {int(c) for c in paths[route]["post"]["responses"] if c.isdigit()}
        topo = requests.get(self.url + "/gyges/topology", timeout=30).json()
        caps = [i["kv_capacity_tokens"] for i in topo["instances"]]
        assert [i["tp"] for i in topo["instances"]] == [1, 1], topo
        self.cap1 = min(caps)
        self.model = requests.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]

    # ---- one request -------------------------------------------------------------------------------------
    def _ids(self, rng: random.Random, n: int) -> List[int]:
        return [1] + [rng.randrange(3, self.cfg.vocab) for _ in range(n - 1)]

    def _long_len(self, rng: random.Random, new: int) -> int:
        # more than a TP1 instance holds at all, at most what a TP2 merge is sure to hold (2 x the TP1 pages)
        return rng.randint(self.cap1 + PAGE_SIZE, 2 * self.cap1 - new - PAGE_SIZE)

    def one(self, kind: str, rng: random.Random) -> Rec:
        cfg = self.cfg
        route = ROUTES.get(kind, "/generate")
        stream = kind in ("short_stream", "cut_stream", "long_stream", "long_cut") or (
            kind.startswith("openai") and rng.random() < 0.5)
        rec = Rec(t=time.perf_counter() - self.t0, kind=kind, route=route, stream=stream,
                  expected=EXPECTED.get(kind, 200))
        new = rng.randint(*(cfg.long_new if kind.startswith("long") else cfg.short_new))
        sp = {"max_new_tokens": new, "temperature": rng.choice([0.0, 0.7]), "ignore_eos": True}
        data: Optional[bytes] = None
        body: Optional[dict] = None
        if kind.startswith("long"):
            n = self._long_len(rng, new)
            body = {"input_ids": self._ids(rng, n), "sampling_params": sp, "stream": stream}
        elif kind == "openai_completion":
            n = rng.randint(*cfg.short_prompt)
            body = {"model": self.model, "prompt": self._ids(rng, n), "max_tokens": new, "stream": stream}
        elif kind == "openai_chat":
            n = rng.randint(2, 12)
            words = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "hello", "world"]) for _ in range(n))
            body = {"model": self.model, "messages": [{"role": "user", "content": words}], "max_tokens": new,
                    "stream": stream}
        elif kind == "bad_too_long":
            n = 8 * self.cap1  # > a TP2 merge's capacity for the soak's budget
            body = {"input_ids": self._ids(rng, n), "sampling_params": sp}
        elif kind == "bad_temperature":
            n = 8
            body = {"input_ids": self._ids(rng, n), "sampling_params": {**sp, "temperature": -1.0}}
        elif kind == "bad_max_new":
            n = 8
            body = {"input_ids": self._ids(rng, n), "sampling_params": {**sp, "max_new_tokens": -1}}
        elif kind == "bad_json":
            n = 0
            data = b'{"text": "hello", "sampling_params": {"max_new_tokens": 4'
        elif kind == "bad_body_too_large":
            n = 0
            data = json.dumps({"text": "a " * (MAX_BODY_BYTES // 2 + 1024)}).encode()
        else:  # short, short_stream, cut_stream, abandon
            n = rng.randint(*cfg.short_prompt)
            body = {"input_ids": self._ids(rng, n), "sampling_params": sp, "stream": stream}
        rec.prompt_tokens = n
        if data is None:
            data = json.dumps(body).encode()
        timeout: Tuple[float, float] = (10.0, cfg.request_timeout_s)
        if kind == "abandon":
            timeout = (10.0, 0.02)  # gives up before the answer: the client closes the connection
        start = time.perf_counter()
        try:
            with requests.post(self.url + route, data=data, headers={"Content-Type": "application/json"},
                               stream=stream, timeout=timeout) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    try:
                        rec.error = str(resp.json()["error"]["message"])[:300]
                    except (ValueError, KeyError, TypeError):
                        rec.error = resp.text[:300]
                elif not stream:
                    self._check_body(rec, resp.json())
                else:
                    for line in resp.iter_lines():
                        if not line or not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            break
                        d = json.loads(payload)
                        self._check_body(rec, d, streaming=True)
                        if rec.ttft_s is None and self._has_token(d):
                            rec.ttft_s = time.perf_counter() - start
                            if kind in ("cut_stream", "long_cut"):
                                rec.cut = True
                                break  # leaving the with-block closes the connection mid-stream
        except requests.exceptions.ReadTimeout as e:
            if kind == "abandon":
                rec.cut = True
            else:
                rec.error = f"timeout: {e}"[:300]
        except requests.RequestException as e:
            rec.error = f"{type(e).__name__}: {e}"[:300]
        except ValueError as e:  # unparsable JSON / SSE payload on a 200
            rec.inband = rec.inband or f"unparsable response: {e}"[:300]
        end = time.perf_counter()
        rec.t_end = end - self.t0
        if rec.status == 200 and not rec.cut:
            rec.latency_s = end - start
        return rec

    @staticmethod
    def _has_token(d: dict) -> bool:
        if "meta_info" in d:
            return int(d["meta_info"].get("completion_tokens") or 0) > 0
        ch = (d.get("choices") or [{}])[0]
        return bool(ch.get("text") or (ch.get("delta") or {}).get("content"))

    @staticmethod
    def _check_body(rec: Rec, d, streaming: bool = False) -> None:
        """In-band failures after a 200: an error event, or an abort finish_reason (the scheduler's 507...)."""
        if isinstance(d, list):
            for x in d:
                Soak._check_body(rec, x, streaming)
            return
        if not isinstance(d, dict):
            return
        if "error" in d:
            err = d["error"] if isinstance(d["error"], dict) else {"message": str(d["error"])}
            rec.inband = str(err.get("message"))[:300]
            try:
                rec.inband_status = int(err.get("code") or 0) or None
            except (TypeError, ValueError):
                rec.inband_status = None
            return
        mi = d.get("meta_info")
        if mi is not None:
            rec.completion_tokens = max(rec.completion_tokens, int(mi.get("completion_tokens") or 0))
            fr = mi.get("finish_reason")
            if isinstance(fr, dict) and fr.get("type") == "abort":
                rec.inband = f"abort: {fr.get('message', '')}"[:300]
                rec.inband_status = fr.get("status_code")
        elif "usage" in d and d["usage"]:
            rec.completion_tokens = max(rec.completion_tokens, int(d["usage"].get("completion_tokens") or 0))

    # ---- threads -----------------------------------------------------------------------------------------
    def _add(self, rec: Rec) -> None:
        with self._lock:
            self.records.append(rec)

    def _mixed_thread(self, i: int) -> None:
        rng = random.Random(self.cfg.seed * 7919 + i)
        kinds, weights = zip(*self.cfg.mix.items())
        while not self._stop.is_set():
            self._add(self.one(rng.choices(kinds, weights)[0], rng))
            self._stop.wait(rng.uniform(*self.cfg.think_s))

    def _long_thread(self) -> None:
        rng = random.Random(self.cfg.seed * 7919 + 1000)
        self._stop.wait(1.0)
        while not self._stop.is_set():
            self._add(self.one(rng.choices(["long", "long_stream", "long_cut"], [4, 4, 2])[0], rng))
            self._stop.wait(rng.uniform(*self.cfg.long_gap_s))

    def _get_json(self, path: str, timeout: float = 30.0):
        r = requests.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def sample(self, last_t: float) -> dict:
        now = time.perf_counter() - self.t0
        rss, nproc = server_rss_bytes(self.pid)
        with self._lock:
            done = [r for r in self.records if last_t <= r.t_end < now]
            total = len(self.records)
        lats = [r.latency_s for r in done if r.latency_s is not None]
        s = {"t": now, "rss_mb": rss / 2**20, "procs": nproc, "requests": total, "window_done": len(done),
             "lat_p50_s": pct(lats, 50), "lat_p99_s": pct(lats, 99)}
        try:
            states = self._get_json("/get_server_info")["internal_states"]
            s["pages_used"] = sum(st["num_pages"] - st["free_pages"] for st in states)
            s["pages_total"] = sum(st["num_pages"] for st in states)
            s["cached_pages"] = sum(st.get("cached_pages", 0) for st in states)
            s["running"] = sum(st.get("running", 0) for st in states)
            s["waiting"] = sum(st.get("waiting", 0) for st in states)
        except (requests.RequestException, ValueError, KeyError) as e:
            self.sample_errors.append(f"t={now:.0f}s get_server_info: {type(e).__name__}: {e}"[:300])
        try:
            topo = self._get_json("/gyges/topology")
            s["tp"] = [i["tp"] for i in topo["instances"]]
            hist = [h for h in topo["history"] if h.get("at", 0) >= self.wall0]
            s["merges"] = sum(1 for h in hist if h.get("kind") == "merge")
            s["splits"] = sum(1 for h in hist if h.get("kind") == "split")
            self.history = hist
        except (requests.RequestException, ValueError, KeyError) as e:
            self.sample_errors.append(f"t={now:.0f}s gyges/topology: {type(e).__name__}: {e}"[:300])
        return s

    def _sampler_thread(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            s = self.sample(last)
            last = s["t"]
            self.samples.append(s)
            self.log(f"[soak {s['t']:6.0f}s] req {s['requests']:5d}  p50 {_fmt(s['lat_p50_s'])}  "
                     f"p99 {_fmt(s['lat_p99_s'])}  rss {s['rss_mb']:7.1f} MB  pages "
                     f"{s.get('pages_used', '?')}/{s.get('pages_total', '?')}  tp {s.get('tp')}  "
                     f"merges {s.get('merges', '?')} splits {s.get('splits', '?')}")
            self._stop.wait(self.cfg.sample_interval_s)

    # ---- the run -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.history: List[dict] = []
        self.probe()
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        threads = [threading.Thread(target=self._mixed_thread, args=(i,), daemon=True, name=f"soak-mixed-{i}")
                   for i in range(self.cfg.clients)]
        threads.append(threading.Thread(target=self._long_thread, daemon=True, name="soak-long"))
        sampler = threading.Thread(target=self._sampler_thread, daemon=True, name="soak-sampler")
        for t in threads:
            t.start()
        sampler.start()
        self._stop.wait(self.cfg.duration_s)
        self._stop.set()
        stuck = []
        for t in threads:
            t.join(self.cfg.request_timeout_s + 30)
            if t.is_alive():
                stuck.append(t.name)
        sampler.join(60)
        load_s = time.perf_counter() - self.t0
        final = self.finish()
        final["stuck_client_threads"] = stuck
        final["load_s"] = load_s
        return self.summarize(final)

    def finish(self) -> dict:
        """Wait for idle and the split back, flush the prefix cache, count pages still used."""
        out: dict = {}
        deadline = time.time() + 120
        states = []
        while time.time() < deadline:
            try:
                states = self._get_json("/get_server_info")["internal_states"]
                if all(s.get("running", 0) == 0 and s.get("waiting", 0) == 0 for s in states):
                    break
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        out["idle"] = bool(states) and all(s.get("running", 0) == 0 and s.get("waiting", 0) == 0 for s in states)
        out["idle_states"] = states
        deadline = time.time() + SPLIT_DELAY_S + 60
        topo = {}
        while time.time() < deadline:
            try:
                topo = self._get_json("/gyges/topology")
                if all(i["tp"] == 1 for i in topo["instances"]):
                    break
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        out["final_tp"] = [i["tp"] for i in topo.get("instances", [])]
        self.history = [h for h in topo.get("history", self.history) if h.get("at", 0) >= self.wall0]
        flush = None
        for _ in range(20):
            r = requests.post(self.url + "/flush_cache", timeout=60)
            flush = (r.status_code, r.text.strip()[:200])
            if r.status_code == 200:
                break
            time.sleep(0.5)
        out["flush_cache"] = flush
        left = None
        for _ in range(20):  # the flush reaches every instance; read until all report it
            try:
                states = self._get_json("/get_server_info")["internal_states"]
                left = sum(s["num_pages"] - s["free_pages"] for s in states)
                out["end_states"] = states
                if left == 0:
                    break
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        out["pages_left_used"] = left
        rss, n = server_rss_bytes(self.pid)
        out["rss_end_mb"] = rss / 2**20
        return out

    def summarize(self, final: dict) -> dict:
        recs = self.records
        status_counts: Dict[str, int] = {}
        for r in recs:
            if r.cut:
                key = "cut before the response" if r.status is None else f"{r.status} then cut"
            else:
                key = str(r.status) if r.status is not None else "no response"
            status_counts[key] = status_counts.get(key, 0) + 1
        lat = [r.latency_s for r in recs if r.latency_s is not None and r.kind not in EXPECTED]
        lat_short = [r.latency_s for r in recs if r.latency_s is not None and not r.kind.startswith("long")
                     and r.kind not in EXPECTED]
        lat_long = [r.latency_s for r in recs if r.latency_s is not None and r.kind.startswith("long")]
        ttft = [r.ttft_s for r in recs if r.ttft_s is not None]
        kinds: Dict[str, int] = {}
        for r in recs:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        rss = [s["rss_mb"] for s in self.samples]
        q = max(1, len(rss) // 4)
        first_q, last_q = rss[:q], rss[-q:]
        merges = sum(1 for h in self.history if h.get("kind") == "merge")
        splits = sum(1 for h in self.history if h.get("kind") == "split")
        return {
            "config": {**asdict(self.cfg), "url": self.url, "cap_tp1_tokens": self.cap1, "wall0": self.wall0,
                       "documented_statuses": {k: sorted(v) for k, v in self.documented.items()}},
            "summary": {
                "requests": len(recs), "status_counts": status_counts, "kinds": kinds,
                "cut_by_client": sum(1 for r in recs if r.cut),
                "completion_tokens": sum(r.completion_tokens for r in recs),
                "lat_p50_s": pct(lat, 50), "lat_p99_s": pct(lat, 99),
                "short_p50_s": pct(lat_short, 50), "short_p99_s": pct(lat_short, 99),
                "long_p50_s": pct(lat_long, 50), "long_p99_s": pct(lat_long, 99),
                "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "merges": merges, "splits": splits,
                "rss_start_mb": rss[0] if rss else None, "rss_end_mb": rss[-1] if rss else None,
                "rss_max_mb": max(rss) if rss else None,
                "rss_first_quarter_median_mb": statistics.median(first_q) if rss else None,
                "rss_last_quarter_median_mb": statistics.median(last_q) if rss else None,
                "pages_max_used": max((s.get("pages_used", 0) for s in self.samples), default=None),
                "sample_errors": self.sample_errors,
                **final,
            },
            "transforms": self.history,
            "samples": self.samples,
            "records": [asdict(r) for r in recs],
        }


def _fmt(x: Optional[float], unit: str = "s") -> str:
    return "   n/a" if x is None else f"{x:6.2f} {unit}"


# =====================================================================================================
# Checks, table, plot
# =====================================================================================================
def bad_records(result: dict) -> List[dict]:
    """Requests whose outcome was wrong: see the module docstring."""
    documented = {k: set(v) for k, v in result["config"]["documented_statuses"].items()}
    bad = []
    for r in result["records"]:
        why = None
        if r["cut"]:
            if r["status"] is not None and r["status"] != 200:
                why = f"status {r['status']} before the client cut"
            elif r["inband_status"] is not None and r["inband_status"] >= 500:
                why = f"in-band {r['inband_status']} before the client cut"
        elif r["status"] is None:
            why = "no response: " + r["error"]
        elif r["status"] >= 500:
            why = f"5xx {r['status']}"
        elif r["status"] not in documented.get(r["route"], set()):
            why = f"undocumented status {r['status']}"
        elif r["status"] != r["expected"]:
            why = f"status {r['status']}, expected {r['expected']}"
        elif r["inband"]:
            why = f"in-band error ({r['inband_status']}) after 200"
        if why:
            bad.append({**r, "why": why})
    return bad


def evaluate(result: dict, cfg: SoakConfig) -> List[str]:
    """Every failed check, in words (empty: the soak passed)."""
    s = result["summary"]
    failures = []
    bad = bad_records(result)
    if bad:
        kinds: Dict[str, int] = {}
        for b in bad:
            kinds[b["why"][:80]] = kinds.get(b["why"][:80], 0) + 1
        failures.append(f"{len(bad)} bad responses: {kinds}; first: " + json.dumps(
            {k: bad[0][k] for k in ("t", "kind", "route", "status", "inband", "error", "why")})[:600])
    if s["stuck_client_threads"]:
        failures.append(f"client threads still waiting at the end: {s['stuck_client_threads']}")
    f, l_ = s["rss_first_quarter_median_mb"], s["rss_last_quarter_median_mb"]
    if f is None:
        failures.append("no RSS samples")
    else:
        allowed = f * (1 + cfg.rss_tolerance_frac) + cfg.rss_tolerance_mb
        if l_ > allowed:
            failures.append(f"RSS grew: last-quarter median {l_:.1f} MB > first-quarter median {f:.1f} MB x "
                            f"{1 + cfg.rss_tolerance_frac:.2f} + {cfg.rss_tolerance_mb:.0f} MB = {allowed:.1f} MB")
    if not s["idle"]:
        failures.append(f"server not idle 120 s after the load stopped: {s['idle_states']}")
    if not s["flush_cache"] or s["flush_cache"][0] != 200:
        failures.append(f"flush_cache answered {s['flush_cache']}")
    if s["pages_left_used"] != 0:
        failures.append(f"{s['pages_left_used']} KV pages still used after flush_cache: {s.get('end_states')}")
    if cfg.require_transforms and (s["merges"] < 1 or s["splits"] < 1):
        failures.append(f"Gyges not exercised: {s['merges']} merges, {s['splits']} splits")
    return failures


def table(result: dict) -> str:
    s = result["summary"]

    def sec(x):
        return "n/a" if x is None else f"{x:.2f} s"

    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["status_counts"].items()))
    rows = [
        ("duration (load)", f"{s['load_s']:.0f} s"),
        ("requests", f"{s['requests']:,} ({s['completion_tokens']:,} tokens generated)"),
        ("status counts", statuses + " (cut: the client disconnected on purpose)"),
        ("merges / splits", f"{s['merges']} / {s['splits']}"),
        ("latency p50 / p99 (valid, uncut)", f"{sec(s['lat_p50_s'])} / {sec(s['lat_p99_s'])}"),
        ("  short p50 / p99", f"{sec(s['short_p50_s'])} / {sec(s['short_p99_s'])}"),
        ("  long (TP2 only) p50 / p99", f"{sec(s['long_p50_s'])} / {sec(s['long_p99_s'])}"),
        ("TTFT p50 / p99 (streams)", f"{sec(s['ttft_p50_s'])} / {sec(s['ttft_p99_s'])}"),
        ("RSS start / end (after flush) / max during load, all server processes",
         f"{s['rss_start_mb']:.1f} / {s['rss_end_mb']:.1f} / {s['rss_max_mb']:.1f} MB"),
        ("RSS median first / last quarter",
         f"{s['rss_first_quarter_median_mb']:.1f} / {s['rss_last_quarter_median_mb']:.1f} MB"),
        ("KV pages max used during the run", f"{s['pages_max_used']}"),
        ("KV pages used after flush_cache", f"{s['pages_left_used']}"),
    ]
    if "server_exit" in s:
        rows.append(("server exit on SIGTERM", s["server_exit"]))
    out = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def plot(result: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e './python[bench]'): no plot", file=sys.stderr)
        return None
    samples = result["samples"]
    recs = result["records"]
    wall0 = result["config"].get("wall0", 0)
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for kind, color in (("short", "C0"), ("long", "C3")):
        pts = [(r["t_end"], r["latency_s"]) for r in recs if r["latency_s"] is not None and r["kind"] not in EXPECTED
               and r["kind"].startswith("long") == (kind == "long")]
        if pts:
            ax1.scatter(*zip(*pts), s=4, alpha=0.35, color=color, label=f"{kind} request e2e")
    ts = [s["t"] for s in samples]
    ax1.plot(ts, [s["lat_p50_s"] for s in samples], color="k", lw=1, label="p50 per sample window")
    ax1.plot(ts, [s["lat_p99_s"] for s in samples], color="k", lw=1, ls="--", label="p99 per sample window")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (s)")
    ax1.legend(loc="upper right", fontsize=7)
    ax1.set_title("soak: Gyges auto, 2 CPU devices")
    ax2.plot(ts, [s["rss_mb"] for s in samples], color="C2")
    ax2.set_ylabel("RSS, all server\nprocesses (MB)")
    ax3.step(ts, [s.get("pages_used") for s in samples], where="post", label="pages used (incl. prefix cache)")
    ax3.step(ts, [s.get("cached_pages") for s in samples], where="post", label="of which in the prefix cache",
             color="C1")
    ax3.step(ts, [s.get("pages_total") for s in samples], where="post", label="pages total", color="gray")
    for h in result["transforms"]:
        x = h["at"] - wall0
        for ax in (ax1, ax2, ax3):
            ax.axvline(x, color="red" if h["kind"] == "merge" else "blue", alpha=0.2, lw=1)
    ax3.set_ylabel("KV pages")
    ax3.set_xlabel("seconds (red: merge, blue: split)")
    ax3.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# =====================================================================================================
# Main
# =====================================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model(model_dir: Path) -> str:
    from sglang.srt.demo_model import make_demo_model

    if (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")):
        return str(model_dir)
    return make_demo_model(str(model_dir), demo_spec())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=3, help="mixed-load client threads (plus one long-request thread)")
    p.add_argument("--sample-interval", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", default=None, help="default: build the demo checkpoint in benchmark/results")
    p.add_argument("--device-memory", default=DEVICE_MEMORY)
    p.add_argument("--rss-tolerance-frac", type=float, default=0.03)
    p.add_argument("--rss-tolerance-mb", type=float, default=40.0)
    p.add_argument("--out", default=str(RESULTS / "soak"), help="prefix of the .json / .png / .log written")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = a.model_path or ensure_model(RESULTS / "soak-model")
    port = free_port()
    args = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--device", "cpu",
            "--port", str(port), *server_flags(device_memory=a.device_memory)]
    log_path = out.with_suffix(".log")
    print("server:", " ".join(args[1:]), f"(log: {log_path})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    if requests.get(url + "/health", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.time() > deadline:
                    raise TimeoutError(f"server not ready in 300 s: {log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            cfg = SoakConfig(duration_s=a.duration, clients=a.clients, sample_interval_s=a.sample_interval,
                             seed=a.seed, rss_tolerance_frac=a.rss_tolerance_frac, rss_tolerance_mb=a.rss_tolerance_mb)
            soak = Soak(url, proc.pid, cfg)
            result = soak.run()
            failures = evaluate(result, cfg)
        finally:
            children = []
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session of the server this script started
                    proc.wait(10)
            _, alive = psutil.wait_procs(children, timeout=10)
            for c in alive:
                try:
                    c.kill()
                except psutil.Error:
                    pass
    exit_text = f"exit code {proc.returncode}, {len(alive)} child processes left"
    result["summary"]["server_exit"] = exit_text
    if proc.returncode != 0 or alive:
        failures.append(f"server did not stop cleanly on SIGTERM: {exit_text}; log tail: "
                        f"{log_path.read_text(errors='replace')[-1500:]}")
    result["failures"] = failures
    result["bad_records"] = bad_records(result)[:50]
    result["machine"] = {"cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1, default=str))
    png = plot(result, out.with_suffix(".png"))
    print()
    print(table(result))
    print(f"\nwrote {json_path}" + (f", {png}" if png else ""))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
