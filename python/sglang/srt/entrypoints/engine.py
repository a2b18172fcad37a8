"""Process launcher and the in-process API (`sglang.Engine`).

    launch_subprocesses(server_args)
        detokenizer process, controller process, one worker process per device (spawn)
        -> waits until every worker reports WorkerReady (or fails with the first worker's error)
        -> TokenizerManager in the calling process

    Engine(**server_args_kwargs): the same pipeline, with a private asyncio loop on a background thread so
    that generate() can be called from ordinary synchronous code. shutdown() leaves no process behind.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Union

from sglang.srt.managers.io_struct import (CloseSessionReqInput, GenerateReqInput, OpenSessionReqInput, WorkerFailed,
                                           WorkerReady)
from sglang.srt.server_args import ServerArgs, server_args_from_kwargs
from sglang.srt.utils import PortArgs, configure_logger, get_free_port, remove_ipc_files

logger = logging.getLogger(__name__)


def kill_processes(procs: List[mp.Process], timeout: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _wait_ready(reader, proc: mp.Process, what: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if reader.poll(0.2):
            return reader.recv()
        if not proc.is_alive():
            raise RuntimeError(f"{what} exited with code {proc.exitcode} during start-up (see its log above)")
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s")


def launch_subprocesses(server_args: ServerArgs):
    """Start every child process and return the TokenizerManager. Raises with the cause on failure."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.controller import run_controller_process
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.managers.worker import run_worker_process

    configure_logger(server_args.log_level)
    server_args.check()
    model_config = ModelConfig.from_server_args(server_args)  # fail fast on a bad model / tp in this process
    world = server_args.num_devices
    port_args = PortArgs.create(world, server_args.dist_init_port or get_free_port())
    ctx = mp.get_context("spawn")
    procs: List[mp.Process] = []
    try:
        readers = {}
        for name, target in (("detokenizer", run_detokenizer_process), ("controller", run_controller_process)):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=target, args=(server_args, port_args, w), name=name, daemon=True)
            p.start()
            procs.append(p)
            readers[name] = (r, p)
        workers = []
        for rank in range(world):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=run_worker_process, args=(server_args, port_args, rank, w),
                            name=f"worker-{rank}", daemon=True)
            p.start()
            procs.append(p)
            workers.append((r, p))
        for name, (r, p) in readers.items():
            msg = _wait_ready(r, p, name, 120)
            if msg != "ready":
                raise RuntimeError(str(msg))
        infos: List[WorkerReady] = []
        for rank, (r, p) in enumerate(workers):
            msg = _wait_ready(r, p, f"worker {rank}", 600)
            if isinstance(msg, WorkerFailed):
                raise RuntimeError(f"worker {rank} failed to start: {msg.error}")
            infos.append(msg)
    except BaseException:
        kill_processes(procs)
        remove_ipc_files(port_args)
        raise
    max_tokens = max(i.max_total_num_tokens for i in infos)
    max_req_len = max(i.max_req_len for i in infos)
    if server_args.enable_gyges:
        # The largest instance Gyges can form (all its devices' memory, weights sharded the most).
        max_req_len = min(model_config.context_len, min(i.max_formable_tokens for i in infos)) - 1
    logger.info("serving: %d instance(s) of TP%d, KV capacity %d tokens per instance, weights %.1f MiB per device",
                server_args.dp_size, server_args.tp_size, max_tokens, infos[0].weight_bytes / 2**20)
    tm = TokenizerManager(server_args, port_args, model_config, max_tokens, max_req_len, procs)
    tm.worker_infos = infos
    return tm



class Engine:
    """In-process API with SGLang's offline-engine shape: Engine(**ServerArgs fields).generate(...)."""

    def __init__(self, **kwargs):
        self.server_args = server_args_from_kwargs(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-engine-loop", daemon=True)
        self._thread.start()
        self.tokenizer_manager = launch_subprocesses(self.server_args)
        self._closed = False
        atexit.register(self.shutdown)

    # ---- helpers ---------------------------------------------------------------------------------------
    def _run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _collect(self, obj: GenerateReqInput):
        async for out in self.tokenizer_manager.generate_request(obj):
            return out

    # ---- API -------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        sampling_params: Optional[Union[Dict, List[Dict]]] = None,
        input_ids: Optional[Union[List[int], List[List[int]]]] = None,
        return_logprob: Optional[Union[bool, List[bool]]] = False,
        logprob_start_len: Optional[Union[int, List[int]]] = None,
        top_logprobs_num: Optional[Union[int, List[int]]] = None,
        stream: bool = False,
        return_text_in_logprobs: bool = False,
        rid: Optional[Union[str, List[str]]] = None,
        session_params: Optional[Union[Dict, List[Dict]]] = None,
    ) -> Union[Dict, List[Dict], Iterator[Dict]]:
        """Generate for one prompt (returns a dict) or a batch (returns a list); stream=True yields dicts.
        session_params ({"id", "rid", "offset", "replace", "drop_previous_output"}) makes it a turn of a session
        opened with open_session()."""
        if self._closed:
            raise RuntimeError("the engine was shut down")
        obj = GenerateReqInput(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs, stream=stream,
            session_params=session_params,
        )
        if not stream:
            return self._run(self._collect(obj))
        return self._stream(obj)

    def _stream(self, obj: GenerateReqInput) -> Iterator[Dict]:
        agen = self.tokenizer_manager.generate_request(obj)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def flush_cache(self) -> bool:
        return self._run(self.tokenizer_manager.flush_cache())

    def open_session(self, capacity_of_str_len: int, session_id: Optional[str] = None) -> str:
        """Open a session (SGLang's session API); returns its id. ValueError when the id is already open."""
        return self._run(self.tokenizer_manager.open_session(OpenSessionReqInput(capacity_of_str_len, session_id)))

    def close_session(self, session_id: str) -> None:
        """Close a session: its turns are forgotten and its KV released. ValueError when it is not open."""
        self._run(self.tokenizer_manager.close_session(CloseSessionReqInput(session_id)))

    def move_session(self, session_id: str, instance: int) -> Dict[str, Any]:
        """Move an open session's pinned KV to another instance (its leader device id); ValueError if refused."""
        return self._run(self.tokenizer_manager.move_session(session_id, instance))

    def get_internal_state(self) -> List[Dict[str, Any]]:
        return self._run(self.tokenizer_manager.get_internal_state())

    def abort_request(self, rid: str) -> None:
        """Abort the request with this (non-empty) rid."""
        self._run(self.tokenizer_manager.abort_request(rid))

    def abort_all(self) -> None:
        """Abort every request in flight."""
        self._run(self.tokenizer_manager.abort_all())

    def gyges_topology(self) -> Dict[str, Any]:
        """Instances (devices, tp, load, KV) and the transformation history (needs --enable-gyges)."""
        return self._run(self.tokenizer_manager.gyges_topology())

    def gyges_transform(self, devices: List[int], tp: int) -> Dict[str, Any]:
        """Merge `devices` into one TP instance (tp == len(devices)) or split them into TP `tp` instances."""
        return self._run(self.tokenizer_manager.gyges_transform(devices, tp))

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.tokenizer_manager.shutdown()  # also removes the ipc files
        self._run(self.tokenizer_manager.stop_background_tasks(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
