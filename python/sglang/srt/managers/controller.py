"""Controller process: between the TokenizerManager and the instance leaders (DESIGN §3).

    TokenizerManager --requests / aborts / flush / state queries--> Controller
    Controller --route each request to one instance leader; broadcast aborts, flush and queries-->
    leaders --InstanceReport every change, replies--> Controller --aggregated replies--> TokenizerManager

Static serving routes each request to the least-loaded instance (tokens still to produce, then queue
length). Gyges' policy plugs in here (it decides placement and transformations from the same reports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import zmq

from sglang.srt.managers.io_struct import (
    AbortReq,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    InstanceReport,
    TokenizedGenerateReqInput,
)
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, configure_logger, die_with_parent, get_zmq_socket

logger = logging.getLogger(__name__)


@dataclass
class InstanceView:
    """What the controller knows about one instance."""

    instance_id: int
    ranks: List[int]
    report: Optional[InstanceReport] = None
    routed_since_report: int = 0  # requests sent after the last report (not yet counted by it)

    def load_key(self):
        r = self.report
        in_flight = r.tokens_in_flight if r else 0
        queued = (r.running + r.waiting) if r else 0
        return (queued + self.routed_since_report, in_flight, self.instance_id)


class Controller:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs):
        self.args = server_args
        tp = server_args.tp_size
        self.instances = [InstanceView(i, list(range(i * tp, i * tp + tp))) for i in range(server_args.dp_size)]
        ctx = zmq.Context(2)
        self.recv_from_tokenizer = get_zmq_socket(ctx, zmq.PULL, port_args.controller_input, bind=True)
        self.recv_from_workers = get_zmq_socket(ctx, zmq.PULL, port_args.controller_from_workers, bind=True)
        self.send_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_replies, bind=False)
        self.send_to_leader: Dict[int, zmq.Socket] = {
            inst.instance_id: get_zmq_socket(ctx, zmq.PUSH, port_args.worker_inputs[inst.ranks[0]], bind=False)
            for inst in self.instances
        }
        self.pending_replies: Dict[str, list] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        self.poller.register(self.recv_from_workers, zmq.POLLIN)

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
        if isinstance(msg, TokenizedGenerateReqInput):
            inst = self.place(msg)
            inst.routed_since_report += 1
            self.send_to_leader[inst.instance_id].send_pyobj(msg)
        elif isinstance(msg, (AbortReq, FlushCacheReq, GetInternalStateReq)):
            if not isinstance(msg, AbortReq):
                self.pending_replies[msg.req_id] = []
            for sock in self.send_to_leader.values():
                sock.send_pyobj(msg)
        else:
            logger.error("controller got an unknown message %r", type(msg))

    def place(self, req: TokenizedGenerateReqInput) -> InstanceView:
        """Least-loaded instance whose capacity holds the prompt (all instances have the same shape here)."""
        return min(self.instances, key=InstanceView.load_key)

    # ---- from the leaders ------------------------------------------------------------------------------
    def handle_worker_message(self, msg) -> None:
        if isinstance(msg, InstanceReport):
            inst = self.instances[msg.instance_id]
            inst.report = msg
            inst.routed_since_report = 0
        elif isinstance(msg, (FlushCacheReqOutput, GetInternalStateReqOutput)):
            replies = self.pending_replies.get(msg.req_id)
            if replies is None:
                return
            replies.append(msg)
            if len(replies) == len(self.instances):
                del self.pending_replies[msg.req_id]
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
