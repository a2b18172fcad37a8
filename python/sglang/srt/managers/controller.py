"""Controller process: between the TokenizerManager and the instance leaders (DESIGN §3, §6).

    TokenizerManager --requests / aborts / flush / state / Gyges admin--> Controller
    Controller --route each request to one instance leader; broadcast aborts, flush and queries-->
    leaders --InstanceReport on change, replies, TransformDone--> Controller --replies--> TokenizerManager

The controller owns the topology (gyges.topology.Topology): which devices form which instance.
With --gyges-policy manual, requests go to the least-loaded instance whose KV capacity holds them and
transformations happen only through POST /gyges/transform. With a policy (auto = Gyges, or a baseline),
every placement and transformation is decided by a gyges.policy.Policy from a ClusterState built out of
the leaders' reports: on each request (Place / Hold / Reject) and on every tick (~100 ms and every
report: place held requests, start a merge or a split). The controller only carries decisions out.
While a transformation runs, messages that would touch its instances are held and released after it;
no request is ever sent to an instance under transformation.

Affinity (issue 13, gyges.policies.affinity): a request goes where its session's KV is pinned (from the
leaders' reports, and where its previous turn was sent) or where the longest prefix of its prompt is cached
(PrefixIndex over the prompts routed to each instance), unless load there costs more than recomputing that
prefix elsewhere (choose_by_affinity, with the step-time model of --gyges-cost-model when one is given).
CloseSessionReqInput goes to every instance (the one holding the session unpins and frees its KV).

Moving a session (POST /sessions/move, and with --session-auto-move the controller itself: SessionMover,
gyges.policies.session_moves, decides from the hints and the load reports which idle session to move where):
SessionKVTransfer to the source (it exports the pinned path and frees it) -> back here -> the destination (it
adopts and pins it) -> MoveSessionReqOutput. Both sides work between two iterations. While a move is in flight
the session's turns wait here (released when it ends); a destination that refuses gets the KV sent back to
the source, so a refused move leaves the session where it was; a session closed meanwhile is closed on both.

Failure paths (every one ends in `fail_devices`: the instance's requests get a 503 with the reason, the
TokenizerManager learns it through ServingState and kills hung workers so their memory is freed, every
other instance keeps serving):

- a worker process exits (WorkerDied from the TokenizerManager);
- watchdog: an instance with work whose forward_ct (in its InstanceReports, at least one per second)
  does not advance for --watchdog-timeout seconds, or that stops reporting;
- a transformation that has not finished --gyges-transform-timeout seconds after it was issued.

Replies that gather every instance (flush, internal state) answer after REPLY_TIMEOUT_S with what came,
naming the instances that did not answer, instead of waiting for a frozen one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import zmq

from gyges.costmodel import StepTimeModel, TransformCostModel
from gyges.policies.affinity import AffinityCandidate, PrefixIndex, choose_by_affinity
from gyges.policies.session_moves import InstanceForMoves, MoveRuleConfig, SessionMover
from gyges.policy import ClusterState, Hold, InstanceLoad, Place, Reject, RequestInfo, Transform, make_policy
from gyges.topology import Instance, Topology
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    CloseSessionReqInput,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    GygesTopologyReq,
    GygesTopologyReqOutput,
    GygesTransformReq,
    GygesTransformReqOutput,
    InstanceReport,
    MoveSessionReq,
    MoveSessionReqOutput,
    ReqOutputDelta,
    ReqStrOut,
    ServingState,
    SessionKVTransfer,
    TokenizedGenerateReqInput,
    TransformCmd,
    TransformDone,
    WorkerDied,
)
from sglang.srt.managers.schedule_batch import finish_abort
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, configure_logger, die_with_parent, get_zmq_socket

logger = logging.getLogger(__name__)

# Seconds the controller waits for every instance's reply to a flush / internal-state query.
REPLY_TIMEOUT_S = 5.0


@dataclass
class InstanceView:
    """What the controller knows about one instance."""

    instance: Instance
    report: Optional[InstanceReport] = None
    routed_since_report: int = 0  # requests sent after the last report (not yet counted by it)
    routed_tokens_since_report: int = 0  # their prompt + max_new_tokens
    routed_prompt_since_report: int = 0  # the longest of their prompts
    routed_prefill_since_report: int = 0  # their prompt tokens not expected in the cache there
    idle_since: Optional[float] = None  # when the instance last became idle (None while busy)
    progress_at: float = field(default_factory=time.monotonic)  # last forward_ct change, or last seen idle

    @property
    def has_work(self) -> bool:
        r = self.report
        return self.routed_since_report > 0 or (r is not None and r.running + r.waiting > 0)

    @property
    def instance_id(self) -> int:
        return self.instance.leader

    def load_key(self):
        r = self.report
        in_flight = r.tokens_in_flight if r else 0
        queued = (r.running + r.waiting) if r else 0
        return (queued + self.routed_since_report, in_flight, self.instance_id)


@dataclass
class ActiveTransform:
    req_id: Optional[str]  # the TokenizerManager's request (None: decided by the policy)
    cmd: TransformCmd
    held: List[object] = field(default_factory=list)  # messages that wait for the new topology
    done: Optional[TransformDone] = None  # set when the workers finished; answered once all new instances report
    deadline: float = 0.0  # time.monotonic() after which the transformation's devices fail


@dataclass
class MoveInFlight:
    """A session's KV on its way between two instances."""

    session_id: str
    src: int
    dst: int
    auto: bool  # decided by the SessionMover (no client waits for the answer)
    transfer: Optional[SessionKVTransfer] = None  # the exported KV, kept until the destination adopted it
    returning: bool = False  # the destination refused: the KV goes back to the source
    answered: bool = False  # the client (POST /sessions/move) got its answer
    closed: bool = False  # the session was closed meanwhile
    held: List[TokenizedGenerateReqInput] = field(default_factory=list)  # its turns, until the move ends


@dataclass
class PendingReplies:
    """A flush / internal-state query sent to every instance, waiting for their answers."""

    request: object  # the FlushCacheReq / GetInternalStateReq
    waiting_for: set  # instance ids that have not answered
    replies: list = field(default_factory=list)
    deadline: float = 0.0  # time.monotonic() after which it answers with what came


class Controller:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs):
        self.args = server_args
        n = server_args.num_devices
        max_tp = (server_args.gyges_max_tp or n) if server_args.enable_gyges else server_args.tp_size
        self.topology = Topology.uniform(n, server_args.tp_size, max_tp=max_tp)
        self.views: Dict[int, InstanceView] = {}
        self.early_reports: Dict[int, InstanceReport] = {}  # reports of instances not created yet
        self.dead_devices: set = set()
        self._set_instances(self.topology.instances)
        ctx = zmq.Context(2)
        self.recv_from_tokenizer = get_zmq_socket(ctx, zmq.PULL, port_args.controller_input, bind=True)
        self.recv_from_workers = get_zmq_socket(ctx, zmq.PULL, port_args.controller_from_workers, bind=True)
        self.send_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_replies, bind=False)
        self.send_outputs_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_input, bind=False)
        self.send_to_worker: Dict[int, zmq.Socket] = {
            r: get_zmq_socket(ctx, zmq.PUSH, port_args.worker_inputs[r], bind=False) for r in range(n)
        }
        self.pending_replies: Dict[str, PendingReplies] = {}
        self.active: Optional[ActiveTransform] = None
        self.history: List[dict] = []
        self.max_tp = max_tp
        from sglang.srt.configs.model_config import ModelConfig

        self.context_len = ModelConfig.from_server_args(server_args).context_len
        self.policy = self._make_policy(server_args)
        self.held: List[TokenizedGenerateReqInput] = []  # requests the policy holds, oldest first
        self.capacity_by_tp: Dict[int, int] = {}  # from the leaders' reports (Gyges)
        self.routed: Dict[str, int] = {}  # request id -> instance (first device), until it finishes
        self.failed: List[List[int]] = []  # device lists of instances that failed
        self.failed_reasons: List[str] = []  # why, same order
        self.dead_devices: set = set()
        self.startup_transforms: List[Transform] = self._startup_transforms()
        # Affinity: where prompts' prefixes and sessions' KV live (gyges.policies.affinity).
        self.prefix_index = PrefixIndex(server_args.page_size)
        self.session_home: Dict[str, int] = {}  # session id -> instance holding (or about to hold) its KV
        self.reported_sessions: Dict[int, set] = {}  # instance -> sessions its last report listed as pinned
        self._cached_info: Dict[str, tuple] = {}  # rid -> RequestInfo.cached_tokens, until it is placed
        self.reported_prefixes: Dict[int, List[int]] = {}  # new leaders' cached blocks, not yet in the index
        self.step_model = StepTimeModel.load(server_args.gyges_cost_model) if server_args.gyges_cost_model else None
        self.chunk_tokens = (server_args.chunked_prefill_size if server_args.chunked_prefill_size > 0
                             else server_args.max_prefill_tokens)
        self.moves_in_flight: Dict[str, MoveInFlight] = {}  # req_id -> a session move under way
        self.session_mover = (SessionMover(MoveRuleConfig(), self.step_model, self.chunk_tokens)
                              if server_args.session_auto_move else None)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        self.poller.register(self.recv_from_workers, zmq.POLLIN)

    def _make_policy(self, args: ServerArgs):
        name = args.gyges_policy
        if name == "manual":
            return None
        if name in ("auto", "gyges", "gyges-rr", "gyges-ll"):
            cost = step = None
            if args.gyges_cost_model:
                cost = TransformCostModel.load(args.gyges_cost_model)
                step = StepTimeModel.load(args.gyges_cost_model)
            chunk = args.chunked_prefill_size if args.chunked_prefill_size > 0 else args.max_prefill_tokens
            return make_policy(name, split_delay=args.gyges_split_delay, cost_model=cost, base_tp=args.tp_size,
                               step_model=step, ttft_target_s=args.gyges_ttft_target, chunk_tokens=chunk)
        if name in ("static-dp-rr", "static-dp-ll"):
            return make_policy(name, tp=args.tp_size)
        return make_policy(name)

    def _startup_transforms(self) -> List[Transform]:
        """Merges that turn the launch topology into the policy's initial one (e.g. static-hybrid)."""
        if self.policy is None:
            return []
        want = self.policy.initial_instances(self.args.num_devices, self.max_tp)
        have = {tuple(i.devices) for i in self.topology.instances}
        return [Transform(tuple(g), len(g)) for g in want if tuple(g) not in have]

    def _set_instances(self, instances) -> None:
        old = self.views
        self.views = {}
        for inst in sorted(instances, key=lambda i: i.leader):
            if self.dead_devices & set(inst.devices):
                continue
            view = old.get(inst.leader)
            if view is None or view.instance != inst:
                view = InstanceView(inst, report=self.early_reports.pop(inst.leader, None))
            self.views[inst.leader] = view

    def event_loop(self) -> None:
        while True:
            events = self.poller.poll(100)
            for sock, _ in events:
                while True:
                    try:
                        msg = sock.recv_pyobj(zmq.NOBLOCK)
                    except zmq.ZMQError:
                        break
                    if sock is self.recv_from_tokenizer:
                        self.handle_tokenizer_message(msg)
                    else:
                        self.handle_worker_message(msg)
            self.check_deadlines()
            if self.policy is not None:
                self.tick()
            if self.session_mover is not None:
                self.auto_move_sessions()

    # ---- from the TokenizerManager ---------------------------------------------------------------------
    def handle_tokenizer_message(self, msg) -> None:
        if isinstance(msg, GygesTopologyReq):
            self.send_to_tokenizer.send_pyobj(GygesTopologyReqOutput(msg.req_id, self.describe(), list(self.history)))
            return
        if isinstance(msg, GygesTransformReq):
            self.start_transform(msg)
            return
        if isinstance(msg, WorkerDied):
            self.worker_died(msg)
            return
        if isinstance(msg, MoveSessionReq):
            self.move_session(msg)
            return
        if self.active is not None and self.policy is None and not self._can_pass_during_transform(msg):
            self.active.held.append(msg)
            return
        if isinstance(msg, TokenizedGenerateReqInput):
            self.route(msg)
        elif isinstance(msg, CloseSessionReqInput):
            if self.active is not None:
                self.active.held.append(msg)
                return
            self.session_home.pop(msg.session_id, None)
            if self.session_mover is not None:
                self.session_mover.closed(msg.session_id)
            for mv in self.moves_in_flight.values():
                if mv.session_id == msg.session_id:
                    mv.closed = True
            for view in self.views.values():
                self.send_to_worker[view.instance_id].send_pyobj(msg)
        elif isinstance(msg, (AbortReq, FlushCacheReq, GetInternalStateReq)):
            if self.active is not None:  # the instances are changing: answer after the transformation
                self.active.held.append(msg)
                return
            if isinstance(msg, AbortReq):
                self._abort_held(msg)
            else:
                self.pending_replies[msg.req_id] = PendingReplies(msg, set(self.views),
                                                                  deadline=time.monotonic() + REPLY_TIMEOUT_S)
                if not self.views:
                    self._answer(msg.req_id)
            for view in self.views.values():
                self.send_to_worker[view.instance_id].send_pyobj(msg)
        else:
            logger.error("controller got an unknown message %r", type(msg))

    def _can_pass_during_transform(self, msg) -> bool:
        if not isinstance(msg, TokenizedGenerateReqInput):
            return False
        return self._place(msg, exclude=self._busy_bases()) is not None

    def _busy_bases(self) -> set:
        if self.active is None:
            return set()
        return {inst[0] for inst in self.active.cmd.src_instances}

    def _place(self, req: TokenizedGenerateReqInput, exclude=()) -> Optional[InstanceView]:
        need = len(req.input_ids) + 1
        fits = [v for v in self.views.values() if v.instance_id not in exclude and
                (v.report is None or v.report.kv_capacity_tokens >= need)]
        if not fits:
            return None
        if any(v.report is None for v in fits):
            return min(fits, key=InstanceView.load_key)
        hashes = self.prefix_index.block_hashes(req.input_ids)
        cands = [self._affinity_candidate(req, v, hashes) for v in fits]
        best = choose_by_affinity(len(req.input_ids), cands, self.step_model, self.chunk_tokens)
        return self.views[best.base]

    def cached_tokens_by_instance(self, req: TokenizedGenerateReqInput, hashes=None) -> Dict[int, int]:
        """Leading prompt tokens of req whose KV each instance holds (as far as the controller knows)."""
        if hashes is None:
            hashes = self.prefix_index.block_hashes(req.input_ids)
        out = {base: self.prefix_index.match(base, req.input_ids, hashes) for base in self.views}
        home = self.session_home.get(req.session_id) if req.session_id else None
        if home in out:
            out[home] = max(out[home], req.session_prefix_tokens)
        return out

    def _affinity_candidate(self, req: TokenizedGenerateReqInput, view: InstanceView, hashes) -> AffinityCandidate:
        cached = self.prefix_index.match(view.instance_id, req.input_ids, hashes)
        if req.session_id and self.session_home.get(req.session_id) == view.instance_id:
            cached = max(cached, req.session_prefix_tokens)
        return dataclasses.replace(self._instance_load(view), cached_tokens=cached)

    def _instance_load(self, view: InstanceView) -> AffinityCandidate:
        """The instance's load as the affinity cost model sees it (its report + what was routed since)."""
        r = view.report
        return AffinityCandidate(
            base=view.instance_id, tp=view.instance.tp, running=r.running,
            waiting=r.waiting + view.routed_since_report,
            prefill_tokens_queued=r.prefill_tokens_queued + view.routed_prefill_since_report,
            tokens_in_flight=r.tokens_in_flight + view.routed_tokens_since_report,
            kv_free_tokens=r.kv_capacity_tokens - r.kv_used_tokens - view.routed_tokens_since_report)

    def route(self, req: TokenizedGenerateReqInput) -> None:
        moving = self._move_of(req.session_id) if req.session_id else None
        if moving is not None:  # its KV is on the way: place it once the move ended
            moving.held.append(req)
            return
        if self.policy is not None:
            self.apply([self.policy.on_request(self._request_info(req), self.cluster_state())], req)
            return
        view = self._place(req)
        if view is None:
            self.reject(req, self._too_long_message(req))
            return
        self.send_to_instance(req, view.instance_id)

    def _too_long_message(self, req: TokenizedGenerateReqInput) -> str:
        largest = max((v.report.kv_capacity_tokens for v in self.views.values() if v.report), default=0)
        text = (f"the prompt has {len(req.input_ids)} tokens, more than the KV capacity of every instance "
                f"now serving (largest: {largest} tokens)")
        if self.args.enable_gyges:
            text += ("; merge instances into a larger tensor-parallel instance (POST /gyges/transform) "
                     "to serve it")
        return text

    def reject(self, req: TokenizedGenerateReqInput, message: str, status_code: int = 400) -> None:
        if self.session_mover is not None:
            self.session_mover.turn_finished(req.rid, time.monotonic())
        delta = ReqOutputDelta(rid=req.rid, new_output_ids=[], finish_reason=finish_abort(message, status_code),
                               prompt_tokens=len(req.input_ids), completion_tokens=0, cached_tokens=0)
        self.send_outputs_to_tokenizer.send_pyobj(BatchStrOut([ReqStrOut(req.rid, "", [], delta)]))

    def send_to_instance(self, req: TokenizedGenerateReqInput, base: int) -> None:
        if base in self._busy_bases() or base not in self.views:
            # Never onto an instance under transformation (or gone): wait for the new topology.
            logger.warning("request %s not placed on instance %d: it is %s", req.rid, base,
                           "transforming" if base in self.views else "not serving")
            if self.policy is not None:
                self.held.append(req)
            elif self.active is not None:
                self.active.held.append(req)
            else:
                self.route(req)
            return
        view = self.views[base]
        self.routed[req.rid] = base
        self._cached_info.pop(req.rid, None)
        hashes = self.prefix_index.block_hashes(req.input_ids)
        cached = self.prefix_index.match(base, req.input_ids, hashes)
        if req.session_id:
            if self.session_home.get(req.session_id) == base:
                cached = max(cached, req.session_prefix_tokens)
            self.session_home[req.session_id] = base
            if self.session_mover is not None:
                pinned = (len(req.input_ids) + self._max_new(req)) // self.args.page_size * self.args.page_size
                self.session_mover.turn_sent(req.session_id, req.rid, pinned,
                                             len(req.input_ids) - req.session_prefix_tokens, req.next_turn_in_s)
        view.routed_prefill_since_report += max(1, len(req.input_ids) - cached)
        cap = view.report.kv_capacity_tokens if view.report else None
        self.prefix_index.insert(base, req.input_ids, cap // self.args.page_size if cap else None, hashes)
        view.routed_since_report += 1
        view.routed_tokens_since_report += len(req.input_ids) + self._max_new(req)
        view.routed_prompt_since_report = max(view.routed_prompt_since_report, len(req.input_ids))
        self.send_to_worker[base].send_pyobj(req)

    # ---- policy ------------------------------------------------------------------------------------------
    def _max_new(self, req: TokenizedGenerateReqInput) -> int:
        """max_new_tokens as the scheduler will clip it (None: up to the context length)."""
        n = req.sampling_params.max_new_tokens
        limit = self.context_len - len(req.input_ids)
        return max(0, min(int(n), limit) if n is not None else limit)

    def _request_info(self, req: TokenizedGenerateReqInput) -> RequestInfo:
        cached = self._cached_info.get(req.rid)
        if cached is None:  # once per request (held requests are described again on every tick)
            cached = tuple(sorted((b, n) for b, n in self.cached_tokens_by_instance(req).items() if n))
            self._cached_info[req.rid] = cached
        return RequestInfo(req.rid, len(req.input_ids), self._max_new(req), req.arrival_time, cached)

    def cluster_state(self) -> ClusterState:
        busy = self._busy_bases()
        loads = []
        for view in self.views.values():
            r = view.report
            loads.append(InstanceLoad(
                devices=tuple(view.instance.devices), tp=view.instance.tp,
                running=(r.running if r else 0) + view.routed_since_report,
                waiting=r.waiting if r else 0,
                kv_capacity_tokens=r.kv_capacity_tokens if r else 0,
                kv_used_tokens=r.kv_used_tokens if r else 0,
                kv_evictable_tokens=r.kv_evictable_tokens if r else 0,
                tokens_in_flight=(r.tokens_in_flight if r else 0) + view.routed_tokens_since_report,
                transforming=view.instance_id in busy or r is None,
                idle_since=view.idle_since,
                prefill_tokens_left=max(r.prefill_tokens_left if r else 0, view.routed_prompt_since_report),
                prefill_tokens_queued=(r.prefill_tokens_queued if r else 0) + view.routed_prefill_since_report,
            ))
        return ClusterState(self.args.num_devices, self.max_tp, tuple(loads), time.time(),
                            tuple(self._request_info(m) for m in self.held), tuple(sorted(self.capacity_by_tp.items())))

    def tick(self) -> None:
        if self.active is None and self.startup_transforms:
            t = self.startup_transforms.pop(0)
            self.start_transform(GygesTransformReq("", list(t.devices), t.tp), internal=True)
            return
        if self.active is not None or self.moves_in_flight or any(v.report is None for v in self.views.values()):
            return
        self.apply(self.policy.on_tick(self.cluster_state()))

    def apply(self, decisions, current: Optional[TokenizedGenerateReqInput] = None) -> None:
        """Carry out the policy's decisions in order."""
        by_rid = {m.rid: m for m in self.held}
        if current is not None:
            by_rid[current.rid] = current
        for d in decisions:
            if isinstance(d, Place):
                req = by_rid.pop(d.rid)
                self._unhold(d.rid)
                self.send_to_instance(req, d.instance)
            elif isinstance(d, Hold):
                if current is not None and d.rid == current.rid:
                    self.held.append(current)
            elif isinstance(d, Reject):
                req = by_rid.pop(d.rid)
                self._unhold(d.rid)
                self.reject(req, d.message)
            elif isinstance(d, Transform):
                if self.active is None:
                    self.start_transform(GygesTransformReq("", list(d.devices), d.tp), internal=True)
            else:
                logger.error("unknown policy decision %r", d)

    def _unhold(self, rid: str) -> None:
        self.held = [m for m in self.held if m.rid != rid]
        self._cached_info.pop(rid, None)

    def _abort_held(self, msg: AbortReq) -> None:
        hit = [m for m in self.held if msg.abort_all or (m.rid == msg.rid and m.arrival_time <= msg.issued_at)]
        for m in hit:
            self._unhold(m.rid)
            self.reject(m, "aborted", 499)

    # ---- Gyges transformations -------------------------------------------------------------------------
    def start_transform(self, msg: GygesTransformReq, internal: bool = False) -> None:
        def refuse(text: str) -> None:
            if internal:
                logger.error("policy transformation %s tp=%d refused: %s", msg.devices, msg.tp, text)
            else:
                self.send_to_tokenizer.send_pyobj(GygesTransformReqOutput(msg.req_id, False, text))

        if not self.args.enable_gyges:
            return refuse("transformations need a server started with --enable-gyges")
        if self.active is not None:
            return refuse("another transformation is in progress")
        if self.moves_in_flight:
            return refuse("a session's KV is being moved between instances; retry in a moment")
        devices = sorted(int(d) for d in msg.devices)
        if self.dead_devices & set(devices):
            return refuse(f"devices {sorted(self.dead_devices & set(devices))} lost their worker process")
        try:
            if msg.tp == len(devices):
                new_topology = self.topology.merge(devices)
                src = self.topology.merge_sources(devices)
                dst = [i for i in new_topology.instances if set(i.devices) == set(devices)]
                kind = "merge"
            else:
                new_topology = self.topology.split(devices, msg.tp)
                src = [self.topology.instance_of(devices[0])]
                dst = [i for i in new_topology.instances if set(i.devices) <= set(devices)]
                kind = "split"
        except ValueError as e:
            return refuse(str(e))
        cmd = TransformCmd(
            transform_id=uuid.uuid4().hex,
            kind=kind,
            src_instances=[list(i.devices) for i in sorted(src, key=lambda i: i.leader)],
            dst_instances=[list(i.devices) for i in sorted(dst, key=lambda i: i.leader)],
            issued_at=time.time(),
        )
        self.active = ActiveTransform(None if internal else msg.req_id, cmd,
                                      deadline=time.monotonic() + self.args.gyges_transform_timeout)
        self.early_reports.clear()
        self._pending_topology = new_topology
        for inst in src:
            self.send_to_worker[inst.leader].send_pyobj(cmd)

    def finish_transform(self, done: TransformDone) -> None:
        active = self.active
        if active is None or done.transform_id != active.cmd.transform_id:
            logger.error("unexpected TransformDone %s", done.transform_id)
            return
        active.done = done
        if done.success:
            self.topology = self._pending_topology
            self._set_instances(self.topology.instances)
            self._regroup_affinity(active.cmd)
            for base, rids in done.placements.items():
                for rid in rids:
                    if rid in self.routed:
                        self.routed[rid] = base
            bd = done.breakdown
            self.history.append({"kind": active.cmd.kind, "devices": bd.get("devices"), "tp": bd.get("tp"),
                                 "at": time.time(), **bd})
        self._maybe_complete_transform()

    def _regroup_affinity(self, cmd: TransformCmd) -> None:
        """After a merge / split: the prefix index and session homes follow the instances (a session on a
        split instance is first assumed on the part with the old leader, every part inherits the cached
        prefixes; the new leaders' first reports, with their sessions and cached blocks, correct both)."""
        sources = [inst[0] for inst in cmd.src_instances]
        targets = [inst[0] for inst in cmd.dst_instances]
        self.prefix_index.regroup(sources, targets)
        self._apply_reported_prefixes()
        for base in sources:
            if base not in targets:
                self.reported_sessions.pop(base, None)
        for sid, home in list(self.session_home.items()):
            if home in sources and home not in self.views:
                inst = self.topology.instance_of(home)
                self.session_home[sid] = inst.leader

    def _apply_reported_prefixes(self) -> None:
        """A new leader reported the blocks its radix cache holds: that replaces the regrouped guess."""
        for base, hashes in list(self.reported_prefixes.items()):
            if base in self.views:
                cap = self.views[base].report.kv_capacity_tokens if self.views[base].report else None
                self.prefix_index.replace(base, hashes, cap // self.args.page_size if cap else None)
                del self.reported_prefixes[base]

    def _sessions_reported(self, instance_id: int, sessions: List[str]) -> None:
        """An instance's report listed the sessions pinned there: they live there; those that left the list
        were unpinned (their KV may be evicted), so they no longer count as living anywhere."""
        now = set(sessions)
        before = self.reported_sessions.get(instance_id, set())
        for sid in before - now:
            if self.session_home.get(sid) == instance_id:
                del self.session_home[sid]
        for sid in now:
            # A session still listed from before does not take its home back: a later turn may have been
            # placed elsewhere meanwhile (an instance with a host tier lists the sessions it keeps there).
            if sid not in before or sid not in self.session_home:
                self.session_home[sid] = instance_id
        self.reported_sessions[instance_id] = now

    def _maybe_complete_transform(self) -> None:
        """Answer and release held messages once every new instance has reported (its capacity is known)."""
        active = self.active
        if active is None or active.done is None:
            return
        if active.done.success and any(v.report is None for v in self.views.values()):
            return
        self.active = None
        done = active.done
        if active.req_id is not None:
            self.send_to_tokenizer.send_pyobj(
                GygesTransformReqOutput(active.req_id, done.success, done.message, dict(done.breakdown)))
        elif not done.success:
            logger.error("policy transformation failed: %s", done.message)
        for msg in active.held:
            self.handle_tokenizer_message(msg)

    # ---- failures ----------------------------------------------------------------------------------------
    def worker_died(self, msg: WorkerDied) -> None:
        """A worker process exited: its instance fails (all of a transformation's devices if it was in one)."""
        if msg.rank in self.dead_devices:
            return
        self.fail_devices({msg.rank}, f"worker of device {msg.rank} exited (code {msg.exitcode})")

    def check_deadlines(self) -> None:
        """Watchdog, transformation deadline, reply deadlines (called every loop, at least every 100 ms)."""
        now = time.monotonic()
        active = self.active
        if active is not None and now > active.deadline:
            self.fail_devices(set(active.cmd.devices), f"the {active.cmd.kind} of devices {active.cmd.devices} did not "
                              f"finish within {self.args.gyges_transform_timeout:g} s (--gyges-transform-timeout)")
        busy = self._busy_bases()
        for view in list(self.views.values()):
            if view.instance_id in busy or view.instance_id not in self.views:
                continue
            if not view.has_work:
                view.progress_at = now
            elif now - view.progress_at > self.args.watchdog_timeout:
                r = view.report
                state = (f"{r.running} running, {r.waiting} waiting, {r.kv_used_tokens}/{r.kv_capacity_tokens} "
                         f"KV tokens used, forward_ct {r.forward_ct}" if r else "no report")
                self.fail_devices(set(view.instance.devices),
                                  f"the instance on devices {list(view.instance.devices)} made no progress for "
                                  f"{now - view.progress_at:.0f} s with work queued ({state}; --watchdog-timeout "
                                  f"{self.args.watchdog_timeout:g} s)")
        for req_id, pending in list(self.pending_replies.items()):
            if now > pending.deadline:
                self._answer(req_id)

    def fail_devices(self, devices: set, reason: str) -> None:
        """The instances holding any of `devices` fail (all of a transformation's devices if one of them is in
        it): their requests get a 503 with `reason`, their workers are killed (the TokenizerManager does it:
        they may be hung in a collective) so their memory is freed, and every other instance keeps serving."""
        doomed = set(devices)
        active = self.active
        held = []
        if active is not None and doomed & set(active.cmd.devices):
            doomed |= set(active.cmd.devices)
            if f"{active.cmd.kind} of devices" not in reason:
                reason += f" during a {active.cmd.kind} of devices {active.cmd.devices}"
            self.active = None
            if active.req_id is not None:
                self.send_to_tokenizer.send_pyobj(GygesTransformReqOutput(
                    active.req_id, False, f"the transformation failed: {reason}", status_code=503))
            held = active.held
        for view in self.views.values():
            if doomed & set(view.instance.devices):
                doomed |= set(view.instance.devices)
        doomed -= self.dead_devices
        if not doomed:
            return
        self.dead_devices |= doomed
        logger.error("devices %s failed: %s", sorted(doomed), reason)
        for base in [b for b, v in self.views.items() if set(v.instance.devices) & doomed]:
            view = self.views.pop(base)
            self.failed.append(list(view.instance.devices))
            self.failed_reasons.append(reason)
            if view.report is not None:
                logger.error("last report of the failed instance %s: %s", list(view.instance.devices), view.report)
            for rid in [r for r, b in self.routed.items() if b == base]:
                del self.routed[rid]
                delta = ReqOutputDelta(rid=rid, new_output_ids=[], finish_reason=finish_abort(
                    f"the instance serving this request failed: {reason}", 503), prompt_tokens=0,
                    completion_tokens=0, cached_tokens=0)
                self.send_outputs_to_tokenizer.send_pyobj(BatchStrOut([ReqStrOut(rid, "", [], delta)]))
            for pending in self.pending_replies.values():
                pending.waiting_for.discard(base)
        self.send_to_tokenizer.send_pyobj(ServingState(len(self.views), list(self.failed), list(self.failed_reasons),
                                                       kill_ranks=sorted(doomed)))
        for req_id, mv in list(self.moves_in_flight.items()):  # a move with a side gone never gets its reply
            if mv.src not in self.views:
                self._end_move(req_id, False, f"instance {mv.src} failed during the move: {reason}")
            elif mv.dst not in self.views and mv.transfer is not None and not mv.returning:
                self._return_to_source(req_id, f"instance {mv.dst} failed during the move: {reason}")
        for req_id in [k for k, p in self.pending_replies.items() if not p.waiting_for]:
            self._answer(req_id)
        for m in held:
            self.handle_tokenizer_message(m)

    def _answer(self, req_id: str) -> None:
        """Answer a flush / internal-state query with the replies that came (missing instances named)."""
        pending = self.pending_replies.pop(req_id)
        missing = sorted(b for b in pending.waiting_for if b in self.views)
        if isinstance(pending.request, FlushCacheReq):
            ok = not missing and all(r.success for r in pending.replies)
            self.send_to_tokenizer.send_pyobj(FlushCacheReqOutput(req_id, ok))
            return
        replies = sorted(pending.replies, key=lambda r: r.instance_id)
        for base in missing:
            replies.append(GetInternalStateReqOutput(req_id, base, {
                "instance_id": base, "devices": list(self.views[base].instance.devices),
                "error": f"no answer within {REPLY_TIMEOUT_S:g} s (busy or hung)"}))
        self.send_to_tokenizer.send_pyobj(replies)

    def describe(self) -> List[dict]:
        out = []
        busy = self._busy_bases()
        for view in self.views.values():
            r = view.report
            out.append({
                "id": view.instance_id,
                "devices": list(view.instance.devices),
                "tp": view.instance.tp,
                "state": "transforming" if view.instance_id in busy else "serving",
                "running": r.running if r else 0,
                "waiting": r.waiting if r else 0,
                "kv_capacity_tokens": r.kv_capacity_tokens if r else 0,
                "kv_used_tokens": r.kv_used_tokens if r else 0,
            })
        for devices, reason in zip(self.failed, self.failed_reasons):
            out.append({"id": devices[0], "devices": devices, "tp": len(devices), "state": "failed", "running": 0,
                        "waiting": 0, "kv_capacity_tokens": 0, "kv_used_tokens": 0, "reason": reason})
        return out

    # ---- from the leaders ------------------------------------------------------------------------------
    def handle_worker_message(self, msg) -> None:
        if isinstance(msg, InstanceReport):
            view = self.views.get(msg.instance_id)
            if msg.capacity_by_tp:
                self.capacity_by_tp = dict(msg.capacity_by_tp)
            for rid in msg.finished_rids:
                self.routed.pop(rid, None)
                if self.session_mover is not None:
                    self.session_mover.turn_finished(rid, time.monotonic())
            if msg.sessions is not None:
                self._sessions_reported(msg.instance_id, msg.sessions)
            if msg.cached_prefix_hashes is not None:
                self.reported_prefixes[msg.instance_id] = msg.cached_prefix_hashes
                if self.active is None or self.active.done is not None:  # else: after the regroup
                    self._apply_reported_prefixes()
            if view is None:
                # A new leader of a split can report before the transformation's TransformDone arrives
                # (it comes from another worker's socket): keep it for the view about to be created.
                self.early_reports[msg.instance_id] = msg
            else:
                if view.report is None or msg.forward_ct != view.report.forward_ct:
                    view.progress_at = time.monotonic()
                view.report = msg
                view.routed_since_report = 0
                view.routed_tokens_since_report = 0
                view.routed_prompt_since_report = 0
                view.routed_prefill_since_report = 0
                if msg.running + msg.waiting == 0:
                    view.idle_since = view.idle_since or time.time()
                else:
                    view.idle_since = None
                self._maybe_complete_transform()
        elif isinstance(msg, TransformDone):
            self.finish_transform(msg)
        elif isinstance(msg, (FlushCacheReqOutput, GetInternalStateReqOutput)):
            pending = self.pending_replies.get(msg.req_id)
            if pending is None:
                return
            pending.replies.append(msg)
            pending.waiting_for.discard(msg.instance_id)
            if not pending.waiting_for:
                self._answer(msg.req_id)
        elif isinstance(msg, SessionKVTransfer):
            self._session_exported(msg)
        elif isinstance(msg, MoveSessionReqOutput):
            self._session_adopted(msg)
        else:
            logger.error("controller got an unknown worker message %r", type(msg))

    def move_session(self, msg: MoveSessionReq) -> None:
        """Admin: move a session's pinned KV to instance dst_instance (source exports, destination adopts; both
        keep serving). Refused (400) during a transformation, for an unknown session or instance."""
        def refuse(text: str) -> None:
            self.send_to_tokenizer.send_pyobj(MoveSessionReqOutput(msg.req_id, False, text))

        src = self.session_home.get(msg.session_id)
        if self.active is not None:
            return refuse("a merge/split is in progress; move the session after it")
        if src is None or src not in self.views:
            return refuse(f"session {msg.session_id!r} has no KV on any instance (not open, or not pinned)")
        if msg.dst_instance not in self.views:
            return refuse(f"no instance {msg.dst_instance!r}; instances: {sorted(self.views)}")
        if msg.dst_instance == src:
            return refuse(f"session {msg.session_id!r} is already on instance {src}")
        if self._move_of(msg.session_id) is not None:
            return refuse(f"session {msg.session_id!r} is being moved already")
        self._start_move(msg.req_id, msg.session_id, src, msg.dst_instance, auto=False)

    def _move_of(self, session_id: str) -> Optional[MoveInFlight]:
        return next((mv for mv in self.moves_in_flight.values() if mv.session_id == session_id), None)

    def _start_move(self, req_id: str, session_id: str, src: int, dst: int, auto: bool) -> None:
        self.moves_in_flight[req_id] = MoveInFlight(session_id, src, dst, auto)
        self.send_to_worker[src].send_pyobj(SessionKVTransfer(req_id, session_id, dst))

    def auto_move_sessions(self) -> None:
        """--session-auto-move: start the moves the SessionMover picks from the hints and the latest load
        reports (one at a time, never during a transformation)."""
        if self.active is not None or self.moves_in_flight or any(v.report is None for v in self.views.values()):
            return
        homes = {sid: b for sid, b in self.session_home.items() if b in self.views}
        if not homes:
            return
        budget = self.args.session_kv_budget
        instances = []
        for view in self.views.values():
            r = view.report
            load = self._instance_load(view)
            free = r.kv_capacity_tokens - r.kv_used_tokens + r.kv_evictable_tokens - r.kv_pinned_tokens
            room = min(free - view.routed_tokens_since_report, int(budget * r.kv_capacity_tokens) - r.kv_pinned_tokens)
            instances.append(InstanceForMoves(load, room, r.kv_pinned_tokens))
        for mv in self.session_mover.plan(time.monotonic(), homes, instances):
            logger.info("moving session %s from instance %d to %d (%s, gain %.3g)", mv.session_id, mv.src, mv.dst,
                        mv.reason, mv.gain)
            self._start_move(f"auto-move-{uuid.uuid4().hex}", mv.session_id, mv.src, mv.dst, auto=True)

    def _session_exported(self, msg: SessionKVTransfer) -> None:
        """The source exported the session (or refused): on to the destination, unless it is gone or the
        session was closed meanwhile (then the KV is dropped)."""
        mv = self.moves_in_flight.get(msg.req_id)
        if mv is None:
            return
        if msg.error is not None:
            return self._end_move(msg.req_id, False, msg.error)
        if mv.closed:
            return self._end_move(msg.req_id, False, f"session {mv.session_id!r} was closed during the move")
        mv.transfer = msg
        if msg.dst_instance not in self.views:
            return self._return_to_source(msg.req_id, f"instance {msg.dst_instance} is gone (a transformation "
                                                       "ran meanwhile)")
        self.session_home[msg.session_id] = msg.dst_instance
        self.send_to_worker[msg.dst_instance].send_pyobj(msg)

    def _session_adopted(self, msg: MoveSessionReqOutput) -> None:
        mv = self.moves_in_flight.get(msg.req_id)
        if mv is None:
            return
        if mv.returning:
            if not msg.success:
                logger.warning("session %s: the source could not take its KV back (%s); it is recomputed on its "
                               "next turn", mv.session_id, msg.message)
                if self.session_home.get(mv.session_id) == mv.src:
                    del self.session_home[mv.session_id]
            return self._end_move(msg.req_id, False, None)
        if not msg.success:
            return self._return_to_source(msg.req_id, msg.message)
        self._end_move(msg.req_id, True, msg)

    def _return_to_source(self, req_id: str, error: str) -> None:
        """The destination refused (or is gone): the source adopts its exported KV again."""
        mv = self.moves_in_flight[req_id]
        self._answer_move(mv, req_id, MoveSessionReqOutput(req_id, False, error))
        if mv.src not in self.views:
            return self._end_move(req_id, False, None)
        mv.returning = True
        self.session_home[mv.session_id] = mv.src
        back = SessionKVTransfer(req_id, mv.session_id, mv.src, mv.transfer.tokens, mv.transfer.kv)
        self.send_to_worker[mv.src].send_pyobj(back)

    def _answer_move(self, mv: MoveInFlight, req_id: str, out: MoveSessionReqOutput) -> None:
        if not mv.auto and not mv.answered:
            self.send_to_tokenizer.send_pyobj(out)
        mv.answered = True

    def _end_move(self, req_id: str, ok: bool, answer) -> None:
        """The move is over (answer: the destination's reply, an error text, or None when answered already):
        the session's held turns are placed, a session closed meanwhile is closed where its KV went."""
        mv = self.moves_in_flight.pop(req_id)
        if answer is not None:
            self._answer_move(mv, req_id, answer if isinstance(answer, MoveSessionReqOutput)
                              else MoveSessionReqOutput(req_id, False, answer))
        if mv.auto:  # (a move by hand is not the mover's: it may move the session on)
            self.session_mover.move_done(mv.session_id, ok, time.monotonic())
        if mv.closed:
            for base in (mv.src, mv.dst):
                if base in self.views:
                    self.send_to_worker[base].send_pyobj(CloseSessionReqInput(mv.session_id))
            self.session_home.pop(mv.session_id, None)
        for req in mv.held:
            self.route(req)


def run_controller_process(server_args: ServerArgs, port_args: PortArgs, pipe_writer) -> None:
    die_with_parent()
    configure_logger(server_args.log_level, " controller")
    try:
        controller = Controller(server_args, port_args)
        pipe_writer.send("ready")
        controller.event_loop()
    except Exception as e:
        logger.exception("controller failed")
        pipe_writer.send(f"controller failed: {e}")
        raise
