"""A request as the scheduler tracks it: tokens, KV pages, sampling state, and what was already reported.

Life of a Req on an instance leader:

    waiting --admit (prefix match, pages)--> running: extend fill_ids[kv_len:] in chunks
            --last prompt chunk--> first token sampled --> decode, one token per iteration
            --stop / length / abort--> finished: KV inserted into the radix cache, pages released
    running --retract (out of pages)--> waiting again, output kept; its KV goes to the radix cache so
            re-admission usually re-uses it.

Page ownership: page_table[:num_tree_pages] belong to the radix tree (pinned by `cache_node`'s lock);
page_table[num_tree_pages:] belong to this request until it is released.

The page table is a python list (the KV manager grows it, a transformation re-bases it); the scheduler's
ForwardBatch reads it as a tensor through `page_table_tensor()`, an int32 mirror that is appended to with
the pages added since the previous step (a page every page_size tokens), not rebuilt from the list every
step. The mirror follows one list object: a new list (release, admission, re-basing, a migrated copy) is
mirrored afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


def finish_stop_token(token_id: int) -> Dict[str, Any]:
    return {"type": "stop", "matched": token_id}


def finish_stop_str(stop: str) -> Dict[str, Any]:
    return {"type": "stop", "matched": stop}


def finish_length(length: int) -> Dict[str, Any]:
    return {"type": "length", "length": length}


def finish_abort(message: str, status_code: int = 500) -> Dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": status_code}


@dataclass
class Req:
    rid: str
    origin_input_ids: List[int]
    sampling_params: Any  # SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    arrival_time: float = field(default_factory=time.time)
    return_embedding: bool = False  # an embedding request: pool the last prompt token's hidden state
    session_id: Optional[str] = None  # open session this turn belongs to (its KV stays pinned after it)

    # ---- generation state -----------------------------------------------------------------------
    output_ids: List[int] = field(default_factory=list)
    sampling_state: Any = None  # sampler's per-request state (seed, penalties)
    grammar: Any = None  # constrained-decoding matcher, None when unconstrained
    finished_reason: Optional[Dict[str, Any]] = None
    # Max new tokens after clipping to the context length.
    max_new_tokens: int = 0

    # ---- KV state ------------------------------------------------------------------------------------
    page_table: List[int] = field(default_factory=list)  # page ids, token p lives in page_table[p // page_size]
    kv_len: int = 0  # tokens of fill_ids whose K/V are in the pool
    num_tree_pages: int = 0  # leading pages owned by the radix tree
    cache_node: Any = None  # radix node locked by this request
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    retractions: int = 0

    # ---- logprobs not yet reported --------------------------------------------------------------------
    input_logprobs_done: bool = False
    input_token_logprobs: List[Any] = field(default_factory=list)  # [(logprob | None, token id)]
    input_top_logprobs: List[Any] = field(default_factory=list)
    output_token_logprobs: List[Any] = field(default_factory=list)  # pending (logprob, token id)
    output_top_logprobs: List[Any] = field(default_factory=list)
    sent_output_len: int = 0
    trim_stop_str: Optional[str] = None
    embedding: Optional[List[float]] = None  # embedding requests: the pooled hidden state, sent when finished

    # ---- page_table_tensor()'s mirror (not part of the request's state: never moved) ------------------------
    _pt_list: Optional[List[int]] = field(default=None, repr=False, compare=False)  # the list mirrored
    _pt_buf: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)  # int32 [capacity]
    _pt_len: int = field(default=0, repr=False, compare=False)  # entries of _pt_list copied into _pt_buf

    def page_table_tensor(self) -> torch.Tensor:
        """int32 [len(page_table)]: the page table as a tensor, updated with the pages added since last call."""
        pt = self.page_table
        n = len(pt)
        if self._pt_list is not pt or n < self._pt_len:  # another list (or one cut short): mirror afresh
            self._pt_list, self._pt_len = pt, 0
            self._pt_buf = torch.empty(max(16, 2 * n), dtype=torch.int32)
        if n > self._pt_len:
            if n > self._pt_buf.shape[0]:
                grown = torch.empty(2 * n, dtype=torch.int32)
                grown[: self._pt_len] = self._pt_buf[: self._pt_len]
                self._pt_buf = grown
            self._pt_buf[self._pt_len:n] = torch.tensor(pt[self._pt_len:n], dtype=torch.int32)
            self._pt_len = n
        return self._pt_buf[:n]

    @property
    def fill_ids(self) -> List[int]:
        """Every token whose K/V the request needs: prompt + output so far."""
        return self.origin_input_ids + self.output_ids

    def fill_slice(self, start: int, end: int) -> List[int]:
        """fill_ids[start:end] without building the whole list (the decode hot path)."""
        p = len(self.origin_input_ids)
        if end <= p:
            return self.origin_input_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.origin_input_ids[start:] + self.output_ids[:end - p]

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def extend_remaining(self) -> int:
        """Tokens still to be fed through the model before the next token can be sampled."""
        return self.seq_len - self.kv_len

    @property
    def is_decoding(self) -> bool:
        return self.extend_remaining == 1 and len(self.output_ids) > 0

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.input_logprobs_done

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.output_ids))

    def reset_kv(self) -> None:
        self.page_table = []
        self.kv_len = 0
        self.num_tree_pages = 0
        self.cache_node = None


@dataclass
class InstanceState:
    """One instance's requests and prefix cache as plain data: what a Gyges transformation moves.

    Requests keep their page tables (page ids of the source instance until re-based), sampling state and
    grammar state (as a dict); radix locks are not part of it (the destination re-locks).
    """

    devices: List[int]
    running: List[Req]
    waiting: List[Req]
    tree_paths: List[Any]  # [(token ids, page ids)] root-to-leaf paths of the radix tree
    new_token_ratio: float = 0.5
    # Open sessions' pinned paths: (session id, token ids, page ids, last_used) (mem_cache/session_pins.py).
    session_pins: List[Any] = field(default_factory=list)
    # The host KV tier's index (mem_cache/host_carry.HostTierState; None: no tier): its pages stay in the
    # ranks' host stores, which the transformation re-lays (slots re-based like page ids).
    host: Any = None
    # Sessions kept on host (unpinned) -> their path's first page's token ids (req_kv.ReqKVManager).
    host_sessions: Dict[str, Any] = field(default_factory=dict)
    # Hinted finished turns: [(session id or "rid:" + rid, req_kv.HintedPath)], kept ready for their next turn.
    hinted: List[Any] = field(default_factory=list)
    # Sessions whose hinted turn was prefetched (re-pinned) and has not come yet -> when it is expected.
    prefetched_turns: Dict[str, float] = field(default_factory=dict)

    def used_pages(self) -> set:
        pages = set()
        for _, ps in self.tree_paths:
            pages.update(ps)
        for r in self.running:
            pages.update(r.page_table)
        return pages


def portable_req(req: Req) -> Req:
    """A copy of `req` that pickles: grammar as its state dict, no radix node."""
    import copy

    out = copy.copy(req)
    out.page_table = list(req.page_table)
    out.output_ids = list(req.output_ids)
    out.cache_node = None
    out._pt_list, out._pt_buf, out._pt_len = None, None, 0  # the destination mirrors its re-based table
    if req.grammar is not None:
        out.grammar = {"grammar_state": req.grammar.state_dict()}
    return out
