"""SGLang's session API on the TokenizerManager side: each open session's tree of turns, and the prompt of a
new turn built from an earlier one (the rules of SGLang's session_controller.Session.create_req).

    POST /open_session {capacity_of_str_len, session_id?}  -> SessionStore.open -> the id
    /generate {..., session_params: {id, rid, offset, replace, drop_previous_output, next_turn_in_s}}
        -> SessionStore.prepare(tokenized turn): input_ids = the earlier request's prompt + output (cut at
           offset, output dropped on drop_previous_output) + the new input (its BOS dropped); the turn
           becomes a child of that request in the session's tree; session_id / session_prefix_tokens / the hint go
           with the request to the controller (placement by affinity) and the scheduler (KV pinned after it)
        -> SessionStore.finished(rid, output_ids) when its last output arrives
    POST /close_session {session_id} -> SessionStore.close -> CloseSessionReqInput to every instance
    idle timeout (--session-idle-timeout): SessionStore.expired() -> closed the same way

Every problem with a turn (unknown or closed session, unknown rid, appending to a turn that has not
finished, offsets out of range) is a ValueError: HTTP 400, nothing queued. Pure Python (no torch, no
sockets), unit-tested in test/test_sessions.py.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from sglang.srt.managers.io_struct import SessionParams, TokenizedGenerateReqInput


@dataclass
class SessionTurn:
    """One request of a session: its full prompt and, once finished, its output."""

    rid: str
    input_ids: List[int]
    max_new_tokens: Optional[int]
    parent: Optional[str] = None  # the rid this turn appended to
    children: List[str] = field(default_factory=list)
    output_ids: List[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class Session:
    session_id: str
    capacity_of_str_len: int
    turns: Dict[str, SessionTurn] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)

    def drop_subtree(self, rid: str, keep_root: bool = False) -> List[str]:
        """Forget turn rid's descendants (and rid itself unless keep_root); returns the unfinished ones."""
        unfinished = []
        stack = [rid]
        while stack:
            turn = self.turns.get(stack.pop())
            if turn is None:
                continue
            stack.extend(turn.children)
            if turn.rid == rid and keep_root:
                turn.children = []
                continue
            if not turn.finished:
                unfinished.append(turn.rid)
            del self.turns[turn.rid]
        return unfinished


def parse_session_params(value: Any) -> SessionParams:
    """SessionParams from the JSON object of a request; ValueError naming the field that is wrong."""
    if isinstance(value, SessionParams):
        return value
    if not isinstance(value, dict):
        raise ValueError("'session_params' must be an object with 'id' (and optionally rid, offset, replace, "
                         "drop_previous_output)")
    unknown = sorted(set(value) - {"id", "rid", "offset", "replace", "drop_previous_output", "next_turn_in_s"})
    if unknown:
        raise ValueError(f"'session_params' has unknown fields {unknown}")
    sid = value.get("id")
    if not isinstance(sid, str) or not sid:
        raise ValueError("'session_params.id' must be the non-empty id returned by /open_session")
    rid = value.get("rid")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise ValueError("'session_params.rid' must be a request id of the session or null")
    offset = value.get("offset")
    if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool)):
        raise ValueError(f"'session_params.offset' must be an integer or null, got {offset!r}")
    for name in ("replace", "drop_previous_output"):
        v = value.get(name)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"'session_params.{name}' must be a boolean or null, got {v!r}")
    return SessionParams(sid, rid, offset, value.get("replace"), value.get("drop_previous_output"),
                         parse_next_turn_hint(value.get("next_turn_in_s"), "session_params.next_turn_in_s"))


# HTTP header with the same hint for clients that cannot send session_params (the OpenAI API, stateless chat
# clients resending the whole conversation): seconds until the next turn; for a request without a session the
# hint keeps the request's own computed prefix ready. session_params.next_turn_in_s wins when both are given.
NEXT_TURN_HEADER = "X-Next-Turn-In"

# Longest hint accepted (a day): a later turn is no reason to keep KV ready.
MAX_NEXT_TURN_HINT_S = 86400.0


def parse_next_turn_hint(value: Any, where: str) -> Optional[float]:
    """A next-turn hint in seconds (a non-negative finite number, at most MAX_NEXT_TURN_HINT_S, or None);
    ValueError naming `where` otherwise (HTTP 400). Header values arrive as strings."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{where} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number of seconds or null, got {value!r}")
    if not math.isfinite(value) or not 0 <= value <= MAX_NEXT_TURN_HINT_S:
        raise ValueError(f"{where} must be between 0 and {MAX_NEXT_TURN_HINT_S:g} seconds, got {value!r}")
    return float(value)


class SessionStore:
    def __init__(self, idle_timeout_s: float = 0.0, bos_token_id: Optional[int] = None):
        """idle_timeout_s: a session with no turn for this long is closed (0: never)."""
        self.idle_timeout_s = idle_timeout_s
        self.bos_token_id = bos_token_id
        self.sessions: Dict[str, Session] = {}
        self._turn_session: Dict[str, str] = {}  # rid of an unfinished turn -> its session

    # ---- open / close ------------------------------------------------------------------------------------
    def open(self, capacity_of_str_len: Any, session_id: Optional[str] = None) -> str:
        if not isinstance(capacity_of_str_len, int) or isinstance(capacity_of_str_len, bool) or capacity_of_str_len < 0:
            raise ValueError(f"'capacity_of_str_len' must be a non-negative integer, got {capacity_of_str_len!r}")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError("'session_id' must be a non-empty string or null")
        if session_id is None:
            session_id = uuid.uuid4().hex
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open; close it first or open another id")
        self.sessions[session_id] = Session(session_id, capacity_of_str_len)
        return session_id

    def close(self, session_id: Any) -> List[str]:
        """Forget the session. Returns the rids of its turns still running (the caller aborts them)."""
        if not isinstance(session_id, str) or session_id not in self.sessions:
            raise ValueError(f"no open session {session_id!r} (never opened, closed, or expired after "
                             f"{self.idle_timeout_s:g} s idle: --session-idle-timeout)")
        session = self.sessions.pop(session_id)
        running = [t.rid for t in session.turns.values() if not t.finished]
        for rid in running:
            self._turn_session.pop(rid, None)
        return running

    def expired(self, now: Optional[float] = None) -> List[str]:
        """Ids of the sessions idle past the timeout (nothing running in them); the caller closes them."""
        if self.idle_timeout_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        return [sid for sid, s in self.sessions.items()
                if now - s.last_used > self.idle_timeout_s and all(t.finished for t in s.turns.values())]

    # ---- turns -------------------------------------------------------------------------------------------
    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ValueError(f"session_params.id {session_id!r} is not an open session (open it with "
                             f"/open_session; closed and expired sessions are gone)")
        return session

    def check(self, params: SessionParams, rid: str) -> None:
        """Validate a turn before it is tokenized (cheap errors first)."""
        session = self._session(params.id)
        if rid in session.turns or rid in self._turn_session:
            raise ValueError(f"request id {rid!r} is already a turn of a session")
        if params.rid is not None:
            parent = session.turns.get(params.rid)
            if parent is None:
                raise ValueError(f"session_params.rid {params.rid!r} is not a request of session {params.id!r} "
                                 f"(or was replaced)")
            if not parent.finished:
                raise ValueError(f"session_params.rid {params.rid!r} has not finished yet: a turn can only be "
                                 f"appended to (or replace the later turns of) a finished request")

    def prepare(self, params: SessionParams, req: TokenizedGenerateReqInput) -> List[str]:
        """Turn `req` (tokenized new input) into the session's next turn: its input_ids become the whole
        prompt, session_id / session_prefix_tokens are set. Returns rids of replaced turns still running
        (the caller aborts them). Raises ValueError (nothing changed) when the turn is invalid."""
        self.check(params, req.rid)
        session = self._session(params.id)
        new_input = list(req.input_ids)
        parent = session.turns.get(params.rid) if params.rid is not None else None
        prefix_len = 0
        if parent is not None:
            if self.bos_token_id is not None and new_input and new_input[0] == self.bos_token_id:
                new_input = new_input[1:]
            output = parent.output_ids[:parent.max_new_tokens] if parent.max_new_tokens is not None \
                else list(parent.output_ids)
            history = list(parent.input_ids) if params.drop_previous_output else parent.input_ids + output
            # What the parent's KV covers: its prompt and output, but the last output token was never fed.
            computed = len(parent.input_ids) + max(0, len(output) - 1)
            if params.offset:
                if not -len(history) <= params.offset <= len(history):
                    raise ValueError(f"session_params.offset {params.offset} is out of range for request "
                                     f"{params.rid!r} of {len(history)} tokens")
                history = history[:params.offset]
            prefix_len = min(len(history), computed)
            full = history + new_input
        else:
            full = new_input
        if not full:
            raise ValueError("the session turn has no tokens (empty history and empty input)")
        aborted: List[str] = []
        if params.replace:
            if params.rid is None:
                for root in [t.rid for t in session.turns.values() if t.parent is None]:
                    aborted += session.drop_subtree(root)
            else:
                aborted += session.drop_subtree(params.rid, keep_root=True)
        for rid in aborted:
            self._turn_session.pop(rid, None)
        req.input_ids = full
        req.session_id = params.id
        req.session_prefix_tokens = prefix_len
        req.next_turn_in_s = params.next_turn_in_s
        turn = SessionTurn(req.rid, list(full), req.sampling_params.max_new_tokens,
                           parent=parent.rid if parent is not None else None)
        session.turns[req.rid] = turn
        if parent is not None:
            parent.children.append(req.rid)
        self._turn_session[req.rid] = params.id
        session.last_used = time.monotonic()
        return aborted

    def finished(self, rid: str, output_ids: List[int]) -> None:
        """A turn's last output arrived (also an aborted turn: later turns may append to what it produced)."""
        session_id = self._turn_session.pop(rid, None)
        session = self.sessions.get(session_id) if session_id is not None else None
        if session is None or rid not in session.turns:
            return
        turn = session.turns[rid]
        turn.output_ids = list(output_ids)
        turn.finished = True
        session.last_used = time.monotonic()

    def forget_turn(self, rid: str) -> None:
        """A turn that never reached a scheduler (refused before sending): drop it from its session."""
        session_id = self._turn_session.pop(rid, None)
        session = self.sessions.get(session_id) if session_id is not None else None
        if session is None or rid not in session.turns:
            return
        turn = session.turns.pop(rid)
        if turn.parent in session.turns:
            session.turns[turn.parent].children.remove(rid)
