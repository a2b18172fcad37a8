"""Structured output (regex / json_schema / ebnf) through xgrammar.

Data flow on an instance leader:

    GrammarBackend(tokenizer, vocab_size, eos_token_ids)      once per scheduler
      .compile(kind, value) -> CompiledGrammar                LRU-cached; ValueError for a bad grammar
      .create(kind, value)  -> Grammar                        one per request (its own matcher state)
    every decode step:
      apply_masks(logits, grammars)                           -inf on tokens the grammar forbids
      (sampler picks token t)
      grammar.accept_token(t)                                 advance the matcher (the scheduler does it)
      grammar.is_terminated()                                 True after EOS was accepted -> finish

The mask allows EOS exactly when the text so far is a complete match of the grammar, so a request ends
by sampling EOS (the scheduler's usual EOS check) and the matcher is terminated afterwards. A request
that moves to another instance carries `grammar.state_dict()` (plain python data) and the destination
rebuilds it with `backend.restore(state)`, which re-compiles (cache hit usually) and replays the tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

import torch
import xgrammar as xgr

GRAMMAR_KINDS = ("regex", "json_schema", "ebnf")


class Grammar:
    """Matcher state of one request's constraint."""

    def __init__(self, kind: str, value: str, matcher: "xgr.GrammarMatcher", vocab_size: int,
                 accepted_tokens: Optional[List[int]] = None):
        self.kind = kind
        self.value = value
        self.vocab_size = vocab_size
        self._matcher = matcher
        self.accepted_tokens: List[int] = list(accepted_tokens or [])

    # ---- decoding
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar does not allow it."""
        ok = bool(self._matcher.accept_token(int(token_id)))
        if ok:
            self.accepted_tokens.append(int(token_id))
        return ok

    def is_terminated(self) -> bool:
        """True once the grammar has accepted a stop (EOS) token: the request is finished."""
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """True when the output so far is a complete match (EOS is allowed next)."""
        return bool(self._matcher.is_completed())

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write this grammar's allowed-token bitmask into row `index` of an xgrammar bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, index)

    def allowed_token_mask(self) -> torch.Tensor:
        """bool [vocab_size]: True for tokens allowed next (for tests and debugging)."""
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.fill_bitmask(bitmask, 0)
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[0].unsqueeze(1) >> bits) & 1).bool().flatten()
        return allowed[: self.vocab_size]

    def fill_mask(self, logits_row: torch.Tensor) -> torch.Tensor:
        """Set forbidden entries of one logits row ([vocab]) to -inf, in place; returns it."""
        apply_masks(logits_row.view(1, -1), [self])
        return logits_row

    # ---- moving / forking
    def copy(self) -> "Grammar":
        """An independent copy of the current state (e.g. for n > 1 parallel samples)."""
        return Grammar(self.kind, self.value, self._matcher.fork(), self.vocab_size, self.accepted_tokens)

    def state_dict(self) -> dict:
        """Plain-python state; GrammarBackend.restore() rebuilds the grammar from it anywhere."""
        return {"kind": self.kind, "value": self.value, "accepted_tokens": list(self.accepted_tokens)}

    def __getstate__(self):
        raise TypeError("Grammar holds a native matcher; send grammar.state_dict() and use "
                        "GrammarBackend.restore(state) on the other side")


class GrammarBackend:
    """Compiles constraints for one tokenizer / model vocabulary and creates per-request Grammars."""

    def __init__(self, tokenizer, vocab_size: Optional[int] = None,
                 eos_token_ids: Optional[Sequence[int]] = None, cache_size: int = 256,
                 max_threads: int = 2):
        if vocab_size is None:
            vocab_size = len(tokenizer)
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None
        )
        # xgrammar's own cache is off: ours is a bounded LRU keyed by (kind, value).
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: "OrderedDict[tuple, xgr.CompiledGrammar]" = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()  # the scheduler compiles on side threads
        self.cache_hits = 0
        self.cache_misses = 0

    def compile(self, kind: str, value: str) -> "xgr.CompiledGrammar":
        """CompiledGrammar for (kind, value); ValueError with xgrammar's message when invalid."""
        if kind not in GRAMMAR_KINDS:
            raise ValueError(f"Unknown grammar kind {kind!r}; allowed: {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(value, str):
            raise ValueError(f"{kind} must be a string, got {type(value).__name__}")
        key = (kind, value)
        with self._cache_lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return compiled
            self.cache_misses += 1
        try:
            if kind == "regex":
                compiled = self._compiler.compile_regex(value)
            elif kind == "json_schema":
                compiled = self._compiler.compile_json_schema(value)
            else:
                compiled = self._compiler.compile_grammar(value)
        except Exception as e:  # xgrammar raises RuntimeError / InvalidJSONError with a parser message
            raise ValueError(f"Invalid {kind}: {_clean_message(e)}") from None
        with self._cache_lock:
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def create(self, kind: str, value: str) -> Grammar:
        """A fresh per-request Grammar (compiles or hits the cache)."""
        compiled = self.compile(kind, value)
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self.eos_token_ids or None)
        return Grammar(kind, value, matcher, self.vocab_size)

    def create_for_params(self, params) -> Optional[Grammar]:
        """Grammar for SamplingParams' regex / json_schema / ebnf, or None when unconstrained."""
        key = params.grammar_key
        return None if key is None else self.create(*key)

    new_grammar = create_for_params  # alias

    def restore(self, state: dict) -> Grammar:
        """Rebuild a Grammar from Grammar.state_dict() (replays the accepted tokens)."""
        grammar = self.create(state["kind"], state["value"])
        for tok in state["accepted_tokens"]:
            if not grammar.accept_token(tok):
                raise ValueError(f"grammar state cannot be restored: token {tok} rejected on replay")
        return grammar


def apply_masks(logits: torch.Tensor, grammars: Sequence[Optional[Grammar]]) -> None:
    """In place: -inf on every token row i's grammar forbids. None (or terminated) entries are free.

    logits: float32 [batch, vocab] (CPU or CUDA); grammars: one entry per row.
    """
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.is_terminated()]
    if not rows:
        return
    vocab = max(g.vocab_size for g in (grammars[i] for i in rows))
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    for i in rows:
        grammars[i].fill_bitmask(bitmask, i)
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        tmp = logits.float().contiguous()
        xgr.apply_token_bitmask_inplace(tmp, bitmask, indices=rows)
        logits.copy_(tmp)
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    # Tokens beyond the grammar's vocabulary (padding) are never allowed for constrained rows.
    if logits.shape[1] > vocab:
        logits[rows, vocab:] = float("-inf")


def _clean_message(e: BaseException) -> str:
    msg = str(e).strip()
    # xgrammar prefixes "[hh:mm:ss] /project/cpp/file.cc:NN: "; keep the human part.
    if msg.startswith("[") and ": " in msg:
        parts = msg.split(": ", 1)
        if ".cc:" in parts[0] or ".h:" in parts[0]:
            msg = parts[1]
            if msg[:1].isdigit() and ": " in msg:  # remaining "NN: message"
                msg = msg.split(": ", 1)[1]
    return msg
