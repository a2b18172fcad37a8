"""Moving idle sessions between instances by the controller itself (issue 13: hints and rebalancing).

Pure logic (no torch, no sockets). The live controller (sglang managers/controller.py, --session-auto-move)
composes it and carries its decisions out with the same SessionKVTransfer as POST /sessions/move:

    controller                                   SessionMover
    a session's turn is sent to an instance  ->  turn_sent(session, rid, pinned after it, new tokens, hint)
    a load report lists the turn finished    ->  turn_finished(rid, now): next_turn_at = now + its hint
    every loop (no transformation, no move   ->  plan(now, homes, instances) -> [SessionMove]  (at most
      in flight)                                   max_moves; the controller starts them between iterations)
    the move ended (adopted / refused)       ->  move_done(session, ok, now): cooldown / retry time
    the session closed                       ->  closed(session)

The rule (decide_moves), for a session with no turn queued or running, out of its cooldown, pinned on a home
instance, towards another instance of the same TP degree with room for its KV:

    turn_cost(i, cached) = affinity.placement_cost(pinned + new, instance i, cached tokens)   (the cost model
                           of the placement: recomputing N tokens costs the prefill of N tokens)
    stay   = min(turn_cost(home, pinned), min over o != home of turn_cost(o, 0))   where the turn goes today
    moved  = turn_cost(dst, pinned) + copy_ratio * placement_cost(pinned tokens on an idle instance)
    move when stay - moved > 0 (the expected queueing at home costs more than the transfer) and dst is clearly
    less loaded: queue(dst) <= clearly_less * queue(home), queue(i) = placement_cost(1 token, i)

    (a) hint: the session's hinted next turn is due within lead_s (or is up to lead_s late): moved before it
        arrives, so the placement sends the turn to the destination and it finds its KV there;
    (b) rebalance: a session without a pending hint (none given, or its time long past) leaves a hot home when,
        moreover, the destination's pinned KV with it stays within the home's (pinned KV is the future work of
        an instance: shedding stops once they are even, so sessions do not herd).

Each planned move is counted into the destination (its room, the pinned tokens, the expected turn's prefill
queued there) before the next one is chosen. Sessions moved are left alone for cooldown_s; a refused move
(nothing pinned: on host, or no room) is retried after retry_s; the session stays where it is meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Set

from gyges.policies.affinity import AffinityCandidate, placement_cost


@dataclass(frozen=True)
class SessionState:
    """One open session as the rule sees it."""

    session_id: str
    home: int  # the instance its KV is pinned on
    pinned_tokens: int  # KV tokens pinned for it (the last turn's prompt + output, an upper bound)
    new_tokens: int = 1  # expected new input of its next turn (the last turn's)
    turn_running: bool = False  # a turn of it is queued or running: never moved then
    next_turn_at: Optional[float] = None  # when its next turn is expected (hint), None: unknown
    not_before: float = 0.0  # cooldown: not moved before this time


@dataclass(frozen=True)
class InstanceForMoves:
    """One instance: its load (cached_tokens ignored) and what a moved session may use there."""

    load: AffinityCandidate
    room_tokens: int  # KV tokens a moved session can take without evicting pins (free + evictable cache,
    #                   within the session budget)
    pinned_tokens: int = 0  # KV tokens pinned there by sessions


@dataclass(frozen=True)
class SessionMove:
    session_id: str
    src: int
    dst: int
    reason: str  # "hint" or "rebalance"
    gain: float  # stay - moved (seconds with a step model, token-equivalents without)


@dataclass(frozen=True)
class MoveRuleConfig:
    lead_s: float = 1.5  # a hinted session is considered this long before its turn (and as long after)
    copy_ratio: float = 0.1  # copying a token's KV costs this share of prefilling it
    clearly_less: float = 0.5  # dst's queue at most this share of home's
    max_moves: int = 1  # moves planned per call
    cooldown_s: float = 5.0  # a moved session stays this long
    retry_s: float = 0.25  # a refused move is retried after this


def _queue(load: AffinityCandidate, step_model, chunk_tokens: int) -> float:
    return placement_cost(1, replace(load, cached_tokens=0), step_model, chunk_tokens)


def move_gain(sess: SessionState, home: AffinityCandidate, dst: AffinityCandidate,
              others: Sequence[AffinityCandidate], cfg: MoveRuleConfig, step_model=None,
              chunk_tokens: int = 512) -> float:
    """stay - moved of the module docstring: > 0 when moving sess from home to dst pays for its copy."""
    prompt = sess.pinned_tokens + max(1, sess.new_tokens)
    stay = placement_cost(prompt, replace(home, cached_tokens=sess.pinned_tokens), step_model, chunk_tokens)
    for o in others:
        stay = min(stay, placement_cost(prompt, replace(o, cached_tokens=0), step_model, chunk_tokens))
    copy = cfg.copy_ratio * placement_cost(sess.pinned_tokens, AffinityCandidate(dst.base, dst.tp, 0, 0, 0, 0),
                                           step_model, chunk_tokens)
    moved = placement_cost(prompt, replace(dst, cached_tokens=sess.pinned_tokens), step_model, chunk_tokens) + copy
    return stay - moved


def _hinted(sess: SessionState, now: float, cfg: MoveRuleConfig) -> Optional[bool]:
    """True: its hinted turn is due (within lead_s either side); False: no pending hint; None: a hint names a
    later time (wait for it: the load then decides)."""
    if sess.next_turn_at is None or now > sess.next_turn_at + cfg.lead_s:
        return False
    if sess.next_turn_at - now <= cfg.lead_s:
        return True
    return None


def decide_moves(now: float, sessions: Sequence[SessionState], instances: Sequence[InstanceForMoves],
                 cfg: MoveRuleConfig = MoveRuleConfig(), step_model=None, chunk_tokens: int = 512) -> List[SessionMove]:
    """The moves to start now (see the module docstring), most urgent first: hinted sessions by their turn's
    time, then rebalancing, largest gain first."""
    inst: Dict[int, InstanceForMoves] = {i.load.base: i for i in instances}
    hinted, idle = [], []
    for s in sessions:
        if s.turn_running or now < s.not_before or s.home not in inst or s.pinned_tokens <= 0:
            continue
        h = _hinted(s, now, cfg)
        if h:
            hinted.append(s)
        elif h is False:
            idle.append(s)
    hinted.sort(key=lambda s: (s.next_turn_at, s.session_id))
    idle.sort(key=lambda s: (s.pinned_tokens, s.session_id))
    moves: List[SessionMove] = []
    for reason, group in (("hint", hinted), ("rebalance", idle)):
        for s in group:
            if len(moves) >= cfg.max_moves:
                return moves
            best = _best_destination(s, inst, reason, cfg, step_model, chunk_tokens)
            if best is None:
                continue
            dst, gain = best
            moves.append(SessionMove(s.session_id, s.home, dst, reason, gain))
            inst[dst] = _after_move(inst[dst], s, +1)
            inst[s.home] = _after_move(inst[s.home], s, -1)
    return moves


def _best_destination(s: SessionState, inst: Mapping[int, InstanceForMoves], reason: str, cfg: MoveRuleConfig,
                      step_model, chunk_tokens: int) -> Optional[tuple]:
    home = inst[s.home]
    q_home = _queue(home.load, step_model, chunk_tokens)
    best = None
    for base, d in inst.items():
        if base == s.home or d.load.tp != home.load.tp or d.room_tokens < s.pinned_tokens + s.new_tokens:
            continue
        if _queue(d.load, step_model, chunk_tokens) > cfg.clearly_less * q_home:
            continue
        if reason == "rebalance" and d.pinned_tokens + s.pinned_tokens > home.pinned_tokens:
            continue
        others = [o.load for b, o in inst.items() if b != s.home]
        gain = move_gain(s, home.load, d.load, others, cfg, step_model, chunk_tokens)
        if gain > 0 and (best is None or (gain, -base) > (best[1], -best[0])):
            best = (base, gain)
    return best


def _after_move(i: InstanceForMoves, s: SessionState, sign: int) -> InstanceForMoves:
    """The instance as the next decision should see it: the session's KV (and, on the destination, its expected
    turn's prefill) counted in."""
    load = i.load
    if sign > 0:
        load = replace(load, prefill_tokens_queued=load.prefill_tokens_queued + max(1, s.new_tokens),
                       waiting=load.waiting + 1)
    return InstanceForMoves(load, i.room_tokens - sign * s.pinned_tokens, i.pinned_tokens + sign * s.pinned_tokens)


@dataclass
class _Record:
    pinned_tokens: int = 0
    new_tokens: int = 1
    running: Set[str] = field(default_factory=set)
    hint_s: Optional[float] = None  # the latest turn's next_turn_in_s
    next_turn_at: Optional[float] = None
    not_before: float = 0.0


class SessionMover:
    """The controller's bookkeeping of open sessions for decide_moves (see the module docstring)."""

    def __init__(self, cfg: MoveRuleConfig = MoveRuleConfig(), step_model=None, chunk_tokens: int = 512):
        self.cfg = cfg
        self.step_model = step_model
        self.chunk_tokens = chunk_tokens
        self._sessions: Dict[str, _Record] = {}
        self._turns: Dict[str, str] = {}  # rid of a queued / running turn -> its session
        self.moves_started = 0
        self.moves_done = 0
        self.moves_refused = 0

    def turn_sent(self, session_id: str, rid: str, pinned_after: int, new_tokens: int,
                  next_turn_in_s: Optional[float]) -> None:
        """A turn of the session went to an instance: it pins about pinned_after tokens when it ends."""
        rec = self._sessions.setdefault(session_id, _Record())
        rec.running.add(rid)
        rec.pinned_tokens = pinned_after
        rec.new_tokens = max(1, new_tokens)
        rec.hint_s = next_turn_in_s
        rec.next_turn_at = None
        self._turns[rid] = session_id

    def turn_finished(self, rid: str, now: float) -> None:
        sid = self._turns.pop(rid, None)
        rec = self._sessions.get(sid) if sid is not None else None
        if rec is None:
            return
        rec.running.discard(rid)
        if not rec.running and rec.hint_s is not None:
            rec.next_turn_at = now + rec.hint_s

    def closed(self, session_id: str) -> None:
        rec = self._sessions.pop(session_id, None)
        for rid in (rec.running if rec else ()):
            self._turns.pop(rid, None)

    def move_done(self, session_id: str, ok: bool, now: float) -> None:
        rec = self._sessions.get(session_id)
        if ok:
            self.moves_done += 1
        else:
            self.moves_refused += 1
        if rec is not None:
            rec.not_before = now + (self.cfg.cooldown_s if ok else self.cfg.retry_s)

    def states(self, homes: Mapping[str, int]) -> List[SessionState]:
        return [SessionState(sid, homes[sid], r.pinned_tokens, r.new_tokens, bool(r.running), r.next_turn_at,
                             r.not_before)
                for sid, r in self._sessions.items() if sid in homes]

    def plan(self, now: float, homes: Mapping[str, int], instances: Sequence[InstanceForMoves]) -> List[SessionMove]:
        moves = decide_moves(now, self.states(homes), instances, self.cfg, self.step_model, self.chunk_tokens)
        self.moves_started += len(moves)
        return moves
