"""Entry point of a worker process: one per device, alive for the whole life of the server.

    init torch.distributed (world = every device) -> every aligned group's communicators, once, warmed
    -> memory budget: MIN over the world of each device's (one arena size, one plan on every device)
    -> ModelRunner (model on meta, one arena: weights loaded into it in the padded shard-major layout,
       head-centric KV pool over the rest)
    -> leader of its instance: Scheduler.event_loop();  other ranks: follower_loop()

The worker reports WorkerReady (or WorkerFailed with the error) to the launcher through a pipe.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import traceback

from sglang.srt.managers.io_struct import WorkerFailed, WorkerReady
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, configure_logger, cpu_share, die_with_parent

logger = logging.getLogger(__name__)


def run_worker_process(server_args: ServerArgs, port_args: PortArgs, rank: int, pipe_writer) -> None:
    die_with_parent()
    faulthandler.enable()
    configure_logger(server_args.log_level, f" worker{rank}")
    try:
        import torch

        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.managers.scheduler import WorkerChannels
        from sglang.srt.model_executor.model_runner import ModelRunner, local_memory_budget

        world = server_args.num_devices
        if server_args.device == "cpu":
            cores = cpu_share(rank, world)
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(server_args.cpu_threads_per_worker or len(cores))
            device = torch.device("cpu")
            backend = "gloo"
        else:
            device = torch.device("cuda", server_args.base_gpu_id + rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        ps.init_distributed(world, rank, port_args.dist_init_method, backend)
        ps.create_aligned_groups(world, server_args.tp_collective)
        tp = server_args.tp_size
        ranks = list(range(rank // tp * tp, rank // tp * tp + tp))
        tp_group = ps.get_tp_group(ranks)

        model_config = ModelConfig.from_server_args(server_args)
        # Every device of the host sizes the same arena (one plan for every transformation): the smallest
        # budget, measured after the communicators were warmed and before anything of the model exists.
        budget = ps.world_min(local_memory_budget(server_args, device))
        runner = ModelRunner(server_args, model_config, tp_group, device, memory_budget=budget)
        ready = WorkerReady(
            rank=rank,
            max_total_num_tokens=runner.max_total_num_tokens,
            max_req_len=min(model_config.context_len, runner.max_total_num_tokens) - 1,
            weight_bytes=runner.weight_bytes,
            kv_pool_bytes=runner.kv_pool_bytes,
            page_size=server_args.page_size,
            max_formable_tokens=(runner.capacity_tokens_at_tp(server_args.gyges_max_tp or world)
                                 if server_args.enable_gyges else runner.max_total_num_tokens),
        )
        tokenizer = None
        if rank == ranks[0] or server_args.enable_gyges:
            if not server_args.skip_tokenizer_init:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(server_args.tokenizer_path)
        channels = WorkerChannels(port_args, rank)
        serve(server_args, rank, runner, tp_group, tokenizer, channels, lambda: pipe_writer.send(ready))
    except Exception as e:  # report to the launcher, then die: the TokenizerManager sees the exit
        msg = f"{type(e).__name__}: {e}"
        logger.error("worker %d failed: %s\n%s", rank, msg, traceback.format_exc())
        try:
            pipe_writer.send(WorkerFailed(rank, msg))
        except Exception:
            pass
        os._exit(1)


def serve(server_args: ServerArgs, rank: int, runner, tp_group, tokenizer, channels, on_ready) -> None:
    """A worker's life: lead or follow its instance; between iterations, take part in transformations."""
    from sglang.srt.distributed.parallel_state import collective_timeout, get_tp_group
    from sglang.srt.managers.gyges_transform import execute_transform
    from sglang.srt.managers.io_struct import TransformDone
    from sglang.srt.managers.scheduler import Scheduler, follower_loop

    scheduler = None
    migrated = None
    grammar_backend = None
    while True:
        leader = tp_group.ranks[0] == rank
        if leader:
            if scheduler is None:
                scheduler = Scheduler(server_args, channels, runner, tp_group, rank, tokenizer,
                                      grammar_backend=grammar_backend, migrated=migrated)
            if on_ready is not None:
                on_ready()
                on_ready = None
            cmd = scheduler.event_loop()
            tp_group.broadcast_object(cmd)  # wakes this instance's followers
            my_state = scheduler.export_state()
            grammar_backend = scheduler._grammar_backend
        else:
            if on_ready is not None:
                on_ready()
                on_ready = None
            cmd = follower_loop(runner, tp_group)
            if cmd is None:
                return
            my_state = None
        devices = cmd.devices
        # A peer that dies or hangs makes a collective here raise after the deadline (this worker then exits
        # and the controller fails the transformation's instances) instead of waiting forever.
        with collective_timeout(get_tp_group(devices), server_args.gyges_transform_timeout):
            outcome = execute_transform(cmd, rank, runner, my_state)
        if rank == devices[0]:
            channels.send_to_controller.send_pyobj(
                TransformDone(cmd.transform_id, outcome.ok, outcome.message, outcome.breakdown, outcome.placements))
        if not outcome.ok:
            continue  # refused before anything moved: the same instance and scheduler go on
        tp_group = get_tp_group(outcome.ranks)
        scheduler, migrated = None, outcome.state
