"""The policy interface: what a policy sees (ClusterState), what it decides (Place / Hold / Reject /
Transform), the `Policy` base class, and the accounting helpers every policy shares (DESIGN §6).

Data flow. The caller (the live controller, or gyges.sim) owns the instances and the queue of held
requests. It describes them in a `ClusterState` (one `InstanceLoad` per instance, from its leader's last
report, plus the held requests in FIFO order) and asks a `Policy`:

    on_request(req, state) -> Place | Hold | Reject      once, when a request arrives
    on_tick(state)         -> [Place | Reject | Transform] on every load report / ~100 ms: places held
                                                          requests, starts at most one merge or split

The caller applies the decisions: a Place sends the request to the instance (keyed by its first device),
a Hold keeps it in `held` for a later tick, a Reject answers HTTP 400 with the message, a Transform is a
`Topology.merge` (tp == len(devices)) or `Topology.split`. While a transformation runs, the instances
involved are reported with `transforming=True`; no policy returns a Transform then.

Memory accounting (tokens, all from the reports): a request needs prompt + max_new tokens of KV; it fits
an instance now when that is <= capacity - used + evictable - tokens_in_flight, and it can ever fit when
it is <= capacity. An instance formed by a merge holds the sum of its members' capacities (or what the
runtime reports in ClusterState.capacity_by_tp).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from gyges.topology import Instance, Topology, is_power_of_two

# =====================================================================================================
# What the policy sees and what it decides
# =====================================================================================================
@dataclass(frozen=True)
class InstanceLoad:
    """One instance as the controller sees it (from its leader's reports)."""

    devices: Tuple[int, ...]
    tp: int
    running: int
    waiting: int
    kv_capacity_tokens: int  # pool capacity
    kv_used_tokens: int  # pages held by requests and cache (tokens)
    kv_evictable_tokens: int  # cached tokens nobody references (reclaimable)
    tokens_in_flight: int  # tokens the admitted requests may still need (remaining prompt + max_new)
    transforming: bool = False
    idle_since: Optional[float] = None  # when running + waiting last became 0 (None while busy)
    # prompt + max_new of the largest request admitted here and not finished, if the caller knows it
    # (None: the policy bounds it from its own placements, see RequestSizeBound)
    largest_request_tokens: Optional[int] = None
    # the most prompt tokens one request admitted here has still to prefill (None: not reported; the Gyges
    # policy then splits on memory alone)
    prefill_tokens_left: Optional[int] = None
    # prompt tokens the requests here have still to prefill, in all (None: not reported; affinity placement
    # then counts no queue)
    prefill_tokens_queued: Optional[int] = None

    @property
    def base(self) -> int:
        return self.devices[0]

    @property
    def free_tokens(self) -> int:
        """Tokens a new request may still reserve here."""
        return (self.kv_capacity_tokens - self.kv_used_tokens + self.kv_evictable_tokens
                - self.tokens_in_flight)

    @property
    def held_tokens(self) -> int:
        """Tokens the admitted requests hold now or may still need (cache that can be evicted excluded)."""
        return self.kv_used_tokens - self.kv_evictable_tokens + self.tokens_in_flight

    @property
    def num_requests(self) -> int:
        return self.running + self.waiting


@dataclass(frozen=True)
class RequestInfo:
    rid: str
    prompt_tokens: int
    max_new_tokens: int
    arrival: float
    # (instance base, leading prompt tokens whose KV that instance holds): its session's pinned prefix or its
    # longest cached prefix (gyges.policies.affinity); empty: nothing cached anywhere, or not known
    cached_tokens: Tuple[Tuple[int, int], ...] = ()

    @property
    def need_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class ClusterState:
    num_devices: int
    max_tp: int
    instances: Tuple[InstanceLoad, ...]
    now: float
    held: Tuple[RequestInfo, ...] = ()  # requests the caller holds, oldest first
    # (tp, KV tokens) of an instance of that TP once formed, when the runtime knows it exactly (a merge also
    # turns freed weight memory into KV); otherwise the members' capacities are summed.
    capacity_by_tp: Tuple[Tuple[int, int], ...] = ()

    def instance(self, base: int) -> InstanceLoad:
        for inst in self.instances:
            if inst.base == base:
                return inst
        raise KeyError(f"no instance starts at device {base}")

    @property
    def transform_in_flight(self) -> bool:
        return any(i.transforming for i in self.instances)


@dataclass(frozen=True)
class Place:
    rid: str
    instance: int  # the instance's first device


@dataclass(frozen=True)
class Hold:
    rid: str
    reason: str


@dataclass(frozen=True)
class Reject:
    rid: str
    message: str


@dataclass(frozen=True)
class Transform:
    devices: Tuple[int, ...]
    tp: int  # == len(devices): merge; smaller: split into instances of this TP

    @property
    def is_merge(self) -> bool:
        return self.tp == len(self.devices)


Decision = Union[Place, Hold, Reject]
TickDecision = Union[Transform, Place, Reject]


# =====================================================================================================
# Helpers shared by all policies
# =====================================================================================================
def fits_now(req: RequestInfo, inst: InstanceLoad) -> bool:
    return not inst.transforming and req.need_tokens <= inst.free_tokens


def can_ever_fit(req: RequestInfo, inst: InstanceLoad) -> bool:
    return req.need_tokens <= inst.kv_capacity_tokens


def group_capacity(state: ClusterState, devices: Sequence[int]) -> int:
    """KV tokens an instance on `devices` (an aligned group) would hold: its members' capacities, or
    its share of the one instance that contains it."""
    devs = set(devices)
    known = dict(state.capacity_by_tp)
    if len(devs) in known:
        return known[len(devs)]
    total = 0
    for inst in state.instances:
        own = set(inst.devices)
        if own <= devs:
            total += inst.kv_capacity_tokens
        elif devs <= own:
            total += inst.kv_capacity_tokens * len(devs) // inst.tp
    return total


def too_long_message(req: RequestInfo, limit: int, where: str) -> str:
    return (f"request needs {req.need_tokens} KV tokens ({req.prompt_tokens} prompt + "
            f"{req.max_new_tokens} max_new_tokens) but {where} holds at most {limit} tokens; "
            f"shorten the prompt or lower max_new_tokens")


class LoadLedger:
    """The instances' free memory and load during one decision round, updated for each Place made in
    it so that several placements in one tick never overcommit an instance."""

    def __init__(self, state: ClusterState):
        self._by_base: Dict[int, InstanceLoad] = {i.base: i for i in state.instances}
        self._extra_tokens: Dict[int, int] = {}
        self._extra_requests: Dict[int, int] = {}
        self._largest: Dict[int, int] = {}
        self._largest_prompt: Dict[int, int] = {}
        self._extra_prompt: Dict[int, int] = {}

    def load(self, base: int) -> InstanceLoad:
        """The instance as it will be once this round's placements arrive."""
        inst = self._by_base[base]
        extra = self._extra_tokens.get(base, 0)
        if not extra:
            return inst
        largest = inst.largest_request_tokens
        if largest is not None:
            largest = max(largest, self._largest[base])
        prefill_left = inst.prefill_tokens_left
        if prefill_left is not None:
            prefill_left = max(prefill_left, self._largest_prompt[base])
        queued = inst.prefill_tokens_queued
        if queued is not None:
            queued += self._extra_prompt[base]
        return replace(inst, waiting=inst.waiting + self._extra_requests[base],
                       tokens_in_flight=inst.tokens_in_flight + extra, idle_since=None,
                       largest_request_tokens=largest, prefill_tokens_left=prefill_left,
                       prefill_tokens_queued=queued)

    def loads(self) -> List[InstanceLoad]:
        return [self.load(b) for b in self._by_base]

    def place(self, req: RequestInfo, base: int) -> Place:
        self._extra_tokens[base] = self._extra_tokens.get(base, 0) + req.need_tokens
        self._extra_requests[base] = self._extra_requests.get(base, 0) + 1
        self._largest[base] = max(self._largest.get(base, 0), req.need_tokens)
        self._largest_prompt[base] = max(self._largest_prompt.get(base, 0), req.prompt_tokens)
        cached = dict(req.cached_tokens).get(base, 0)
        self._extra_prompt[base] = self._extra_prompt.get(base, 0) + max(1, req.prompt_tokens - cached)
        return Place(req.rid, base)


def least_loaded(cands: Sequence[InstanceLoad]) -> InstanceLoad:
    return min(cands, key=lambda i: (i.tokens_in_flight, i.num_requests, i.base))


# =====================================================================================================
# The interface
# =====================================================================================================
class Policy(ABC):
    name: str = "policy"

    @abstractmethod
    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        """The starting topology: device groups, each aligned."""

    @abstractmethod
    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        """Where a new request goes (state.held are the requests held before it)."""

    @abstractmethod
    def on_tick(self, state: ClusterState) -> List[TickDecision]:
        """Placements of held requests, rejects, and at most one Transform (none while one is in flight)."""


def uniform_groups(num_devices: int, tp: int) -> List[Tuple[int, ...]]:
    if not is_power_of_two(tp) or num_devices % tp:
        raise ValueError(f"{num_devices} devices cannot be split into aligned instances of TP {tp}")
    return [tuple(range(b, b + tp)) for b in range(0, num_devices, tp)]


def validate_transform(t: Transform, state: ClusterState) -> Topology:
    """The topology after t (ValueError if t is not a valid merge/split of state's instances)."""
    topo = Topology(state.num_devices, tuple(Instance.of(i.devices) for i in state.instances), state.max_tp)
    return topo.merge(t.devices) if t.is_merge else topo.split(t.devices, t.tp)
