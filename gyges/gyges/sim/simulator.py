"""Discrete-event simulator: a host of N devices serving a trace under a gyges.policy.Policy.

Data flow. Requests (gyges.traces.TraceRequest) arrive at their trace times. The simulator plays the
live controller: on each arrival it describes the instances in a policy.ClusterState and applies the
policy's Place / Hold / Reject; every `tick_s` (and, with `tick_on_step`, after every iteration, as the
live controller ticks on every load report) it calls on_tick and applies its placements, rejects and
transformations. A placed request reaches its instance `dispatch_s` later (controller -> leader hop) and
joins the first iteration that starts after that. Each instance runs continuous batching the way
python/sglang/srt/managers/batch_scheduler.py does: one iteration takes every decoding request (one token
each), then prefill chunks of the admitted requests (at most `chunked_prefill_size` tokens each,
`max_prefill_tokens` in all, and never more than `chunk_tokens` tokens with the decodes), then admits
placed requests first come first served while `max_running_requests` allows and their claim (remaining
prompt + new_token_ratio x remaining output, in pages of `page_size`) fits beside the admitted ones'.
It lasts costmodel.StepTimeModel.batch_time over its sequences (new tokens, KV tokens each attends: its
KV length after the step) at the instance's TP. A request's KV reservation is prompt + output
tokens (the policy sees max_new_tokens = the trace's output length), so placed work never runs out of
memory; loads are reported as the live leaders report them (used KV rounded up to whole pages, tokens in
flight = what the requests may still write). Capacity: `capacity_by_tp[t]` KV tokens for an instance of
TP t when given (what the runtime reports), else `kv_tokens_per_device` x t. A transformation waits for
the current iteration of each instance involved, pauses them for costmodel.TransformCostModel's estimate,
then the requests continue on the new instances (a merge pools them; a split deals them over the parts,
which must have room: otherwise the policy was wrong and SimulationError is raised, like any other
invalid decision). With `tick_during_transform` off (the live controller) no tick runs meanwhile. What a
client sees trails the engine by `response_s` (detokenizer, HTTP): added to TTFT and to the finish time.

Results (SimResult): TTFT / TPOT percentiles, throughput, SLO attainment, rejected and unfinished
requests, merges / splits and a timeline of instance shapes; per trace source as well. Per request:
`Simulator.reqs` after `run()` (arrival, first_token_at and finished_at on the engine's clock).

CLI: python -m gyges.sim.simulator --help
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from gyges.costmodel import StepTimeModel, TransformCostModel
from gyges.policy import (POLICIES, ClusterState, Hold, InstanceLoad, Place, Policy, Reject, RequestInfo,
                          Transform, make_policy, validate_transform)
from gyges.topology import Instance, Topology
from gyges.traces import (TraceRequest, load_trace, mix_traces, sample, scale_trace, synthetic_trace,
                          window)


class SimulationError(RuntimeError):
    """A policy decision the live controller would also refuse (overcommit, bad transform, ...)."""


@dataclass
class SimConfig:
    num_devices: int = 4
    max_tp: int = 4
    kv_tokens_per_device: int = 16384
    chunk_tokens: int = 4096  # prefill + decode tokens per iteration of one instance
    tick_s: float = 0.1  # how often the policy's on_tick runs
    # The instance scheduler (batch_scheduler.py's rules and ServerArgs' flags of the same names); the
    # defaults leave chunk_tokens the only limit.
    chunked_prefill_size: Optional[int] = None  # longest prefill chunk of one request per iteration
    max_prefill_tokens: Optional[int] = None  # prefill tokens per iteration, all requests together
    max_running_requests: Optional[int] = None  # admitted requests per instance
    page_size: int = 1  # KV is allocated, claimed and reported in pages of this many tokens
    capacity_by_tp: Optional[Dict[int, int]] = None  # KV tokens of an instance of TP t (None: per device x t)
    # The controller and the way to the client.
    tick_on_step: bool = False  # also tick after every iteration (the live controller ticks on each report)
    tick_during_transform: bool = True  # False: no tick while a transformation runs (the live controller)
    dispatch_s: float = 0.0  # a Place -> the request can join an iteration of its instance
    response_s: float = 0.0  # a token sampled -> the client has it (added to TTFT and finish times)
    # An iteration that starts while the host's other instances are idle lasts step time / alone_speedup
    # (CPU devices share the host's cores with the serving processes: alone, those get a core of their own;
    # the step-time model is measured with every instance busy). An instance on every device (TP = all) is
    # never alone in that sense. 1: no such effect (GPUs).
    alone_speedup: float = 1.0
    slo_ttft_s: float = 5.0
    slo_tpot_s: float = 0.1
    report_largest_request: bool = True  # InstanceLoad.largest_request_tokens (False: policy infers it)
    settle_s: float = 30.0  # keep ticking this long after the last request (lets splits happen)
    drain_s: float = 3600.0  # give up this long after the last arrival (requests left: unfinished)
    step_model: StepTimeModel = field(default_factory=StepTimeModel)
    transform_model: TransformCostModel = field(default_factory=TransformCostModel)

    def capacity(self, tp: int) -> int:
        """KV tokens of an instance of TP tp."""
        if self.capacity_by_tp and tp in self.capacity_by_tp:
            return int(self.capacity_by_tp[tp])
        return self.kv_tokens_per_device * tp


# =====================================================================================================
# State
# =====================================================================================================
@dataclass
class SimRequest:
    rid: str
    arrival: float
    prompt: int
    output: int
    source: str
    prefilled: int = 0
    generated: int = 0
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    rejected: Optional[str] = None
    ready_at: float = 0.0  # when it reaches its instance (placement + dispatch_s)
    admitted: bool = False  # the instance's scheduler admitted it (running; else waiting there)
    placed_at: Optional[float] = None

    @property
    def need(self) -> int:
        return self.prompt + self.output

    @property
    def context(self) -> int:
        return self.prefilled + self.generated

    @property
    def remaining(self) -> int:
        return self.prompt - self.prefilled + self.output - self.generated

    @property
    def kv_len(self) -> int:
        """Tokens whose KV is written: the prompt so far, then every token but the last sampled one."""
        return self.prefilled + max(0, self.generated - 1)

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt

    def info(self) -> RequestInfo:
        return RequestInfo(self.rid, self.prompt, self.output, self.arrival)


# batch_scheduler.py's new_token_ratio: the share of a request's remaining output claimed at admission
INIT_NEW_TOKEN_RATIO = 0.5
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001  # per iteration with decodes


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclass
class SimInstance:
    instance: Instance
    capacity: int
    requests: List[SimRequest] = field(default_factory=list)  # placed here, in placement order
    busy: bool = False  # an iteration is running
    paused: bool = False  # part of a transformation (no new iterations)
    report_largest: bool = True  # report largest_request_tokens (as a controller that tracks requests does)
    idle_since: Optional[float] = 0.0
    page_size: int = 1
    new_token_ratio: float = INIT_NEW_TOKEN_RATIO

    @property
    def base(self) -> int:
        return self.instance.base

    def used_tokens(self) -> int:
        """KV held, in whole pages (what a leader reports)."""
        return sum(pages_for(r.kv_len, self.page_size) for r in self.requests) * self.page_size

    def load(self) -> InstanceLoad:
        in_flight = sum(r.need - r.kv_len for r in self.requests)
        running = sum(1 for r in self.requests if r.admitted)
        return InstanceLoad(self.instance.devices, self.instance.tp, running, len(self.requests) - running,
                            self.capacity, self.used_tokens(), 0, in_flight, self.paused,
                            None if self.requests else self.idle_since,
                            max((r.need for r in self.requests), default=0) if self.report_largest else None,
                            max((r.prompt - r.prefilled for r in self.requests), default=0))

    def free(self) -> int:
        return self.capacity - self.used_tokens() - sum(r.need - r.kv_len for r in self.requests)

    def _claim_pages(self, r: SimRequest, new_tokens: int = 0) -> int:
        """Pages r may still allocate beyond its KV after this iteration: batch_scheduler._claim_pages."""
        seq_len = r.prompt + r.generated
        tokens = seq_len + int((r.output - r.generated) * min(1.0, self.new_token_ratio))
        return max(0, pages_for(tokens, self.page_size) - pages_for(r.kv_len + new_tokens, self.page_size))

    def advance(self, batch: List[Tuple[SimRequest, int]], now: float) -> List[SimRequest]:
        """An iteration of `batch` ended at `now`: prefills advance (the last chunk samples the first token),
        decodes add a token; requests with all their tokens leave. Returns those."""
        for r, n in batch:
            if r.decoding:
                r.generated += 1
            else:
                r.prefilled += n
                if r.decoding:
                    r.generated += 1
                    r.first_token_at = now
            if r.generated >= r.output:
                r.finished_at = now
        done = [r for r in self.requests if r.finished_at is not None]
        self.requests = [r for r in self.requests if r.finished_at is None]
        return done

    def next_batch(self, cfg: "SimConfig", now: float) -> List[Tuple[SimRequest, int]]:
        """(request, new tokens) of the next iteration (module docstring): decodes, chunks of admitted
        prefills, then admissions in placement order. Marks the requests it admits."""
        ps = self.page_size
        admitted = [r for r in self.requests if r.admitted]
        batch = [(r, 1) for r in admitted if r.decoding]
        if batch:
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        budget = cfg.chunk_tokens - len(batch)
        if cfg.max_prefill_tokens is not None:
            budget = min(budget, cfg.max_prefill_tokens)
        chunk_cap = cfg.chunked_prefill_size or (1 << 62)
        pages = self.capacity // ps
        # Pages held after this iteration's decodes (retraction, when decodes do not fit, is not played).
        used = sum(pages_for(r.kv_len + (1 if r.decoding else 0), ps) for r in admitted)
        for r in admitted:
            if budget <= 0:
                break
            if not r.decoding:
                n = min(r.prompt - r.prefilled, chunk_cap, budget)
                grow = pages_for(r.kv_len + n, ps) - pages_for(r.kv_len, ps)
                if used + grow > pages:  # the chunk's pages are not free (decodes took them): wait, as live
                    break
                used += grow
                batch.append((r, n))
                budget -= n
        max_running = cfg.max_running_requests or (1 << 62)
        new = dict((id(r), n) for r, n in batch)
        claimed = sum(self._claim_pages(r, new.get(id(r), 0)) for r in admitted)
        running = len(admitted)
        for r in self.requests:
            if r.admitted or r.ready_at > now:
                continue
            if budget <= 0 or running >= max_running:
                break
            n = min(r.prompt - r.prefilled, chunk_cap, budget)
            alone = running == 0
            need_now = pages_for(r.kv_len + n, ps)
            if (not alone and self._claim_pages(r, n) + need_now > pages - used - claimed) or used + need_now > pages:
                break
            r.admitted = True
            used += need_now
            claimed += self._claim_pages(r, n)
            running += 1
            batch.append((r, n))
            budget -= n
        return batch


@dataclass
class PendingTransform:
    decision: Transform
    sources: List[SimInstance]
    started: bool = False


@dataclass
class SimResult:
    policy: str
    requests: int
    completed: int
    rejected: int
    unfinished: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    throughput_tok_s: float  # output tokens of completed requests / time from first arrival to last finish
    throughput_req_s: float
    slo_attainment: float  # share of all requests (rejected and unfinished count as misses)
    merges: int
    splits: int
    transform_pause_s: float  # sum of the transformations' pauses
    makespan_s: float
    timeline: List[Tuple[float, Tuple[int, ...]]]  # (time, TP of each instance by first device)
    by_source: Dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# =====================================================================================================
# The simulator
# =====================================================================================================
class Simulator:
    """One run of one policy over one trace. `run()` returns the SimResult."""

    def __init__(self, policy: Policy, trace: Sequence[TraceRequest], config: Optional[SimConfig] = None):
        self.policy = policy
        self.cfg = config or SimConfig()
        self.reqs = [SimRequest(f"r{i}", t.arrival_s, t.prompt_tokens, max(1, t.output_tokens), t.source or "all")
                     for i, t in enumerate(sorted(trace, key=lambda t: t.arrival_s))]
        groups = policy.initial_instances(self.cfg.num_devices, self.cfg.max_tp)
        self.topology = Topology(self.cfg.num_devices, tuple(Instance.of(g) for g in groups), self.cfg.max_tp)
        self.instances: Dict[int, SimInstance] = {
            i.base: self._new_instance(i, self.cfg.capacity(i.tp)) for i in self.topology.instances}
        self.held: List[SimRequest] = []
        self.transform: Optional[PendingTransform] = None
        self.now = 0.0
        self._events: List[tuple] = []
        self._seq = itertools.count()
        self.merges = self.splits = 0
        self.pause_s = 0.0
        self.timeline: List[Tuple[float, Tuple[int, ...]]] = [(0.0, self._shapes())]

    def _new_instance(self, inst: Instance, capacity: int) -> SimInstance:
        return SimInstance(inst, capacity, report_largest=self.cfg.report_largest_request,
                           page_size=self.cfg.page_size)

    # -- events ----------------------------------------------------------------------------------------
    def _at(self, t: float, kind: str, data=None) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, data))

    def run(self) -> SimResult:
        for r in self.reqs:
            self._at(r.arrival, "arrival", r)
        self._at(0.0, "tick")
        last_arrival = self.reqs[-1].arrival if self.reqs else 0.0
        give_up = last_arrival + self.cfg.drain_s
        done_at: Optional[float] = None
        while self._events:
            t, _, kind, data = heapq.heappop(self._events)
            if t > give_up:
                break
            self.now = t
            if kind == "arrival":
                self._on_arrival(data)
            elif kind == "step":
                self._on_step_done(*data)
            elif kind == "transform":
                self._on_transform_done()
            elif kind == "kick":
                if self.instances.get(data.base) is data:  # not replaced by a transformation meanwhile
                    self._kick(data)
            elif kind == "tick":
                if self.transform is None or self.cfg.tick_during_transform:
                    self._on_tick()
                if self._all_done():
                    done_at = self.now if done_at is None else done_at
                else:
                    done_at = None
                if done_at is None or self.now - done_at < self.cfg.settle_s:
                    self._at(self.now + self.cfg.tick_s, "tick")
        return self._result()

    def _all_done(self) -> bool:
        return (all(r.finished_at is not None or r.rejected is not None for r in self.reqs)
                and self.transform is None)

    # -- policy interaction ----------------------------------------------------------------------------
    def state(self) -> ClusterState:
        loads = tuple(self.instances[b].load() for b in sorted(self.instances))
        return ClusterState(self.cfg.num_devices, self.cfg.max_tp, loads, self.now,
                            tuple(r.info() for r in self.held),
                            tuple(sorted(self.cfg.capacity_by_tp.items())) if self.cfg.capacity_by_tp else ())

    def _on_arrival(self, req: SimRequest) -> None:
        d = self.policy.on_request(req.info(), self.state())
        if isinstance(d, Place):
            self._place(req, d.instance)
        elif isinstance(d, Hold):
            self.held.append(req)
        elif isinstance(d, Reject):
            req.rejected = d.message
        else:
            raise SimulationError(f"{self.policy.name}: on_request returned {d!r}")

    def _on_tick(self) -> None:
        decisions = self.policy.on_tick(self.state())
        held = {r.rid: r for r in self.held}
        transforms = [d for d in decisions if isinstance(d, Transform)]
        if len(transforms) > 1:
            raise SimulationError(f"{self.policy.name}: several transformations in one tick: {transforms}")
        for d in decisions:
            if isinstance(d, Transform):
                self._start_transform(d)
                continue
            req = held.pop(d.rid, None)
            if req is None:
                raise SimulationError(f"{self.policy.name}: {d!r} names no held request")
            self.held.remove(req)
            if isinstance(d, Place):
                self._place(req, d.instance)
            elif isinstance(d, Reject):
                req.rejected = d.message
            else:
                raise SimulationError(f"{self.policy.name}: on_tick returned {d!r}")

    def _place(self, req: SimRequest, base: int) -> None:
        inst = self.instances.get(base)
        if inst is None:
            raise SimulationError(f"{self.policy.name}: placed {req.rid} on device {base}, which leads no instance")
        if inst.paused:
            raise SimulationError(f"{self.policy.name}: placed {req.rid} on transforming instance {base}")
        if req.need > inst.free():
            raise SimulationError(f"{self.policy.name}: placed {req.rid} ({req.need} tokens) on instance {base} "
                                  f"with {inst.free()} free")
        req.placed_at = self.now
        req.ready_at = self.now + self.cfg.dispatch_s
        inst.requests.append(req)
        inst.idle_since = None
        if self.cfg.dispatch_s > 0:
            self._at(req.ready_at, "kick", inst)
        else:
            self._kick(inst)

    # -- iterations ------------------------------------------------------------------------------------
    def _kick(self, inst: SimInstance) -> None:
        if inst.busy or inst.paused or not inst.requests:
            return
        batch = inst.next_batch(self.cfg, self.now)
        if not batch:
            return  # nothing has reached the instance yet (dispatch_s): a kick follows
        # sequence by sequence: (new tokens, KV tokens it attends, its own included)
        dt = self.cfg.step_model.batch_time([(n, r.kv_len + n) for r, n in batch], inst.instance.tp)
        others = [o for o in self.instances.values() if o is not inst]
        if self.cfg.alone_speedup != 1.0 and others and not any(o.busy for o in others):
            dt /= self.cfg.alone_speedup
        inst.busy = True
        self._at(self.now + dt, "step", (inst, batch))

    def _on_step_done(self, inst: SimInstance, batch: List[Tuple[SimRequest, int]]) -> None:
        inst.busy = False
        inst.advance(batch, self.now)
        if not inst.requests:
            inst.idle_since = self.now
        if inst.paused:
            self._maybe_begin_transform()
        else:
            self._kick(inst)
        if self.cfg.tick_on_step and (self.transform is None or self.cfg.tick_during_transform):
            self._on_tick()  # the leader's load report wakes the controller

    # -- transformations -------------------------------------------------------------------------------
    def _start_transform(self, t: Transform) -> None:
        if self.transform is not None:
            raise SimulationError(f"{self.policy.name}: {t} while another transformation is in flight")
        if t.tp > self.cfg.max_tp:
            raise SimulationError(f"{self.policy.name}: {t} above max_tp={self.cfg.max_tp}")
        try:
            validate_transform(t, self.state())
        except ValueError as e:
            raise SimulationError(f"{self.policy.name}: invalid transformation {t}: {e}") from None
        sources = [self.instances[i.base] for i in self.topology.instances if set(i.devices) <= set(t.devices)]
        if not t.is_merge:
            sources = [self.instances[t.devices[0]]]
        for s in sources:
            s.paused = True
        self.transform = PendingTransform(t, sources)
        self._maybe_begin_transform()

    def _maybe_begin_transform(self) -> None:
        pt = self.transform
        if pt is None or pt.started or any(s.busy for s in pt.sources):
            return
        pt.started = True
        tm = self.cfg.transform_model
        if pt.decision.is_merge:
            cost = tm.merge_cost([(s.instance.tp, sum(r.context for r in s.requests)) for s in pt.sources],
                                 pt.decision.tp)
        else:
            src = pt.sources[0]
            cost = tm.split_cost(src.instance.tp, pt.decision.tp, sum(r.context for r in src.requests))
        self.pause_s += cost.est_seconds
        self._at(self.now + cost.est_seconds, "transform")

    def _on_transform_done(self) -> None:
        pt, self.transform = self.transform, None
        t = pt.decision
        if t.is_merge:
            self.topology = self.topology.merge(t.devices)
            merged = Instance.of(t.devices)
            capacity = (self.cfg.capacity(merged.tp) if self.cfg.capacity_by_tp
                        else sum(s.capacity for s in pt.sources))
            inst = self._new_instance(merged, capacity)
            inst.requests = sorted((r for s in pt.sources for r in s.requests), key=lambda r: r.arrival)
            inst.new_token_ratio = max(s.new_token_ratio for s in pt.sources)
            new = [inst]
            self.merges += 1
        else:
            src = pt.sources[0]
            self.topology = self.topology.split(t.devices, t.tp)
            part_capacity = (self.cfg.capacity(t.tp) if self.cfg.capacity_by_tp
                             else src.capacity * t.tp // src.instance.tp)
            parts = [self._new_instance(i, part_capacity) for i in self.topology.instances
                     if set(i.devices) <= set(t.devices)]
            for r in sorted(src.requests, key=lambda r: -r.need):  # largest first into the emptiest part
                part = max(parts, key=lambda p: (p.free(), -p.base))
                if r.need > part.free():
                    raise SimulationError(f"{self.policy.name}: split of {list(t.devices)} leaves {r.rid} "
                                          f"({r.need} tokens) no room in any part")
                part.requests.append(r)
            for p in parts:
                p.requests.sort(key=lambda r: r.arrival)
                p.new_token_ratio = src.new_token_ratio
            new = parts
            self.splits += 1
        for s in pt.sources:
            del self.instances[s.base]
        for inst in new:
            inst.idle_since = None if inst.requests else self.now
            self.instances[inst.base] = inst
        self.timeline.append((self.now, self._shapes()))
        self._on_tick()
        for inst in new:
            self._kick(inst)

    def _shapes(self) -> Tuple[int, ...]:
        return tuple(i.tp for i in self.topology.instances)

    # -- results ---------------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        summary = self._summarise(self.reqs)
        by_source = {}
        sources = sorted({r.source for r in self.reqs})
        if len(sources) > 1:
            by_source = {s: self._summarise([r for r in self.reqs if r.source == s]) for s in sources}
        return SimResult(self.policy.name, len(self.reqs), summary["completed"], summary["rejected"],
                         summary["unfinished"], summary["ttft_p50"], summary["ttft_p99"], summary["tpot_p50"],
                         summary["tpot_p99"], summary["throughput_tok_s"], summary["throughput_req_s"],
                         summary["slo_attainment"], self.merges, self.splits, self.pause_s,
                         summary["makespan_s"], self.timeline, by_source)

    def _summarise(self, reqs: Sequence[SimRequest]) -> dict:
        done = [r for r in reqs if r.finished_at is not None]
        lag = self.cfg.response_s
        ttft = [r.first_token_at + lag - r.arrival for r in done]
        tpot = [(r.finished_at - r.first_token_at) / (r.output - 1) for r in done if r.output > 1]
        if done:
            span = max(r.finished_at for r in done) + lag - min(r.arrival for r in reqs)
        else:
            span = 0.0
        ok = sum(1 for r in done if r.first_token_at + lag - r.arrival <= self.cfg.slo_ttft_s
                 and (r.output <= 1 or (r.finished_at - r.first_token_at) / (r.output - 1) <= self.cfg.slo_tpot_s))
        rejected = sum(1 for r in reqs if r.rejected is not None)
        return {
            "completed": len(done), "rejected": rejected, "unfinished": len(reqs) - len(done) - rejected,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
            "throughput_tok_s": sum(r.output for r in done) / span if span > 0 else 0.0,
            "throughput_req_s": len(done) / span if span > 0 else 0.0,
            "slo_attainment": ok / len(reqs) if reqs else float("nan"),
            "makespan_s": span,
        }


def simulate(policy: Policy, trace: Sequence[TraceRequest], config: Optional[SimConfig] = None) -> SimResult:
    return Simulator(policy, trace, config).run()


def compare(policy_specs: Sequence[str], trace: Sequence[TraceRequest], config: Optional[SimConfig] = None
            ) -> List[SimResult]:
    """Run each policy ('name' or 'name:key=value,...') on the same trace and config."""
    return [simulate(build_policy(spec, config or SimConfig()), trace, config) for spec in policy_specs]


# =====================================================================================================
# CLI
# =====================================================================================================
def _parse_kv(text: str) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val
    return out


def build_policy(spec: str, config: Optional[SimConfig] = None) -> Policy:
    """'gyges' or 'gyges:split_delay=2' or 'static-hybrid:big_tp=2,long_threshold_tokens=8000'. A policy that
    predicts with a step-time model (GygesPolicy's step_model, chunk_tokens) gets the one the simulation
    runs on, as the live controller gives it the one loaded with --gyges-cost-model."""
    name, _, args = spec.partition(":")
    kwargs = _parse_kv(args)
    if config is not None:
        accepted = inspect.signature(POLICIES[name.strip()]).parameters if name.strip() in POLICIES else {}
        if "step_model" in accepted:
            kwargs.setdefault("step_model", config.step_model)
        if "chunk_tokens" in accepted:
            kwargs.setdefault("chunk_tokens", config.chunk_tokens)
    return make_policy(name.strip(), **kwargs)


TRACE_OPTIONS = ("start", "duration", "sample", "seed", "time_scale", "length_scale", "output_scale",
                 "max_prompt", "max_output", "offset")


def load_trace_spec(spec: str) -> List[TraceRequest]:
    """'PATH' or 'PATH@start=0,duration=60,length_scale=0.25,time_scale=2,max_prompt=30000,sample=200'."""
    path, _, opts = spec.partition("@")
    kv = _parse_kv(opts)
    unknown = set(kv) - set(TRACE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown trace options {sorted(unknown)}; known: {', '.join(TRACE_OPTIONS)}")
    reqs = load_trace(path)
    if "start" in kv or "duration" in kv:
        reqs = window(reqs, float(kv.get("start", 0.0)), float(kv.get("duration", float("inf"))))
    if "sample" in kv:
        reqs = sample(reqs, int(kv["sample"]), int(kv.get("seed", 0)))
    reqs = scale_trace(reqs, float(kv.get("time_scale", 1.0)), float(kv.get("length_scale", 1.0)),
                       kv.get("max_prompt"), kv.get("max_output"),
                       float(kv["output_scale"]) if "output_scale" in kv else None)
    if "offset" in kv:
        reqs = mix_traces(reqs, offsets_s=[float(kv["offset"])])
    return reqs


def format_table(results: Sequence[SimResult]) -> str:
    cols = [("policy", "{}"), ("done", "{}"), ("rejected", "{}"), ("unfinished", "{}"),
            ("tok/s", "{:.0f}"), ("req/s", "{:.2f}"), ("TTFT p50", "{:.2f}"), ("TTFT p99", "{:.2f}"),
            ("TPOT p50", "{:.3f}"), ("TPOT p99", "{:.3f}"), ("SLO %", "{:.1f}"), ("merges", "{}"),
            ("splits", "{}")]
    rows = []
    for r in results:
        vals = [r.policy, r.completed, r.rejected, r.unfinished, r.throughput_tok_s, r.throughput_req_s,
                r.ttft_p50, r.ttft_p99, r.tpot_p50, r.tpot_p99, 100 * r.slo_attainment, r.merges, r.splits]
        rows.append([fmt.format(v) for (_, fmt), v in zip(cols, vals)])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, (c, _) in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    out = [line([c for c, _ in cols]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gyges.sim.simulator",
        description="Simulate a host of devices serving request traces under Gyges and static policies, "
                    "and print a comparison table.")
    p.add_argument("--trace", action="append", default=[], metavar="PATH[@opts]",
                   help="trace file (.csv Azure, .jsonl Mooncake); repeat to mix by arrival. Options after @, "
                        f"comma separated: {', '.join(o + '=' for o in TRACE_OPTIONS)}")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="without --trace: N synthetic requests (see --rate, --long-fraction)")
    p.add_argument("--rate", type=float, default=20.0, help="synthetic arrival rate (req/s)")
    p.add_argument("--long-fraction", type=float, default=0.05, help="synthetic share of long requests")
    p.add_argument("--policies", default="gyges,static-dp-ll,static-dp-rr,static-tp,static-hybrid",
                   help="comma-separated policies; arguments as name:key=value;... use ';' between arguments")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--max-tp", type=int, default=4)
    p.add_argument("--kv-tokens-per-device", type=int, default=16384)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--slo-ttft", type=float, default=5.0, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="seconds per output token")
    p.add_argument("--step-model", metavar="JSON", help="StepTimeModel parameters (costmodel.StepTimeModel.save)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--timeline", action="store_true", help="also print each policy's instance shapes over time")
    args = p.parse_args(argv)

    if args.trace:
        trace = mix_traces(*(load_trace_spec(s) for s in args.trace))
    elif args.synthetic:
        trace = synthetic_trace(args.synthetic, args.rate, long=(args.kv_tokens_per_device * 2, 64),
                                long_fraction=args.long_fraction)
    else:
        p.error("give --trace or --synthetic")
    cfg = SimConfig(num_devices=args.devices, max_tp=args.max_tp, kv_tokens_per_device=args.kv_tokens_per_device,
                    chunk_tokens=args.chunk_tokens, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot,
                    step_model=StepTimeModel.load(args.step_model) if args.step_model else StepTimeModel())
    specs = [s.strip().replace(";", ",") for s in args.policies.split(",") if s.strip()]
    # 'name:a=1;b=2' keeps its own arguments; a bare comma separates policies
    results = compare(specs, trace, cfg)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(f"{len(trace)} requests, {args.devices} devices (max TP {args.max_tp}), "
          f"{args.kv_tokens_per_device} KV tokens per device")
    print(format_table(results))
    if args.timeline:
        for r in results:
            print(f"{r.policy}: " + "  ".join(f"{t:.1f}s:{list(s)}" for t, s in r.timeline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
