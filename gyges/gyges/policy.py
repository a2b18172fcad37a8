"""Scheduling policies: where each request goes, and when instances merge or split (DESIGN §6).

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
it is <= capacity. An instance formed by a merge holds the sum of its members' capacities.

Policies: `GygesPolicy` (TP1 instances; merges an aligned group when a request fits no existing
instance, splits back after a hysteresis delay) and the static baselines (`StaticDPRoundRobin`,
`StaticDPLeastLoad`, `StaticTP`, `StaticHybrid`) behind the same interface; `make_policy` builds one by
name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Set, Tuple, Union

from gyges.costmodel import TransformCostModel
from gyges.topology import Instance, Topology, aligned_groups, is_power_of_two


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

    def load(self, base: int) -> InstanceLoad:
        """The instance as it will be once this round's placements arrive."""
        inst = self._by_base[base]
        extra = self._extra_tokens.get(base, 0)
        if not extra:
            return inst
        largest = inst.largest_request_tokens
        if largest is not None:
            largest = max(largest, self._largest[base])
        return InstanceLoad(inst.devices, inst.tp, inst.running, inst.waiting + self._extra_requests[base],
                            inst.kv_capacity_tokens, inst.kv_used_tokens, inst.kv_evictable_tokens,
                            inst.tokens_in_flight + extra, inst.transforming, None, largest)

    def loads(self) -> List[InstanceLoad]:
        return [self.load(b) for b in self._by_base]

    def place(self, req: RequestInfo, base: int) -> Place:
        self._extra_tokens[base] = self._extra_tokens.get(base, 0) + req.need_tokens
        self._extra_requests[base] = self._extra_requests.get(base, 0) + 1
        self._largest[base] = max(self._largest.get(base, 0), req.need_tokens)
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


# =====================================================================================================
# Gyges
# =====================================================================================================
class RequestSizeBound:
    """An upper bound on the largest request each merged instance may still hold, so that a split can
    be proven safe from the aggregate reports alone.

    A request admitted to an instance holds exactly its need (used + still needed tokens) until it
    finishes, so a request whose need exceeds the instance's held_tokens is surely gone. Per merged
    instance we keep the needs of the requests placed on it (and, for each member at the merge, the
    bound of that member); the bound is the largest of them not yet surely gone. For an instance whose
    history we did not see (e.g. merged by hand) the bound is its held_tokens. When the caller reports
    largest_request_tokens, that is used instead."""

    def __init__(self):
        self._needs: Dict[Tuple[int, ...], List[int]] = {}

    def bound(self, inst: InstanceLoad) -> int:
        if inst.largest_request_tokens is not None:
            return inst.largest_request_tokens
        needs = self._needs.get(inst.devices)
        if needs is None:
            return inst.held_tokens
        needs[:] = [n for n in needs if n <= inst.held_tokens]
        return max(needs, default=0)

    def on_merge(self, devices: Tuple[int, ...], members: Sequence[InstanceLoad]) -> None:
        self._needs[devices] = [self.bound(m) for m in members]

    def on_place(self, inst: InstanceLoad, need: int) -> None:
        if inst.devices in self._needs:
            self._needs[inst.devices].append(need)

    def forget_missing(self, state: ClusterState) -> None:
        present = {i.devices for i in state.instances}
        for devs in [d for d in self._needs if d not in present]:
            del self._needs[devs]


class GygesPolicy(Policy):
    """TP-`base_tp` instances for throughput; a request that fits no existing instance triggers the
    cheapest merge of an aligned group that can hold it; a merged instance splits back to `base_tp` once
    its requests fit the parts for `split_delay` seconds and no held request needs more than a part.

    "Fit the parts" (k parts of capacity C, held tokens H, largest request at most M, see
    RequestSizeBound): M <= C and H <= k*C - (k-1)*M; then dealing the requests greedily (each into
    any part with room) never fails. Without placement history M = H and this is H <= C.

    Placement: the smallest instance that fits now, least loaded among those. Held requests are placed
    FIFO within their size class (the smallest group size that can ever hold them), so a held long
    request never blocks short ones, and instances a held larger request waits for (or that a planned
    merge will take) get no new smaller requests."""

    name = "gyges"

    def __init__(self, split_delay: float = 5.0, cost_model: Optional[TransformCostModel] = None,
                 base_tp: int = 1):
        if split_delay < 0:
            raise ValueError("split_delay must be >= 0")
        if not is_power_of_two(base_tp):
            raise ValueError(f"base_tp={base_tp} is not a power of two")
        self.split_delay = split_delay
        self.cost_model = cost_model or TransformCostModel()
        self.base_tp = base_tp
        self._split_ready_since: Dict[Tuple[int, ...], float] = {}
        self._sizes = RequestSizeBound()
        self._capacity_by_tp: Tuple[Tuple[int, int], ...] = ()  # from the latest ClusterState

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        return uniform_groups(num_devices, min(self.base_tp, max_tp))

    # -- sizes -----------------------------------------------------------------------------------------
    @staticmethod
    def formable_groups(state: ClusterState) -> List[Tuple[int, ...]]:
        return aligned_groups(state.num_devices, state.max_tp)

    def largest_formable(self, state: ClusterState) -> Tuple[int, Tuple[int, ...]]:
        """(capacity, devices) of the largest instance a merge can ever make."""
        groups = self.formable_groups(state)
        top = max(len(g) for g in groups)
        return max((group_capacity(state, g), g) for g in groups if len(g) == top)

    def size_class(self, req: RequestInfo, state: ClusterState) -> int:
        """The smallest group size that can ever hold req (FIFO order is kept within a class)."""
        for g in self.formable_groups(state):  # smallest first
            if group_capacity(state, g) >= req.need_tokens:
                return len(g)
        return 0  # too long for any

    # -- merges ----------------------------------------------------------------------------------------
    def merge_for(self, req: RequestInfo, state: ClusterState, ledger: LoadLedger) -> Optional[Tuple[int, ...]]:
        """The aligned group whose merge serves req at least cost (None if no transformation can start:
        every candidate touches a transforming instance). Ranking: fewest devices; the request fits
        right after the merge; estimated pause times the requests it disturbs; lowest device."""
        best = None
        for g in self.formable_groups(state):
            if len(g) < 2 or group_capacity(state, g) < req.need_tokens:
                continue
            members = [ledger.load(i.base) for i in state.instances if set(i.devices) <= set(g)]
            if len(members) < 2 or sum(m.tp for m in members) != len(g):
                continue  # inside one instance (already exists) or cut by a larger one
            if any(m.transforming for m in members):
                continue
            cost = self.cost_model.merge_cost([(m.tp, m.kv_used_tokens) for m in members], len(g))
            disturbed = sum(m.num_requests for m in members)
            fits_after = req.need_tokens <= sum(m.free_tokens for m in members)
            key = (len(g), not fits_after, cost.est_seconds * (1 + disturbed), g[0])
            if best is None or key < best[0]:
                best = (key, g)
        return best[1] if best else None

    def _needs_merge(self, req: RequestInfo, state: ClusterState) -> bool:
        return not any(can_ever_fit(req, i) for i in state.instances)

    # -- placement -------------------------------------------------------------------------------------
    def _part_capacity(self, inst: InstanceLoad) -> int:
        """KV tokens of one base_tp part after a split: what the runtime reports when it knows (a merge
        turned freed weight memory into KV, which a split gives back), else an even share."""
        known = dict(self._capacity_by_tp)
        if self.base_tp in known:
            return known[self.base_tp]
        return inst.kv_capacity_tokens // (inst.tp // self.base_tp)

    def _keeps_splittable(self, req: RequestInfo, inst: InstanceLoad, held: Sequence[RequestInfo]) -> bool:
        """A merged instance whose requests all fit a part only admits requests that keep it so (it is
        on its way back to base_tp: filling it with short requests would pin it merged)."""
        if inst.tp <= self.base_tp:
            return True
        parts = inst.tp // self.base_tp
        part_capacity = self._part_capacity(inst)
        if any(h.need_tokens > part_capacity for h in held):
            return True  # wanted as it is
        largest = self._sizes.bound(inst)
        if largest > part_capacity:
            return True  # still serving a request that needs it
        largest = max(largest, req.need_tokens)
        return inst.held_tokens + req.need_tokens <= parts * part_capacity - (parts - 1) * largest

    def _choose(self, req: RequestInfo, ledger: LoadLedger, excluded: Set[int],
                held: Sequence[RequestInfo] = ()) -> Optional[InstanceLoad]:
        cands = [i for i in ledger.loads() if i.base not in excluded and fits_now(req, i)
                 and self._keeps_splittable(req, i, held)]
        if not cands:
            return None
        smallest = min(i.tp for i in cands)
        return least_loaded([i for i in cands if i.tp == smallest])

    def _reserved_by(self, waiting: Sequence[Tuple[RequestInfo, int]], cls: int, state: ClusterState,
                     ledger: LoadLedger) -> Set[int]:
        """Instances kept from a request of class `cls` for the still-held larger requests ahead of it:
        the instances they wait for, and the members of the merge the first of them needs."""
        out: Set[int] = set()
        merge_planned = False
        for h, hcls in waiting:
            if hcls <= cls:
                continue
            homes = [i.base for i in state.instances if can_ever_fit(h, i)]
            if homes:
                out.update(homes)
            elif not merge_planned:
                merge_planned = True
                group = self.merge_for(h, state, ledger)
                if group:
                    out.update(i.base for i in state.instances if set(i.devices) <= set(group))
        return out

    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        self._capacity_by_tp = state.capacity_by_tp
        limit, group = self.largest_formable(state)
        if req.need_tokens > limit:
            return Reject(req.rid, too_long_message(
                req, limit, f"the largest instance Gyges can form (TP {len(group)} on devices {list(group)})"))
        cls = self.size_class(req, state)
        held = [(h, self.size_class(h, state)) for h in state.held]
        if any(hcls == cls for _, hcls in held):
            return Hold(req.rid, f"queued behind earlier held requests of its size class (TP {cls})")
        ledger = LoadLedger(state)
        target = self._choose(req, ledger, self._reserved_by(held, cls, state, ledger), state.held)
        if target is not None:
            self._sizes.on_place(target, req.need_tokens)
            return Place(req.rid, target.base)
        if self._needs_merge(req, state):
            return Hold(req.rid, f"needs an instance of TP {cls}: waiting for a merge")
        return Hold(req.rid, "waiting for KV memory on an instance that can hold it")

    # -- ticks -----------------------------------------------------------------------------------------
    def on_tick(self, state: ClusterState) -> List[TickDecision]:
        self._capacity_by_tp = state.capacity_by_tp
        out: List[TickDecision] = []
        ledger = LoadLedger(state)
        limit, _ = self.largest_formable(state)
        still_held: List[Tuple[RequestInfo, int]] = []
        blocked: Set[int] = set()
        for h in state.held:
            if h.need_tokens > limit:
                out.append(Reject(h.rid, too_long_message(h, limit, "the largest instance Gyges can form")))
                continue
            cls = self.size_class(h, state)
            target = None
            if cls not in blocked:
                target = self._choose(h, ledger, self._reserved_by(still_held, cls, state, ledger), state.held)
            if target is not None:
                self._sizes.on_place(target, h.need_tokens)
                out.append(ledger.place(h, target.base))
            else:
                blocked.add(cls)
                still_held.append((h, cls))

        transform = None
        if not state.transform_in_flight:
            self._sizes.forget_missing(state)
            transform = self._merge_decision([h for h, _ in still_held], state, ledger)
        split = self._split_decision([h for h, _ in still_held], state, ledger)
        transform = transform or split
        if transform is not None and not state.transform_in_flight:
            if transform.is_merge:
                self._sizes.on_merge(transform.devices, [ledger.load(i.base) for i in state.instances
                                                         if set(i.devices) <= set(transform.devices)])
            out.append(transform)
        return out

    def split_is_safe(self, inst: InstanceLoad, held: Sequence[RequestInfo] = ()) -> bool:
        """inst's requests fit its parts at base_tp, and no held request needs more than a part."""
        parts = inst.tp // self.base_tp
        part_capacity = self._part_capacity(inst)
        largest = self._sizes.bound(inst)
        return (largest <= part_capacity
                and inst.held_tokens <= parts * part_capacity - (parts - 1) * largest
                and not any(h.need_tokens > part_capacity for h in held))

    def _merge_decision(self, held: Sequence[RequestInfo], state: ClusterState,
                        ledger: LoadLedger) -> Optional[Transform]:
        for h in held:
            if self._needs_merge(h, state):
                group = self.merge_for(h, state, ledger)
                if group is not None:
                    return Transform(tuple(group), len(group))
        return None

    def _split_decision(self, held: Sequence[RequestInfo], state: ClusterState,
                        ledger: LoadLedger) -> Optional[Transform]:
        """Track, per merged instance, since when split_is_safe holds; the one ready longest, if for
        split_delay seconds, splits."""
        ready: List[Tuple[float, Tuple[int, ...]]] = []
        alive = set()
        for inst in ledger.loads():
            if inst.tp <= self.base_tp or inst.transforming:
                continue
            alive.add(inst.devices)
            if not self.split_is_safe(inst, held):
                self._split_ready_since.pop(inst.devices, None)
                continue
            since = self._split_ready_since.setdefault(inst.devices, state.now)
            if state.now - since >= self.split_delay:
                ready.append((since, inst.devices))
        for devs in list(self._split_ready_since):
            if devs not in alive:
                del self._split_ready_since[devs]
        if not ready:
            return None
        return Transform(min(ready)[1], self.base_tp)


# =====================================================================================================
# Static baselines
# =====================================================================================================
class StaticPolicy(Policy):
    """Fixed instances, never transforms. Each request goes to a FIFO queue (`queue_of`); a queue's
    head is placed on the instance `pick` chooses among `homes` (instances allowed to serve it) that fit
    now, else it and everything behind it in that queue is held."""

    def __init__(self, tp: int = 1):
        if not is_power_of_two(tp):
            raise ValueError(f"tp={tp} is not a power of two")
        self.tp = tp

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        return uniform_groups(num_devices, min(self.tp, max_tp, num_devices))

    # -- what subclasses choose ------------------------------------------------------------------------
    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        return [i for i in state.instances if can_ever_fit(req, i)]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return "all"

    def pick(self, req: RequestInfo, cands: Sequence[InstanceLoad]) -> InstanceLoad:
        return least_loaded(cands)

    def forget(self, rid: str) -> None:
        """Called once a request is placed or rejected."""

    # -- the interface ---------------------------------------------------------------------------------
    def _reject_if_unservable(self, req: RequestInfo, state: ClusterState) -> Optional[Reject]:
        if any(can_ever_fit(req, i) for i in state.instances) and self.homes(req, state):
            return None
        limit = max(i.kv_capacity_tokens for i in state.instances)
        self.forget(req.rid)
        return Reject(req.rid, too_long_message(req, limit, f"the largest instance of {self.name}"))

    def _try_place(self, req: RequestInfo, state: ClusterState, ledger: LoadLedger) -> Optional[Place]:
        homes = {i.base for i in self.homes(req, state)}
        cands = [i for i in ledger.loads() if i.base in homes and fits_now(req, i)]
        if not cands:
            return None
        self.forget(req.rid)
        return ledger.place(req, self.pick(req, cands).base)

    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        rej = self._reject_if_unservable(req, state)
        if rej:
            return rej
        queue = self.queue_of(req, state)
        if any(self.queue_of(h, state) == queue for h in state.held):
            return Hold(req.rid, "queued behind earlier held requests")
        placed = self._try_place(req, state, LoadLedger(state))
        return placed or Hold(req.rid, "its instance has no free KV memory now")

    def on_tick(self, state: ClusterState) -> List[TickDecision]:
        out: List[TickDecision] = []
        ledger = LoadLedger(state)
        blocked: Set[Hashable] = set()
        for h in state.held:
            rej = self._reject_if_unservable(h, state)
            if rej:
                out.append(rej)
                continue
            queue = self.queue_of(h, state)
            if queue in blocked:
                continue
            placed = self._try_place(h, state, ledger)
            if placed:
                out.append(placed)
            else:
                blocked.add(queue)
        return out


class StaticDPLeastLoad(StaticPolicy):
    """D instances of TP tp; each request to the least-loaded instance that fits (one FIFO queue)."""

    name = "static-dp-ll"


class StaticDPRoundRobin(StaticPolicy):
    """D instances of TP tp; requests dealt round robin over the instances that can ever hold them
    (SGLang's --load-balance-method round_robin); each instance keeps its own FIFO queue."""

    name = "static-dp-rr"

    def __init__(self, tp: int = 1):
        super().__init__(tp)
        self._next = 0
        self._target: Dict[str, int] = {}

    def _target_of(self, req: RequestInfo, state: ClusterState) -> Optional[int]:
        if req.rid not in self._target:
            able = [i.base for i in sorted(state.instances, key=lambda i: i.base) if can_ever_fit(req, i)]
            if not able:
                return None
            self._target[req.rid] = able[self._next % len(able)]
            self._next += 1
        return self._target[req.rid]

    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        target = self._target_of(req, state)
        return [i for i in state.instances if i.base == target]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return self._target.get(req.rid, self._target_of(req, state))

    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        self._target_of(req, state)  # deal it before looking at the queues
        return super().on_request(req, state)

    def forget(self, rid: str) -> None:
        self._target.pop(rid, None)


class StaticTP(StaticDPLeastLoad):
    """One instance over all devices (TP = num_devices, or several of TP max_tp on a larger host)."""

    name = "static-tp"

    def __init__(self):
        super().__init__(tp=1)

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        tp = 1
        while tp * 2 <= min(num_devices, max_tp):
            tp *= 2
        return uniform_groups(num_devices, tp)


class StaticHybrid(StaticPolicy):
    """k TP1 instances plus one TP m instance on devices [0, m): requests needing more than
    `long_threshold_tokens` (default: what a TP1 instance can hold) go to the big instance, the rest to
    the least-loaded TP1 instance. One FIFO queue per side."""

    name = "static-hybrid"

    def __init__(self, big_tp: Optional[int] = None, long_threshold_tokens: Optional[int] = None):
        super().__init__(tp=1)
        if big_tp is not None and (not is_power_of_two(big_tp) or big_tp < 2):
            raise ValueError(f"big_tp={big_tp} must be a power of two >= 2")
        self.big_tp = big_tp
        self.long_threshold_tokens = long_threshold_tokens

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        m = self.big_tp
        if m is None:
            m = 2
            while m * 2 <= min(num_devices // 2, max_tp):
                m *= 2
        if m > max_tp or m >= num_devices:
            raise ValueError(f"static-hybrid: a TP {m} instance needs more than {num_devices} devices "
                             f"(max_tp {max_tp}) leaving one TP1 instance")
        return [tuple(range(m))] + [(d,) for d in range(m, num_devices)]

    def _threshold(self, state: ClusterState) -> int:
        if self.long_threshold_tokens is not None:
            return self.long_threshold_tokens
        small = [i.kv_capacity_tokens for i in state.instances if i.tp == 1]
        return min(small) if small else 0

    def _is_long(self, req: RequestInfo, state: ClusterState) -> bool:
        return req.need_tokens > self._threshold(state)

    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        big = max(i.tp for i in state.instances)
        want_big = self._is_long(req, state)
        return [i for i in state.instances if (i.tp == big) == want_big and can_ever_fit(req, i)]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return "long" if self._is_long(req, state) else "short"


# =====================================================================================================
# Registry
# =====================================================================================================
POLICIES = {
    "gyges": GygesPolicy,
    "auto": GygesPolicy,
    "static-dp-rr": StaticDPRoundRobin,
    "static-dp-ll": StaticDPLeastLoad,
    "static-tp": StaticTP,
    "static-hybrid": StaticHybrid,
}


def make_policy(name: str, **kwargs) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(**kwargs)


def validate_transform(t: Transform, state: ClusterState) -> Topology:
    """The topology after t (ValueError if t is not a valid merge/split of state's instances)."""
    topo = Topology(state.num_devices, tuple(Instance.of(i.devices) for i in state.instances), state.max_tp)
    return topo.merge(t.devices) if t.is_merge else topo.split(t.devices, t.tp)
