"""Controller process: between the TokenizerManager and the instance leaders (DESIGN §3, §6).

    TokenizerManager --requests / aborts / flush / state / Gyges admin--> Controller
    Controller --route each request to one instance leader; broadcast aborts, flush and queries-->
    leaders --InstanceReport on change, replies, TransformDone--> Controller --replies--> TokenizerManager

The controller owns the topology (gyges.topology.Topology): which devices form which instance. Requests
go to the least-loaded instance whose KV capacity holds them. A Gyges transformation (POST
/gyges/transform) is validated against the topology, sent to the source instances' leaders, and while
it runs the requests and control messages that would touch those instances are held here and released
to the new instances when it is done.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import zmq

from gyges.topology import Instance, Topology
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    GygesTopologyReq,
    GygesTopologyReqOutput,
    GygesTransformReq,
    GygesTransformReqOutput,
    InstanceReport,
    ReqOutputDelta,
    ReqStrOut,
    TokenizedGenerateReqInput,
    TransformCmd,
    TransformDone,
)
from sglang.srt.managers.schedule_batch import finish_abort
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, configure_logger, die_with_parent, get_zmq_socket

logger = logging.getLogger(__name__)


@dataclass
class InstanceView:
    """What the controller knows about one instance."""

    instance: Instance
    report: Optional[InstanceReport] = None
    routed_since_report: int = 0  # requests sent after the last report (not yet counted by it)
    capacity_tokens: int = 0  # KV capacity (from reports; an estimate until the first one)

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
    req_id: str  # the TokenizerManager's request
    cmd: TransformCmd
    held: List[object] = field(default_factory=list)  # messages that wait for the new topology


class Controller:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs):
        self.args = server_args
        n = server_args.num_devices
        max_tp = (server_args.gyges_max_tp or n) if server_args.enable_gyges else server_args.tp_size
        self.topology = Topology.uniform(n, server_args.tp_size, max_tp=max_tp)
        self.views: Dict[int, InstanceView] = {}
        self._set_instances(self.topology.instances)
        ctx = zmq.Context(2)
        self.recv_from_tokenizer = get_zmq_socket(ctx, zmq.PULL, port_args.controller_input, bind=True)
        self.recv_from_workers = get_zmq_socket(ctx, zmq.PULL, port_args.controller_from_workers, bind=True)
        self.send_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_replies, bind=False)
        self.send_outputs_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_input, bind=False)
        self.send_to_worker: Dict[int, zmq.Socket] = {
            r: get_zmq_socket(ctx, zmq.PUSH, port_args.worker_inputs[r], bind=False) for r in range(n)
        }
        self.pending_replies: Dict[str, list] = {}
        self.expected_replies: Dict[str, int] = {}
        self.active: Optional[ActiveTransform] = None
        self.history: List[dict] = []
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        self.poller.register(self.recv_from_workers, zmq.POLLIN)

    def _set_instances(self, instances) -> None:
        old = self.views
        self.views = {}
        for inst in sorted(instances, key=lambda i: i.leader):
            view = old.get(inst.leader)
            if view is None or view.instance != inst:
                view = InstanceView(inst)
            self.views[inst.leader] = view

    def event_loop(self) -> None:
        while True:
            for sock, _ in self.poller.poll():
                while True:
                    try:
                        msg = sock.recv_pyobj(zmq.NOBLOCK)
                    except zmq.ZMQError:
                        break
                    if sock is self.recv_from_tokenizer:
                        self.handle_tokenizer_message(msg)
                    else:
                        self.handle_worker_message(msg)

    # ---- from the TokenizerManager ---------------------------------------------------------------------
    def handle_tokenizer_message(self, msg) -> None:
        if isinstance(msg, GygesTopologyReq):
            self.send_to_tokenizer.send_pyobj(GygesTopologyReqOutput(msg.req_id, self.describe(), list(self.history)))
            return
        if isinstance(msg, GygesTransformReq):
            self.start_transform(msg)
            return
        if self.active is not None and not self._can_pass_during_transform(msg):
            self.active.held.append(msg)
            return
        if isinstance(msg, TokenizedGenerateReqInput):
            self.route(msg)
        elif isinstance(msg, (AbortReq, FlushCacheReq, GetInternalStateReq)):
            if not isinstance(msg, AbortReq):
                self.pending_replies[msg.req_id] = []
                self.expected_replies[msg.req_id] = len(self.views)
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
        return min(fits, key=InstanceView.load_key) if fits else None

    def route(self, req: TokenizedGenerateReqInput) -> None:
        view = self._place(req)
        if view is None:
            self.reject(req, self._too_long_message(req))
            return
        view.routed_since_report += 1
        self.send_to_worker[view.instance_id].send_pyobj(req)

    def _too_long_message(self, req: TokenizedGenerateReqInput) -> str:
        largest = max((v.report.kv_capacity_tokens for v in self.views.values() if v.report), default=0)
        text = (f"the prompt has {len(req.input_ids)} tokens, more than the KV capacity of every instance "
                f"now serving (largest: {largest} tokens)")
        if self.args.enable_gyges:
            text += ("; merge instances into a larger tensor-parallel instance (POST /gyges/transform) "
                     "to serve it")
        return text

    def reject(self, req: TokenizedGenerateReqInput, message: str) -> None:
        delta = ReqOutputDelta(rid=req.rid, new_output_ids=[], finish_reason=finish_abort(message, 400),
                               prompt_tokens=len(req.input_ids), completion_tokens=0, cached_tokens=0)
        self.send_outputs_to_tokenizer.send_pyobj(BatchStrOut([ReqStrOut(req.rid, "", [], delta)]))

    # ---- Gyges transformations -------------------------------------------------------------------------
    def start_transform(self, msg: GygesTransformReq) -> None:
        def refuse(text: str) -> None:
            self.send_to_tokenizer.send_pyobj(GygesTransformReqOutput(msg.req_id, False, text))

        if not self.args.enable_gyges:
            return refuse("transformations need a server started with --enable-gyges")
        if self.active is not None:
            return refuse("another transformation is in progress")
        devices = sorted(int(d) for d in msg.devices)
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
        self.active = ActiveTransform(msg.req_id, cmd)
        self._pending_topology = new_topology
        for inst in src:
            self.send_to_worker[inst.leader].send_pyobj(cmd)

    def finish_transform(self, done: TransformDone) -> None:
        active = self.active
        if active is None or done.transform_id != active.cmd.transform_id:
            logger.error("unexpected TransformDone %s", done.transform_id)
            return
        self.active = None
        breakdown = dict(done.breakdown)
        if done.success:
            self.topology = self._pending_topology
            self._set_instances(self.topology.instances)
            self.history.append({"kind": active.cmd.kind, "devices": breakdown.get("devices"),
                                 "tp": breakdown.get("tp"), "at": time.time(), **breakdown})
        self.send_to_tokenizer.send_pyobj(
            GygesTransformReqOutput(active.req_id, done.success, done.message, breakdown))
        for msg in active.held:
            self.handle_tokenizer_message(msg)

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
        return out

    # ---- from the leaders ------------------------------------------------------------------------------
    def handle_worker_message(self, msg) -> None:
        if isinstance(msg, InstanceReport):
            view = self.views.get(msg.instance_id)
            if view is not None:
                view.report = msg
                view.routed_since_report = 0
        elif isinstance(msg, TransformDone):
            self.finish_transform(msg)
        elif isinstance(msg, (FlushCacheReqOutput, GetInternalStateReqOutput)):
            replies = self.pending_replies.get(msg.req_id)
            if replies is None:
                return
            replies.append(msg)
            if len(replies) >= self.expected_replies[msg.req_id]:
                del self.pending_replies[msg.req_id]
                del self.expected_replies[msg.req_id]
                if isinstance(msg, FlushCacheReqOutput):
                    self.send_to_tokenizer.send_pyobj(
                        FlushCacheReqOutput(msg.req_id, all(r.success for r in replies)))
                else:
                    replies.sort(key=lambda r: r.instance_id)
                    self.send_to_tokenizer.send_pyobj(replies)
        else:
            logger.error("controller got an unknown worker message %r", type(msg))


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
