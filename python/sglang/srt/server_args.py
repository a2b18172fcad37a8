"""Every flag of the runtime, in one dataclass.

`python -m sglang.launch_server --help` is generated from the fields below (name -> `--name-with-dashes`,
help text from the field metadata), and `sglang.Engine(**kwargs)` takes the same names as keyword
arguments. Nothing else configures the runtime: no environment variable changes behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional


def _f(default, help: str, choices=None, **kw):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """'512MiB' -> 536870912, '1.5GB' -> 1500000000, '4096' -> 4096 bytes."""
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. 512MiB, 2GiB, 1.5GB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


@dataclass
class ServerArgs:
    # ---- model and tokenizer -------------------------------------------------------------------------
    model_path: str = _f("", "Local directory of a HF checkpoint (config.json + *.safetensors + tokenizer), or a "
                            "GGUF file (*.gguf: config and tokenizer read from it, weights dequantized at load).")
    tokenizer_path: Optional[str] = _f(None, "Tokenizer directory; defaults to --model-path.")
    skip_tokenizer_init: bool = _f(False, "Do not load a tokenizer; requests must pass input_ids.")
    dtype: str = _f("auto", "Weight and activation dtype. 'auto' takes the dtype in config.json "
                    "(torch_dtype / dtype), float32 when the config names none.",
                    choices=["auto", "float32", "float16", "bfloat16"])
    context_length: Optional[int] = _f(None, "Maximum context length; defaults to the model's "
                                       "max_position_embeddings.")
    served_model_name: Optional[str] = _f(None, "Model name reported by /v1/models and /get_model_info; "
                                          "defaults to --model-path.")
    chat_template: Optional[str] = _f(None, "Jinja chat template (a file path or the template text) used "
                                      "instead of the tokenizer's own.")
    trust_remote_code: bool = _f(False, "Accepted for compatibility; remote code is never executed.")
    random_seed: int = _f(0, "Seed for requests that set no sampling_seed.")

    # ---- HTTP ----------------------------------------------------------------------------------------
    host: str = _f("127.0.0.1", "Address the HTTP server binds to.")
    port: int = _f(30000, "HTTP port.")
    api_key: Optional[str] = _f(None, "If set, every endpoint except /health and /metrics requires "
                                "'Authorization: Bearer <key>'.")
    log_level: str = _f("info", "Logging level of every process.",
                        choices=["debug", "info", "warning", "error"])
    enable_metrics: bool = _f(True, "Serve Prometheus metrics at /metrics.")
    skip_warmup: bool = _f(False, "Report ready without running a warm-up request first.")

    # ---- devices and parallelism ---------------------------------------------------------------------
    device: str = _f("cpu", "Device kind for the workers.", choices=["cpu", "cuda"])
    tp_size: int = _f(1, "Tensor-parallel degree of each instance.")
    dp_size: int = _f(1, "Number of data-parallel instances; tp_size * dp_size devices are used.")
    base_gpu_id: int = _f(0, "First CUDA device id to use.")
    device_memory: Optional[str] = _f(None, "Per-device memory budget on CPU (e.g. 512MiB): weights + KV pool "
                                      "must fit in it, as on a GPU. Default: 1GiB per CPU device.")
    mem_fraction_static: float = _f(0.88, "Fraction of the device memory (budget on CPU, free memory on "
                                    "CUDA) for weights + KV pool; every device of the host takes the "
                                    "smallest such budget, so all size the same arena.")
    max_total_tokens: Optional[int] = _f(None, "Cap on KV pool tokens per instance (for testing retraction).")
    cpu_threads_per_worker: Optional[int] = _f(None, "Torch threads per CPU worker; default: the host's "
                                               "cores divided among the workers (at least 1).")
    dist_init_port: Optional[int] = _f(None, "TCP port for torch.distributed rendezvous; default: a free port.")

    # ---- TP collectives (sgl-kernel) -----------------------------------------------------------------
    tp_collective: str = _f("auto", "How CPU workers all-reduce / all-gather activations within a TP group: "
                            "'shm' over a shared-memory segment per aligned group (all ranks on this host; "
                            "sgl_kernel's C++ extension, built at first use), 'gloo' over torch.distributed, "
                            "'auto' = shm on CPU when the extension builds, else gloo. CUDA always uses "
                            "NCCL.", choices=["auto", "shm", "gloo"])

    # ---- memory and caching --------------------------------------------------------------------------
    page_size: int = _f(16, "Tokens per KV page.")
    disable_radix_cache: bool = _f(False, "Turn prefix caching off.")
    session_kv_budget: float = _f(0.5, "Share of each instance's KV pool that open sessions (/open_session) may "
                                  "keep pinned between turns; past it the least recently used session is "
                                  "unpinned (ordinary cache, recomputed if evicted). Running requests always "
                                  "come first: they unpin sessions, least recently used first, when no other "
                                  "cache is left to evict.")
    session_idle_timeout: float = _f(600.0, "Seconds a session may go without a turn before it is closed and its "
                                     "KV released (0: sessions stay open until /close_session).")
    session_auto_move: bool = _f(False, "The controller moves idle sessions' pinned KV between instances of the "
                                 "same TP degree by itself, between iterations: a session whose hinted next turn "
                                 "(session_params.next_turn_in_s) is due soon leaves a loaded instance for a "
                                 "clearly less loaded one when the queueing it saves costs more than the copy "
                                 "(the placement's cost model); a hot instance sheds idle sessions without a "
                                 "hint to a cold one (gyges/policies/session_moves.py).")
    enable_hierarchical_cache: bool = _f(False, "Host-memory KV tier (SGLang's HiCache): KV the radix cache evicts "
                                         "is copied to host memory first and a later prefix hit reloads it; "
                                         "turns with a hint (session_params.next_turn_in_s, X-Next-Turn-In) get "
                                         "their KV offloaded early and reloaded before they arrive.")
    hicache_size: Optional[str] = _f(None, "Host KV tier size per device with --enable-hierarchical-cache: a size "
                                     "(64MiB, 2GiB) or a plain number of GB (SGLang's meaning); overrides "
                                     "--hicache-ratio.")
    hicache_ratio: float = _f(2.0, "Host KV tier size as a multiple of the device KV pool, when --hicache-size "
                              "is not given (SGLang's flag).")

    # ---- scheduling ----------------------------------------------------------------------------------
    max_running_requests: Optional[int] = _f(None, "Most requests decoding at once per instance "
                                             "(default: no limit beyond memory).")
    max_prefill_tokens: int = _f(16384, "Most prompt tokens prefilled in one iteration.")
    chunked_prefill_size: int = _f(512, "Longest prefill chunk of one request per iteration; -1 disables "
                                   "chunking.")
    schedule_policy: str = _f("fcfs", "Order of the waiting queue: first come first served, or longest "
                              "cached prefix first.", choices=["fcfs", "lpm"])
    schedule_conservativeness: float = _f(1.0, "Scales the decode tokens reserved when admitting requests; "
                                          "lower admits more and retracts more.")
    attention_backend: Optional[str] = _f(None, "Attention implementation: 'torch_native' (torch ops: gather + SDPA, "
                                          "any device; the reference), 'cpu' (sgl_kernel's C++/OpenMP paged "
                                          "attention over the KV pages in place; CPU, float32 / bfloat16), "
                                          "'triton' (sgl_kernel's Triton paged attention over the KV pages in "
                                          "place, decode and prefill kernels apart; CUDA, float32 / bfloat16 / "
                                          "float16; on CPU only with TRITON_INTERPRET=1, for tests). Default: cpu "
                                          "on CPU when the extension builds, triton on CUDA when triton is "
                                          "installed, else torch_native.",
                                          choices=["torch_native", "cpu", "triton"])
    stream_interval: int = _f(1, "Send streamed output every this many tokens.")
    load_report_interval: float = _f(0.05, "Seconds between two load reports of an instance leader to the "
                                     "controller while only its load changes (an instance going idle or busy, "
                                     "its sessions changing and its first report go at once; 0: every change).")
    watchdog_timeout: float = _f(300.0, "Seconds an instance that has work may go without finishing a forward "
                                 "pass: past it the controller fails the instance (its requests get a 503 "
                                 "with the reason, its workers are killed, /health says so).")
    grammar_compile_timeout: float = _f(30.0, "Seconds a regex / json_schema / ebnf constraint may take to "
                                        "compile (off the scheduler loop); past it the request gets a 400.")

    # ---- constrained decoding ------------------------------------------------------------------------
    grammar_backend: str = _f("xgrammar", "Backend for regex / json_schema / ebnf.", choices=["xgrammar"])

    # ---- request limits ------------------------------------------------------------------------------
    # Beyond each limit a request gets a 400 (413 for the body size) saying which limit, before any
    # tokenization or scheduling work is done for it.
    max_request_body_size: str = _f("32MiB", "Largest HTTP request body (e.g. 32MiB); larger bodies get a 413 "
                                    "before they are read or parsed.")
    max_prompt_chars: Optional[int] = _f(None, "Most characters in one text prompt, checked before tokenizing "
                                         "(default: 16 per token of the longest servable prompt).")
    max_batch_prompts: int = _f(1024, "Most prompts in one request (a batch); prompts x n must not exceed it "
                                "either.")
    max_parallel_samples: int = _f(64, "Largest n (parallel samples per prompt).")
    max_top_logprobs_num: int = _f(20, "Largest top_logprobs_num (alternatives per logprob position; never more "
                                   "than the vocabulary).")
    max_stop_strings: int = _f(64, "Most stop strings (stop + stop_regex) and most stop_token_ids of one "
                               "request.")
    max_stop_str_len: int = _f(512, "Longest stop string or stop regex, in characters.")
    timeout_keep_alive: int = _f(5, "Seconds an idle keep-alive HTTP connection is held open.")
    timeout_request_read: float = _f(30.0, "Seconds a client has to send a request's headers, and again to send "
                                     "its body; slower clients are disconnected (body: 408).")
    limit_concurrency: Optional[int] = _f(2048, "Most HTTP connections and in-flight requests at once; beyond it "
                                          "new connections get a 503 from uvicorn.")

    # ---- Gyges ---------------------------------------------------------------------------------------
    enable_gyges: bool = _f(False, "Let the controller merge and split aligned instances at run time.")
    gyges_max_tp: Optional[int] = _f(None, "Largest TP degree Gyges may form (default: all devices). Weights "
                                     "are stored padded for every degree up to this one.")
    gyges_policy: str = _f("manual", "Who places requests and decides transformations: 'manual' (least-loaded "
                           "routing, transformations only through POST /gyges/transform), 'auto' (the Gyges "
                           "policy), or a baseline with the same interface: static-dp-rr, static-dp-ll, "
                           "static-tp, static-hybrid, and gyges-rr / gyges-ll (Gyges' merges and splits with "
                           "round-robin / least-loaded placement).",
                           choices=["manual", "auto", "gyges", "gyges-rr", "gyges-ll", "static-dp-rr",
                                    "static-dp-ll", "static-tp", "static-hybrid"])
    gyges_split_delay: float = _f(1.0, "Seconds a merged instance's requests must fit the smaller instances "
                                  "before the auto policy splits it (hysteresis against flapping).")
    gyges_ttft_target: Optional[float] = _f(None, "Prefill-time target in seconds: a request whose predicted "
                                            "prefill (step-time model of --gyges-cost-model) misses it at the "
                                            "smallest TP that holds it is served merged, at the smallest TP that "
                                            "meets it, when that is at least 1.5x faster. Unset: merges only for "
                                            "memory.")
    gyges_transform_timeout: float = _f(120.0, "Seconds a merge or split may take; past it the controller "
                                        "fails the transformation's instances (their requests get a 503, their "
                                        "workers are killed) and keeps serving on the others. The collectives "
                                        "of a transformation time out after the same limit.")
    gyges_precopy_chunk_bytes: int = _f(0, "KV pre-copy for merges of TP1 instances and for splits: while the "
                                        "instances keep serving, the KV pages that no longer change (cached "
                                        "prefixes, full pages of running requests) are copied into free pages "
                                        "where the new layout wants them, this many bytes per device between two "
                                        "iterations; the pause then moves only the pages written since. 0: no "
                                        "pre-copy (stop, move everything, resume).")
    gyges_prefetch_chunk_bytes: int = _f(0, "Weight prefetch for splits: while the merged instance keeps serving, "
                                         "every device fetches the weight rows it will lack after the split into "
                                         "the top pages of its KV pool (reserved for it), this many bytes per "
                                         "device between two iterations; the pause copies them into place instead "
                                         "of receiving them. 0: the rows are received in the pause.")
    gyges_host_carry_bytes: int = _f(64 << 20, "Host KV tier across merges and splits (--enable-hierarchical-"
                                     "cache): at most this many bytes of each device's host store, most recently "
                                     "used pages first, are re-laid for the new TP degree (on a thread after the "
                                     "pause, while the new instance serves); the rest is dropped and recomputed "
                                     "when needed. 0: the new instance starts with an empty host tier.")
    gyges_cost_model: Optional[str] = _f(None, "JSON file of the step-time and transformation cost models "
                                         "measured on this machine (written by benchmark/measure_costs.py); "
                                         "default: built-in constants, and no merges for speed.")

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.model_path.endswith(".gguf") and os.path.isfile(self.model_path):
            # Served from a side directory (config + tokenizer from the file; model_loader dequantizes its weights).
            from sglang.srt.model_executor.gguf_loader import gguf_model_dir

            if self.served_model_name is None:
                self.served_model_name = self.model_path
            self.model_path = gguf_model_dir(self.model_path)
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path

    @property
    def num_devices(self) -> int:
        return self.tp_size * self.dp_size

    @property
    def weight_shard_granularity(self) -> int:
        """Finest TP degree the weight layout is padded for (DESIGN §5)."""
        if self.enable_gyges:
            return self.gyges_max_tp or self.num_devices
        return self.tp_size

    def device_memory_bytes(self) -> int:
        return parse_size(self.device_memory) if self.device_memory else 2**30

    def hicache_bytes(self, device_pool_bytes: int) -> int:
        """Bytes of the host KV tier per device (0: no tier)."""
        size = None
        if self.hicache_size is not None:  # parsed even when the tier is off: check() reports a bad size
            text = str(self.hicache_size).strip()
            size = int(float(text) * 2**30) if re.fullmatch(r"[0-9]*\.?[0-9]+", text) else parse_size(text)
        if not self.enable_hierarchical_cache:
            return 0
        return size if size is not None else int(self.hicache_ratio * device_pool_bytes)

    def check(self) -> None:
        """Raise ValueError naming the bad flag and what is allowed."""
        if not self.model_path:
            raise ValueError("--model-path is required (a local HF checkpoint directory)")
        if not os.path.isdir(self.model_path):
            raise ValueError(f"--model-path {self.model_path!r} is not a directory (nor a .gguf file)")
        for name in ("tp_size", "dp_size", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("tp_size", "page_size"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a power of two, got {v}")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError(f"--mem-fraction-static must be in (0, 1], got {self.mem_fraction_static}")
        if self.device_memory is not None:
            parse_size(self.device_memory)
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError("--chunked-prefill-size must be positive or -1 (no chunking)")
        for name in ("watchdog_timeout", "grammar_compile_timeout", "gyges_transform_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("gyges_precopy_chunk_bytes", "gyges_prefetch_chunk_bytes", "gyges_host_carry_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.hicache_size is not None:
            self.hicache_bytes(0)  # raises on a bad size
        if self.hicache_ratio < 0:
            raise ValueError(f"--hicache-ratio must be >= 0, got {self.hicache_ratio}")
        if not 0.0 <= self.session_kv_budget <= 1.0:
            raise ValueError(f"--session-kv-budget must be in [0, 1], got {self.session_kv_budget}")
        if self.session_idle_timeout < 0:
            raise ValueError(f"--session-idle-timeout must be >= 0 seconds, got {self.session_idle_timeout}")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be >= 1")
        if self.gyges_ttft_target is not None and (self.gyges_ttft_target <= 0 or not self.gyges_cost_model):
            raise ValueError("--gyges-ttft-target needs a positive value and --gyges-cost-model (the step-time "
                             "model that predicts prefill times)")
        if self.gyges_policy != "manual" and not self.enable_gyges:
            raise ValueError(f"--gyges-policy {self.gyges_policy} needs --enable-gyges")
        g = self.weight_shard_granularity
        if g & (g - 1) or g < self.tp_size:
            raise ValueError(f"--gyges-max-tp must be a power of two >= --tp-size, got {g}")
        if self.device == "cuda":
            import torch

            have = torch.cuda.device_count()
            if self.base_gpu_id + self.num_devices > have:
                raise ValueError(f"tp_size * dp_size = {self.num_devices} devices requested from GPU "
                                 f"{self.base_gpu_id}, but only {have} CUDA devices are visible")

    # ---- CLI -----------------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.type in ("bool", bool):
                # Flags that default to on get a --no-... form to turn them off.
                action = argparse.BooleanOptionalAction if default else "store_true"
                parser.add_argument(flag, action=action, default=default, help=help_text)
                continue
            typ = {"int": int, "float": float, "str": str}.get(
                str(f.type).replace("Optional[", "").rstrip("]"), str)
            parser.add_argument(flag, type=typ, default=default, choices=f.metadata.get("choices"),
                                help=f"{help_text} (default: {default})", required=f.name == "model_path")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def server_args_from_kwargs(**kwargs) -> ServerArgs:
    """Engine(**kwargs): reject unknown names with the list of allowed ones."""
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown Engine argument(s) {unknown}; allowed: {sorted(names)}")
    return ServerArgs(**kwargs)


def prepare_server_args(argv: Optional[List[str]] = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m sglang.launch_server",
                                     description="SGLang-compatible server with Gyges.")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))
