"""Typed messages between the runtime's processes (DESIGN §3). One dataclass per kind of message.

    HTTP / Engine --GenerateReqInput--> TokenizerManager
    TokenizerManager --TokenizedGenerateReqInput / AbortReq / FlushCacheReq / GetInternalStateReq--> Controller
    Controller --same messages--> instance leaders (Scheduler)
    Scheduler --BatchTokenIDOut--> Detokenizer --BatchStrOut--> TokenizerManager
    Scheduler --InstanceReport / FlushCacheReqOutput / GetInternalStateReqOutput--> Controller --> TokenizerManager

All messages are pickled over ZMQ (ipc://). Tensors never travel in these messages; token ids are lists.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union


def new_rid() -> str:
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------------------------
# Requests as users send them (SGLang's /generate body and Engine.generate arguments)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GenerateReqInput:
    # The prompt(s): one string, or a list for a batch. Exactly one of text / input_ids is given.
    text: Optional[Union[str, List[str]]] = None
    # Token ids of the prompt(s): a list of ints, or a list of lists for a batch.
    input_ids: Optional[Union[List[int], List[List[int]]]] = None
    # SGLang sampling parameters (dict), or one dict per prompt of a batch.
    sampling_params: Optional[Union[Dict[str, Any], List[Dict[str, Any]]]] = None
    # Request id(s); generated when missing.
    rid: Optional[Union[str, List[str]]] = None
    # Return logprobs of prompt tokens (from logprob_start_len) and of output tokens.
    return_logprob: Optional[Union[bool, List[bool]]] = None
    # First prompt position whose logprob is returned; -1 / None = only output logprobs.
    logprob_start_len: Optional[Union[int, List[int]]] = None
    # Number of top alternatives returned for each logprob position.
    top_logprobs_num: Optional[Union[int, List[int]]] = None
    # Add the decoded text of each token to the logprob tuples.
    return_text_in_logprobs: bool = False
    # Stream partial results (SSE on HTTP, a generator on Engine).
    stream: bool = False
    # SGLang's session API: {"id", "rid", "offset", "replace", "drop_previous_output"} (SessionParams), or one
    # per prompt of a batch; the turn is appended to the session's earlier request (session_controller.py).
    session_params: Optional[Union[Dict[str, Any], List[Dict[str, Any]]]] = None
    # Accepted for SGLang compatibility; no effect here.
    log_metrics: bool = True
    # SGLang features this server does not have: None / False / "text" only (normalize() rejects any other
    # value with a ValueError naming the field, instead of silently ignoring it).
    modalities: Optional[List[str]] = None
    lora_path: Optional[Any] = None
    image_data: Optional[Any] = None
    audio_data: Optional[Any] = None
    video_data: Optional[Any] = None
    custom_logit_processor: Optional[Any] = None
    return_hidden_states: bool = False

    # --- filled by normalize() -----------------------------------------------------------------------
    is_single: bool = True  # the caller passed one prompt (response is a dict, not a list)
    batch_size: int = 1  # number of prompts
    parallel_sample_num: int = 1  # sampling_params["n"]

    def normalize(self) -> None:
        """Validate the shape of the input and broadcast per-prompt fields. Raises ValueError."""
        self._reject_unsupported()
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of 'text' or 'input_ids' must be given")
        if self.text is not None:
            if isinstance(self.text, str):
                self.is_single, self.batch_size = True, 1
            elif isinstance(self.text, list) and all(isinstance(t, str) for t in self.text):
                self.is_single, self.batch_size = False, len(self.text)
            else:
                raise ValueError("'text' must be a string or a list of strings")
        else:
            ids = self.input_ids
            if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                self.is_single, self.batch_size = True, 1
            elif isinstance(ids, list) and all(
                isinstance(s, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in ids
            ):
                self.is_single, self.batch_size = False, len(ids)
            else:
                raise ValueError("'input_ids' must be a list of ints or a list of lists of ints")
        if not self.is_single and self.batch_size == 0:
            raise ValueError("a batch must hold at least one prompt")

        sp = self.sampling_params
        if sp is None:
            sp = {}
        if isinstance(sp, dict):
            sp = [sp] * self.batch_size
        elif not (isinstance(sp, list) and len(sp) == self.batch_size and all(isinstance(s, dict) for s in sp)):
            raise ValueError("'sampling_params' must be an object or a list with one object per prompt")
        self.sampling_params = [dict(s) for s in sp]
        n = self.sampling_params[0].get("n", 1) if self.sampling_params else 1
        for s in self.sampling_params:
            v = s.get("n", 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"'n' must be a positive integer, got {v!r}")
            if v != n:
                raise ValueError("'n' must be the same for every prompt of a batch")
        self.parallel_sample_num = n

        def per_prompt(value, default, name):
            if value is None:
                return [default] * self.batch_size
            if isinstance(value, list):
                if len(value) != self.batch_size:
                    raise ValueError(f"'{name}' list must have one entry per prompt")
                return value
            return [value] * self.batch_size

        self.return_logprob = [bool(v) for v in per_prompt(self.return_logprob, False, "return_logprob")]
        self.logprob_start_len = per_prompt(self.logprob_start_len, -1, "logprob_start_len")
        self.top_logprobs_num = per_prompt(self.top_logprobs_num, 0, "top_logprobs_num")
        for v in self.logprob_start_len:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"'logprob_start_len' must be an integer, got {v!r}")
        for v in self.top_logprobs_num:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"'top_logprobs_num' must be a non-negative integer, got {v!r}")
        total = self.batch_size * n
        if self.rid is None:
            self.rid = [new_rid() for _ in range(total)]
            return
        if isinstance(self.rid, str):
            if not self.rid:
                raise ValueError("'rid' must be a non-empty string")
            self.rid = [self.rid] if total == 1 else [f"{self.rid}-{i}" for i in range(total)]
            return
        if not (isinstance(self.rid, list) and len(self.rid) in (self.batch_size, total)):
            raise ValueError(f"'rid' must be a string or a list with one id per prompt ({self.batch_size}) "
                             f"or per sample ({total})")
        if not all(isinstance(r, str) and r for r in self.rid):
            raise ValueError("every entry of 'rid' must be a non-empty string")
        if len(set(self.rid)) != len(self.rid):
            raise ValueError("the ids in 'rid' must be unique")
        if len(self.rid) != total:
            self.rid = [f"{r}-{j}" for r in self.rid for j in range(n)]

    def _reject_unsupported(self) -> None:
        for name in ("lora_path", "image_data", "audio_data", "video_data", "custom_logit_processor"):
            if getattr(self, name) is not None:
                raise ValueError(f"'{name}' is not supported by this server (text-only models, no LoRA, no "
                                 f"custom logit processors); leave it out or null")
        if self.return_hidden_states not in (False, None):
            raise ValueError("'return_hidden_states' is not supported by this server; leave it out or false")
        m = self.modalities
        if m is not None:
            if not isinstance(m, list) or not all(isinstance(x, str) for x in m):
                raise ValueError("'modalities' must be a list of strings")
            other = sorted({x for x in m if x != "text"})
            if other:
                raise ValueError(f"'modalities' {other} are not supported by this server (text only)")

    def prompt(self, i: int) -> Union[str, List[int]]:
        """Prompt i of the normalized request (text or token ids)."""
        if self.text is not None:
            return self.text if self.is_single else self.text[i]
        return self.input_ids if self.is_single else self.input_ids[i]


@dataclass
class EmbeddingReqInput(GenerateReqInput):
    """SGLang's /encode body (/v1/embeddings is mapped onto it): one prompt or a batch, as text or input_ids.
    Each prompt is prefilled with max_new_tokens 0 and answered with the final hidden state (after the last
    norm) of its last token, L2-normalized: SGLang's last-token pooling for generation models."""

    def normalize(self) -> None:
        self.sampling_params, self.stream, self.return_logprob = {"max_new_tokens": 0}, False, None
        super().normalize()


# ----------------------------------------------------------------------------------------------------------
# TokenizerManager -> Controller -> Scheduler
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TokenizedGenerateReqInput:
    # Request id, unique in the server.
    rid: str
    # The prompt text ("" when the caller gave input_ids).
    input_text: str
    # The prompt's token ids.
    input_ids: List[int]
    # Validated sampling parameters (sglang.srt.sampling.sampling_params.SamplingParams).
    sampling_params: Any
    # Whether to compute logprobs.
    return_logprob: bool
    # First prompt position whose logprob is returned (-1: none).
    logprob_start_len: int
    # Number of top alternatives per logprob position.
    top_logprobs_num: int
    # Whether the client streams (the scheduler sends output every stream_interval tokens).
    stream: bool
    # time.time() when the TokenizerManager received the request.
    arrival_time: float = 0.0
    # An embedding request (EmbeddingReqInput): the scheduler returns the last prompt token's pooled hidden state.
    return_embedding: bool = False
    # Open session this turn belongs to (input_ids is then the whole conversation so far plus the new input).
    session_id: Optional[str] = None
    # Leading tokens of input_ids that the session's earlier turn computed (its KV is pinned where it ran).
    session_prefix_tokens: int = 0
    # Client's hint: the conversation's next turn is expected this many seconds after this request ends
    # (session_params.next_turn_in_s, or the X-Next-Turn-In header); its KV is kept ready (managers/req_kv.py).
    next_turn_in_s: Optional[float] = None


@dataclass
class SessionParams:
    """SGLang's session_params of a /generate turn."""

    # The session (from POST /open_session).
    id: str
    # The earlier request of the session to append to (None: start a new branch of the session).
    rid: Optional[str] = None
    # Keep only the first `offset` tokens of that request's prompt + output (negative: count from the end;
    # None / 0: all of them) before appending the new input.
    offset: Optional[int] = None
    # Replace that request's later turns (branches); with rid None: clear the whole session first.
    replace: Optional[bool] = None
    # Append to that request's prompt only, without its output.
    drop_previous_output: Optional[bool] = None
    # Hint (SYMPHONY): the next turn is expected this many seconds after this one ends (None: no hint).
    next_turn_in_s: Optional[float] = None


@dataclass
class OpenSessionReqInput:
    # Kept for SGLang compatibility (upstream's nominal session size in characters); not a limit here.
    capacity_of_str_len: int
    # The id to give the session (a 400 when a session with this id is open); generated when missing.
    session_id: Optional[str] = None


@dataclass
class MoveSessionReq:
    """Admin (POST /sessions/move, Engine.move_session): move a session's pinned KV to another instance.
    TokenizerManager -> Controller -> SessionKVTransfer to the session's instance."""

    req_id: str
    session_id: str
    # Leader device id of the instance to move it to.
    dst_instance: int


@dataclass
class SessionKVTransfer:
    """Controller -> source leader (kv None: export the session); source leader -> Controller -> destination
    leader (kv set: import it). Page bytes travel by value (pickled through the controller), so both instances
    keep serving; the bytes hold every KV head (host_tier.read_pages_all_heads), so the TP degrees may differ
    (the model and page size must not)."""

    req_id: str
    session_id: str
    dst_instance: int
    # The session's pinned path (page-aligned token ids), filled by the source.
    tokens: Optional[List[int]] = None
    # uint8 [len(tokens) // page_size, bytes of every KV head per page]: the path's pages, head blocks in head
    # order (host_tier.read_pages_all_heads; a TP1 pool's page as is).
    kv: Optional[Any] = None
    # Refusal by the source (unknown session, nothing pinned): answered to the client as a 400.
    error: Optional[str] = None


@dataclass
class MoveSessionReqOutput:
    req_id: str
    success: bool
    message: str = ""
    # Tokens whose KV the destination adopted (copied or already cached there) and the bytes copied.
    tokens: int = 0
    bytes: int = 0


@dataclass
class CloseSessionReqInput:
    # The session to close; its turns' history is forgotten and its pinned KV released on every instance
    # (also sent TokenizerManager -> Controller -> leaders).
    session_id: str


@dataclass
class AbortReq:
    # Request id to abort (a client's rid, never empty; ignored when abort_all is set).
    rid: str
    # Abort every request of every instance (an operator's action, never a client's).
    abort_all: bool = False
    # time.time() when the abort was issued: only requests that arrived at or before it are aborted, so a
    # late abort never hits a newer request that reuses the rid.
    issued_at: float = field(default_factory=time.time)


@dataclass
class FlushCacheReq:
    # Id the reply carries back.
    req_id: str


@dataclass
class FlushCacheReqOutput:
    # Id of the FlushCacheReq this answers.
    req_id: str
    # False when requests were running (the cache is only flushed when idle).
    success: bool
    # Instance that answered.
    instance_id: int = 0


@dataclass
class GetInternalStateReq:
    # Id the reply carries back.
    req_id: str


@dataclass
class GetInternalStateReqOutput:
    # Id of the GetInternalStateReq this answers.
    req_id: str
    # Instance that answered.
    instance_id: int
    # Scheduler state: running/waiting counts, KV usage, capacity, page size, tp, devices...
    state: Dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Scheduler -> Detokenizer -> TokenizerManager
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ReqOutputDelta:
    # Request id.
    rid: str
    # Output token ids produced since the previous delta of this request.
    new_output_ids: List[int]
    # None while running; when finished a dict like {"type": "stop", "matched": 2} or
    # {"type": "length", "length": 16} or {"type": "abort", "message": "..."} (SGLang's finish_reason).
    finish_reason: Optional[Dict[str, Any]]
    # Prompt tokens (after tokenization).
    prompt_tokens: int
    # Output tokens so far.
    completion_tokens: int
    # Prompt tokens served from the prefix cache.
    cached_tokens: int
    # New input-token logprobs: (logprob or None, token id) per prompt position from logprob_start_len
    # (sent once, with the first delta).
    input_token_logprobs: Optional[List[Any]] = None
    # Top alternatives for each of those positions: list of [(logprob, token id), ...] or None.
    input_top_logprobs: Optional[List[Any]] = None
    # (logprob, token id) of each new output token.
    output_token_logprobs: Optional[List[Any]] = None
    # Top alternatives for each new output token.
    output_top_logprobs: Optional[List[Any]] = None
    # The matched stop string to cut from the decoded text (with everything after it), if any.
    trim_stop_str: Optional[str] = None
    # Decoding options of the request (SamplingParams.skip_special_tokens / spaces_between_special_tokens).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Embedding requests, with the final delta: the last prompt token's final hidden state, L2-normalized
    # (float32 values, hidden_size of them).
    embedding: Optional[List[float]] = None


@dataclass
class BatchTokenIDOut:
    # One delta per request that produced output this iteration.
    outputs: List[ReqOutputDelta]


@dataclass
class ReqStrOut:
    # Request id.
    rid: str
    # Output text new since this request's previous ReqStrOut; it replaces the cumulative text from
    # text_offset on (the TokenizerManager reassembles it: apply_text_delta), so a stream costs linear bytes.
    text_delta: str
    # Output token ids new since this request's previous ReqStrOut (the TokenizerManager accumulates them,
    # so a long stream costs linear, not quadratic, bytes).
    output_ids: List[int]
    # The delta this text was made from (token ids, logprobs, finish reason, counts).
    delta: ReqOutputDelta
    # The detokenizer failed this request (delta.finish_reason says why) while its scheduler may still be
    # running it: the TokenizerManager answers the client and aborts it there.
    failed_in_detokenizer: bool = False
    # Where text_delta starts in the cumulative text: -1 = at its end (the usual case); smaller than the text
    # sent so far when the final text cuts what was streamed (a matched stop string, no_stop_trim false).
    text_offset: int = -1


def apply_text_delta(text: str, out: ReqStrOut) -> str:
    """The cumulative text after `out`, given the cumulative text before it."""
    if 0 <= out.text_offset < len(text):
        return text[:out.text_offset] + out.text_delta
    return text + out.text_delta


@dataclass
class BatchStrOut:
    # One entry per request that produced output.
    outputs: List[ReqStrOut]


# ----------------------------------------------------------------------------------------------------------
# Scheduler -> Controller, worker -> launcher
# ----------------------------------------------------------------------------------------------------------
@dataclass
class InstanceReport:
    # Instance id (= rank of its leader device).
    instance_id: int
    # Requests decoding or prefilling.
    running: int
    # Requests queued.
    waiting: int
    # KV tokens held by requests and cache.
    kv_used_tokens: int
    # KV pool capacity in tokens.
    kv_capacity_tokens: int
    # Tokens the admitted requests may still need (prompt not yet computed + max_new_tokens not yet generated).
    tokens_in_flight: int
    # KV tokens held only by the prefix cache (evictable).
    kv_evictable_tokens: int = 0
    # {tp: KV tokens of an instance of that TP formed from devices like these} (Gyges; sent once).
    capacity_by_tp: Optional[Dict[int, int]] = None
    # Requests that finished (or were aborted) since the previous report.
    finished_rids: List[str] = field(default_factory=list)
    # Forward passes run so far: the controller's watchdog fails an instance with work whose count stops.
    forward_ct: int = 0
    # The most prompt tokens one request here has still to prefill (the Gyges policy keeps an instance
    # merged while a prefill needs its speed).
    prefill_tokens_left: int = 0
    # Prompt tokens the requests here have still to prefill, in all (the affinity placement's queue term).
    prefill_tokens_queued: int = 0
    # KV tokens held only by open sessions' pins (included in kv_evictable_tokens: reclaimable on demand).
    kv_pinned_tokens: int = 0
    # Ids of the sessions whose KV is pinned here, when the set changed since the previous report (None: same).
    sessions: Optional[List[str]] = None
    # First report after a merge / split: the chained block hashes (gyges.policies.affinity.PrefixIndex, block =
    # page_size) of every prefix this instance's radix cache holds, for the controller's prefix index.
    cached_prefix_hashes: Optional[List[int]] = None


@dataclass
class WorkerReady:
    # Global rank of the worker (= device index).
    rank: int
    # KV capacity in tokens of the instance this worker belongs to.
    max_total_num_tokens: int
    # Longest context a request may have on this instance.
    max_req_len: int
    # Bytes of weights held by this worker.
    weight_bytes: int
    # Bytes of KV pool held by this worker.
    kv_pool_bytes: int
    # Tokens per page.
    page_size: int
    # KV tokens of the largest instance Gyges can form (= max_total_num_tokens without Gyges).
    max_formable_tokens: int = 0


@dataclass
class WorkerFailed:
    # Global rank of the worker.
    rank: int
    # What went wrong (exception text).
    error: str


# ----------------------------------------------------------------------------------------------------------
# Gyges: transformations (TokenizerManager -> Controller -> instance leaders -> their followers)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GygesTransformReq:
    # Id the reply carries back.
    req_id: str
    # Devices of the instance to form (merge) or to split.
    devices: List[int]
    # TP degree of the resulting instance(s): len(devices) merges them; smaller splits them.
    tp: int


@dataclass
class GygesTransformReqOutput:
    # Id of the GygesTransformReq this answers.
    req_id: str
    # True when the transformation happened.
    success: bool
    # Why it was refused or failed ("" on success).
    message: str
    # Breakdown: kind, devices, tp, running_requests, kv_bytes, kv_ms, weight_bytes, weight_ms, pause_ms,
    # peak_extra_bytes, total_ms, planning_ms, ...
    breakdown: Dict[str, Any] = field(default_factory=dict)
    # HTTP status of a failure: 400 when refused (bad devices/tp, another transformation running), 503 when
    # it failed on the server side (a worker died, the deadline passed).
    status_code: int = 400


@dataclass
class GygesTopologyReq:
    # Id the reply carries back.
    req_id: str


@dataclass
class GygesTopologyReqOutput:
    # Id of the GygesTopologyReq this answers.
    req_id: str
    # One dict per instance: id, devices, tp, state, running, waiting, kv_capacity_tokens, kv_used_tokens.
    instances: List[Dict[str, Any]]
    # Past transformations, oldest first: kind, devices, tp, at, and the breakdown.
    history: List[Dict[str, Any]]


@dataclass
class TransformCmd:
    # Unique id of this transformation.
    transform_id: str
    # "merge" or "split".
    kind: str
    # Device lists of the instances that exist before (sorted by first device).
    src_instances: List[List[int]]
    # Device lists of the instances that exist after.
    dst_instances: List[List[int]]
    # time.time() when the controller issued it.
    issued_at: float

    @property
    def devices(self) -> List[int]:
        """Every device taking part (sources and destinations), ascending."""
        return sorted({d for inst in self.src_instances + self.dst_instances for d in inst})


@dataclass
class SessionPagesRead:
    # Leader -> its followers, exporting a session's KV for a move: the pool pages whose heads each rank sends
    # to the leader (host_tier.read_pages_all_heads).
    pages: List[int]


@dataclass
class SessionPagesWrite:
    # Leader -> its followers, adopting a moved session: the pool pages to write.
    pages: List[int]
    # uint8 [len(pages), bytes of every KV head] (read_pages_all_heads' layout); each rank writes its heads.
    kv: Any


@dataclass
class WeightPrefetchStart:
    # The split whose weight rows the instance's devices fetch while it keeps serving (weight_prefetch.py).
    cmd: TransformCmd
    # Byte offset in every device's arena where the staging region starts (the top pages of the merged pool).
    staging_start: int
    # Its bytes: the rows that fit are fetched while serving, the pause receives the others.
    staging_bytes: int
    # --gyges-prefetch-chunk-bytes: the most bytes a device receives per iteration.
    chunk_bytes: int


@dataclass
class WeightPrefetchStep:
    # Transform id of the split being prefetched.
    transform_id: str
    # Index of the chunk every device moves now (0, 1, ... in order).
    chunk: int


@dataclass
class SplitPrecopyStart:
    # The split whose KV the instance's devices copy ahead while it keeps serving (split_precopy.py).
    cmd: TransformCmd
    # Merged page -> (index of the part in the split's parts sorted by first device, page there): where each
    # page's KV is copied (pages the leader reserved; every device builds the same KV plan from this).
    page_map: Dict[int, Tuple[int, int]]
    # --gyges-precopy-chunk-bytes: the most bytes a device sends plus receives per iteration.
    chunk_bytes: int


@dataclass
class SplitPrecopyStep:
    # Transform id of the split being pre-copied.
    transform_id: str
    # Index of the chunk every device moves now (0, 1, ... in order).
    chunk: int


@dataclass
class TransformDone:
    # Id of the TransformCmd.
    transform_id: str
    # False when the transformation was refused by planning (nothing changed) or failed.
    success: bool
    # Reason when not successful.
    message: str
    # Measured breakdown (see GygesTransformReqOutput.breakdown).
    breakdown: Dict[str, Any] = field(default_factory=dict)
    # Where the requests went: first device of each resulting instance -> request ids.
    placements: Dict[int, List[str]] = field(default_factory=dict)


@dataclass
class WorkerDied:
    # Global rank (device) of the worker process that exited.
    rank: int
    # Its exit code.
    exitcode: Optional[int]


@dataclass
class ServingState:
    # Instances still serving (0: the server cannot serve).
    live_instances: int
    # Device lists of the instances that failed.
    failed_instances: List[List[int]]
    # Why each of failed_instances failed (same order): worker exit, watchdog, transformation timeout.
    reasons: List[str] = field(default_factory=list)
    # Worker ranks the TokenizerManager must kill (SIGKILL) to free their memory: hung workers that
    # cannot exit by themselves.
    kill_ranks: List[int] = field(default_factory=list)
