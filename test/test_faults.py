"""Faults on a live server: a worker frozen past the watchdog, a transformation past its deadline, the
burst of long shared-prefix prompts that once froze a static DP server.

Each test checks what a client and an operator see: the affected requests get a 503 naming the reason, the
other instance keeps serving, the frozen workers are killed, /health says which instance failed.
"""

import contextlib
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from server_utils import ServerProcess, stop_and_check

pytestmark = pytest.mark.slow

SHORT = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def _pid_of(server, devices):
    (st,) = [s for s in server.internal_states() if s["devices"] == devices]
    return st["pid"]


def _gone(pid) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def frozen_leader(server, devices):
    """SIGSTOP the leader worker of the instance on `devices` for the block (SIGCONT after, if it still
    exists); yields its pid."""
    pid = _pid_of(server, devices)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_frozen_worker_fails_its_instance_after_the_watchdog(test_model):
    server = ServerProcess(test_model("llama_kv4"), "--dp-size", "2", "--dtype", "float32", "--page-size", "4",
                           "--watchdog-timeout", "3")
    try:
        with frozen_leader(server, [1]) as frozen:
            t0 = time.time()
            body = {"input_ids": [1, 5, 9, 13], "sampling_params": SHORT}
            with ThreadPoolExecutor(8) as pool:  # least-loaded routing sends some of them to the frozen instance
                responses = list(pool.map(lambda _: server.post("/generate", json=body, timeout=60), range(8)))
            codes = [r.status_code for r in responses]
            assert 200 in codes and 503 in codes, codes
            assert set(codes) <= {200, 503}, codes
            for r in responses:
                if r.status_code == 503:
                    msg = r.json()["error"]["message"]
                    assert "made no progress" in msg and "--watchdog-timeout" in msg, msg
            assert time.time() - t0 < 30  # failed by the watchdog, not left waiting
            # The frozen worker is killed (its memory freed), /health names the failed instance.
            _wait_for(lambda: _gone(frozen), 15, "the frozen worker to be killed")
        health = server.get("/health")
        assert health.status_code == 503 and "[1]" in health.text and "no progress" in health.text, health.text
        # The other instance keeps serving.
        assert server.generate(input_ids=[1, 2, 3], sampling_params=SHORT)["meta_info"]["completion_tokens"] == 8
        assert [s["devices"] for s in server.internal_states()] == [[0]]
    finally:
        stop_and_check(server)


def test_server_info_and_flush_answer_without_a_frozen_instance(test_model):
    """Before the watchdog fires, queries that gather every instance answer within seconds, naming the
    instance that did not answer, instead of blocking on it."""
    server = ServerProcess(test_model("llama_kv4"), "--dp-size", "2", "--dtype", "float32", "--page-size", "4")
    try:
        with frozen_leader(server, [1]):
            t0 = time.time()
            states = server.internal_states()
            assert time.time() - t0 < 10  # the controller's 5 s reply limit, not the TM's 30 s
            assert states[0]["devices"] == [0] and "free_pages" in states[0]
            assert states[1]["devices"] == [1] and "no answer" in states[1]["error"], states
            assert server.post("/flush_cache").status_code != 200  # not every instance flushed
            assert server.get("/metrics").status_code == 200
        _wait_for(lambda: "error" not in server.internal_states()[1], 20, "the instance to answer again")
    finally:
        stop_and_check(server)


def test_transformation_past_its_deadline_fails_only_its_instances(test_model):
    server = ServerProcess(test_model("llama_kv4"), "--dp-size", "2", "--dtype", "float32", "--page-size", "4",
                           "--enable-gyges", "--gyges-transform-timeout", "3")
    try:
        with frozen_leader(server, [1]) as frozen:
            r = server.post("/gyges/transform", json={"devices": [0, 1], "tp": 2}, timeout=60)
            assert r.status_code == 503, r.text
            msg = r.json()["error"]["message"]
            assert "merge of devices [0, 1]" in msg, msg
            # Both devices were in the merge: no instance is left, so the server exits with an error and
            # every worker (the frozen one included) is gone.
            server.proc.wait(30)
            assert server.proc.returncode != 0
            _wait_for(lambda: _gone(frozen), 15, "the frozen worker to be killed")
    finally:
        server.stop(check=False)


def test_worker_killed_during_a_transformation_fails_it_with_503(test_model):
    server = ServerProcess(test_model("llama_kv4"), "--dp-size", "2", "--dtype", "float32", "--page-size", "4",
                           "--enable-gyges", "--gyges-transform-timeout", "120")
    try:
        with frozen_leader(server, [1]) as victim, ThreadPoolExecutor(1) as pool:  # holds the merge
            pending = pool.submit(server.post, "/gyges/transform", json={"devices": [0, 1], "tp": 2}, timeout=60)
            time.sleep(1.0)
            t0 = time.time()
            os.kill(victim, signal.SIGKILL)
            r = pending.result()
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        # Whichever the TokenizerManager sees first: the killed worker, or its peer whose collective failed.
        assert "exited" in msg and "merge of devices [0, 1]" in msg, msg
        assert time.time() - t0 < 15  # the death is noticed, not the 120 s deadline
        server.proc.wait(30)  # no instance left: the server exits with an error
        assert server.proc.returncode != 0
    finally:
        server.stop(check=False)


@pytest.mark.parametrize("mode", ["dp", "tp", "gyges-auto"])
def test_burst_of_long_shared_prefix_prompts_is_served(test_model, mode):
    """The burst that froze a static DP server and a Gyges auto server (every request stuck mid-prefill):
    prompts up to the KV capacity sharing prefixes, chunked prefill, more requests than fit at once (and,
    under Gyges, a few that fit only a merged instance). Every request is served; every page comes back."""
    flags = {"dp": ["--dp-size", "2"], "tp": ["--tp-size", "2"],
             "gyges-auto": ["--dp-size", "2", "--enable-gyges", "--gyges-policy", "auto", "--gyges-split-delay", "0.5"]}
    server = ServerProcess(test_model("qwen2"), *flags[mode], "--dtype", "float32", "--page-size", "16",
                           "--device-memory", "3MiB", "--chunked-prefill-size", "128", "--watchdog-timeout", "60")
    try:
        # The instance's KV capacity (bounded, to keep the TP2 case short on 2 cores).
        cap = min(min(s["kv_capacity_tokens"] for s in server.internal_states()), 1500)
        rng = random.Random(0)
        prefixes = [[rng.randrange(3, 400) for _ in range(rng.randrange(cap // 8, cap // 2))] for _ in range(4)]
        prompts = [(prefixes[i % 4] + [rng.randrange(3, 400) for _ in range(rng.randrange(1, cap // 2))])[:cap - 40]
                   for i in range(40)]
        if mode == "gyges-auto":  # longer than a TP1 instance holds: served after a merge
            prompts[5::12] = [prefixes[0] + [rng.randrange(3, 400) for _ in range(int(cap * 1.3))] for _ in range(3)]
        bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": rng.randrange(4, 32), "temperature": 0,
                                                       "ignore_eos": True}} for p in prompts]
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: server.post("/generate", json=b, timeout=600), bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies), \
            [r.text for r in responses if r.status_code != 200]
        for b, r in zip(bodies, responses):
            assert r.json()["meta_info"]["completion_tokens"] == b["sampling_params"]["max_new_tokens"]
        if mode == "gyges-auto":
            assert "merge" in [h["kind"] for h in server.get("/gyges/topology").json()["history"]]
        server.wait_idle()
        _wait_for(lambda: server.post("/flush_cache").status_code == 200, 30, "an idle server to flush its cache")
        for st in server.internal_states():
            assert st["free_pages"] == st["num_pages"], st
    finally:
        stop_and_check(server)
