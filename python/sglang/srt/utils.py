"""Small process / socket helpers shared by the runtime's processes."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import List

import zmq


def configure_logger(level: str, prefix: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"[%(asctime)s{prefix}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def get_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits, so a crashed launcher leaves no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


def get_zmq_socket(context: zmq.Context, socket_type: int, endpoint: str, bind: bool) -> zmq.Socket:
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    if socket_type in (zmq.PUSH, zmq.PUB):
        sock.setsockopt(zmq.SNDHWM, 0)
    if socket_type in (zmq.PULL, zmq.SUB):
        sock.setsockopt(zmq.RCVHWM, 0)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


@dataclass
class PortArgs:
    """ipc:// endpoints of every process; created once by the launcher and passed to every process."""

    # TokenizerManager -> Controller (requests, aborts, flush, state queries).
    controller_input: str
    # Controller -> TokenizerManager (replies to flush / state queries).
    tokenizer_replies: str
    # Schedulers -> Controller (instance reports and replies).
    controller_from_workers: str
    # Schedulers -> Detokenizer (token ids).
    detokenizer_input: str
    # Detokenizer -> TokenizerManager (text).
    tokenizer_input: str
    # Controller -> worker of global rank r (only leaders read theirs; every worker has one).
    worker_inputs: List[str] = field(default_factory=list)
    # torch.distributed rendezvous.
    dist_init_method: str = ""

    @staticmethod
    def create(num_workers: int, dist_port: int) -> "PortArgs":
        base = os.path.join(tempfile.gettempdir(), f"sglang-{uuid.uuid4().hex[:12]}")

        def ep(name: str) -> str:
            return f"ipc://{base}-{name}"

        return PortArgs(
            controller_input=ep("ctl-in"),
            tokenizer_replies=ep("tok-replies"),
            controller_from_workers=ep("ctl-from-workers"),
            detokenizer_input=ep("detok-in"),
            tokenizer_input=ep("tok-in"),
            worker_inputs=[ep(f"worker-{r}") for r in range(num_workers)],
            dist_init_method=f"tcp://127.0.0.1:{dist_port}",
        )

    def ipc_files(self) -> List[str]:
        eps = [self.controller_input, self.tokenizer_replies, self.controller_from_workers,
               self.detokenizer_input, self.tokenizer_input, *self.worker_inputs]
        return [e[len("ipc://"):] for e in eps]


def remove_ipc_files(port_args: PortArgs) -> None:
    """Unlink every ipc:// socket file of a server (safe to call more than once, from any exit path)."""
    for path in port_args.ipc_files():
        try:
            os.unlink(path)
        except OSError:
            pass


def cpu_share(rank: int, world_size: int) -> List[int]:
    """Cores a CPU worker is pinned to: an even share when there are enough, else one core round-robin."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= world_size:
        per = len(cores) // world_size
        return cores[rank * per:(rank + 1) * per]
    return [cores[rank % len(cores)]]
