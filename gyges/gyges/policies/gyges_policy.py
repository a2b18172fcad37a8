"""Gyges: base-TP instances for throughput, merged on demand for the requests that need more memory or
more speed, split back as soon as what they still run fits the parts.

Target TP. Every request gets one (`target_tp`): the smallest aligned group size whose KV capacity holds
prompt + max_new (memory). With a step-time model and a TTFT target, a request whose predicted prefill at
that size misses the target is raised to the smallest size that meets it (or, if none does, the fastest),
provided the speed-up is at least `min_speedup` (on hardware where TP buys no speed, this CPU host, no
merge is ever made for speed) and devices are lightly loaded enough to pay for it (an instance of that
size with no prefill in flight, or a group running at most `max_disturbed_per_device` requests per device:
every request on a merged group is batched with the long prefill). Requests of one target form a class; each class is served FIFO, so a held
long request never delays a short one.

Placement of a request of target T (arrivals, then held requests oldest first):
  1. an instance of TP >= T that fits it now, not reserved (below): base-TP work goes to base-TP instances,
     the least loaded; only when none fits does it spill onto a merged instance, and then only as long as
     that keeps the instance splittable once its long work ends; larger work takes the smallest TP that
     fits, least loaded (an instance already merged is used before another group is merged), except that
     a request merged for speed only joins an instance with no other prefill in flight;
  2. otherwise, for T > base TP, a plan (`plan_for`): merge the aligned group of size T that the request
     fits right after merging (fewest requests disturbed: their decodes would be batched with its prefill;
     then fewest KV tokens held, i.e. least moved; lowest device), or, when no group fits it right away and an instance of TP >= T
     exists or is forming, wait for that instance instead of merging another group. With a step-time model,
     where merging the group costs its devices decode throughput (`merge_loses`): wait for an instance of
     TP >= T whenever one exists; when none does and the request would not fit right after merging, the
     group drains first (takes no new smaller work) and merges once it would; and while smaller requests are
     held, the request makes no plan at all for up to long_defer_s (they go first);
  3. otherwise hold.
A merged instance larger than what it runs needs (`drain_part`: its largest request fits a smaller part that
it is not KV-rich against, no prefill there needs its speed) takes only the work that keeps it splittable
into those parts, and so splits soon (partially: TP4 -> 2 x TP2); one whose long work is all that keeps it
large takes only what would fit those parts once that work ends. When no other instance of a request's size
or larger serves, the fullest of the smallest such instances takes it regardless. Base-TP work goes to the
base instances and the KV-rich merged ones of the smallest such size, larger ones only when those are full.
The members of the merge planned for a held request take no new work of a smaller class (they would delay
it); the instances it waits for take none once it has waited long_defer_s (before that, smaller work goes
first: on 2 CPU devices merged into one TP2, reserving it for every long request that waited for room held
all short work behind it, goodput 7.2 against static TP's 16.4 req/s at 17 req/s offered). One merge starts per tick, for the oldest held request that plans
one.

Merges for capacity. When base-TP requests have waited `capacity_merge_wait_s` for KV memory and merging a
pair of equal instances would multiply their KV capacity by `capacity_merge_gain` (the weight memory each
device no longer needs becomes KV: 11x on a Qwen2.5-32B H20 pair), the fullest such pair merges. Any merged
instance that rich in KV takes base-TP work when no base-TP instance has room, and does not split while
requests wait (a split would give that memory up).

Splits. A merged instance splits to the smallest TP its requests allow (a partial split, e.g. TP4 -> 2 x
TP2, when one of them still needs a larger part; the part without it splits again on a later tick) as
soon as, for split_delay seconds: its requests fit the parts (proved from aggregate reports by
RequestSizeBound: largest M <= part capacity C and held H <= k*C - (k-1)*M), no request still prefilling
there needs the larger TP for speed, no held request needs more than a part (it would be merged
again), and, while requests wait, it is not KV-rich against those parts (a TP4 holding under
capacity_merge_gain x what two TP2s hold splits into them while requests wait; into TP1s it does not).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

from gyges.costmodel import TransformCostModel
from gyges.policies.base import (ClusterState, Decision, Hold, InstanceLoad, LoadLedger, Place, Policy, Reject,
                                 RequestInfo, TickDecision, Transform, can_ever_fit, fits_now, group_capacity,
                                 least_loaded, too_long_message, uniform_groups)
from gyges.policies.affinity import pick_by_affinity
from gyges.policies.base_demand import BaseDemand
from gyges.policies.size_bound import RequestSizeBound
from gyges.topology import aligned_groups, is_power_of_two

# A plan for a held request that no instance takes now: ("merge", group), ("drain", group: merge it once the
# request fits right after) or ("wait", instance bases).
Plan = Tuple[str, Tuple[int, ...]]


class GygesPolicy(Policy):
    """See the module docstring. step_model: anything with step_time(batch_tokens, context_tokens, tp)
    (gyges.costmodel.StepTimeModel); with ttft_target_s it lets requests merge for speed."""

    name = "gyges"

    def __init__(self, split_delay: float = 1.0, cost_model: Optional[TransformCostModel] = None,
                 base_tp: int = 1, step_model=None, ttft_target_s: Optional[float] = None,
                 min_speedup: float = 1.5, chunk_tokens: int = 8192, max_disturbed_per_device: int = 4,
                 capacity_merge_gain: Optional[float] = 1.5, capacity_merge_wait_s: float = 2.0,
                 long_defer_s: float = 60.0, base_reserve_utilization: Optional[float] = 0.6,
                 demand_window_s: float = 60.0):
        if split_delay < 0:
            raise ValueError("split_delay must be >= 0")
        if not is_power_of_two(base_tp):
            raise ValueError(f"base_tp={base_tp} is not a power of two")
        if ttft_target_s is not None and ttft_target_s <= 0:
            raise ValueError("ttft_target_s must be > 0")
        if min_speedup < 1 or chunk_tokens < 1:
            raise ValueError("min_speedup must be >= 1 and chunk_tokens >= 1")
        self.split_delay = split_delay
        self.cost_model = cost_model or TransformCostModel()
        self.base_tp = base_tp
        self.step_model = step_model
        self.ttft_target_s = ttft_target_s
        self.min_speedup = min_speedup
        self.chunk_tokens = chunk_tokens
        self.max_disturbed_per_device = max_disturbed_per_device
        if capacity_merge_gain is not None and capacity_merge_gain <= 1:
            raise ValueError("capacity_merge_gain must be > 1 (or None: no merges for capacity)")
        self.capacity_merge_gain = capacity_merge_gain
        self.capacity_merge_wait_s = capacity_merge_wait_s
        if long_defer_s < 0:
            raise ValueError("long_defer_s must be >= 0")
        self.long_defer_s = long_defer_s
        # base-TP instances kept out of merges for the base class, sized from its demand (needs a step model)
        self._base_demand = (BaseDemand(demand_window_s, base_reserve_utilization)
                             if base_reserve_utilization is not None else None)
        self._reserve_round: Optional[Tuple[ClusterState, int]] = None  # (state, reserve) of this round
        self._base_short = False  # per tick: fewer base instances than the reserve (splits to base TP then
        # ignore KV-richness)
        self._base_drain: Optional[int] = None  # the merged instance drained to base TP for the reserve
        self._committed: Set[str] = set()  # held requests whose merge (or the drain before it) has begun
        self._sizes = RequestSizeBound()
        self._split_ready_since: Dict[Tuple[int, ...], float] = {}
        self._forming: Optional[Tuple[int, ...]] = None  # devices of the merge this policy started last
        self._prefill_s: Dict[Tuple[int, int], float] = {}
        self._capacity_by_tp: Tuple[Tuple[int, int], ...] = ()
        self._plans: Dict[str, Optional[Plan]] = {}  # per decision round
        self._memory_tp: Dict[str, int] = {}  # per decision round: rid -> the TP its memory needs

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        return uniform_groups(num_devices, min(self.base_tp, max_tp))

    # -- sizes ---------------------------------------------------------------------------------------------
    @staticmethod
    def formable_groups(state: ClusterState) -> List[Tuple[int, ...]]:
        return aligned_groups(state.num_devices, state.max_tp)

    def largest_formable(self, state: ClusterState) -> Tuple[int, Tuple[int, ...]]:
        """(capacity, devices) of the largest instance a merge can ever make."""
        groups = self.formable_groups(state)
        top = max(len(g) for g in groups)
        return max((group_capacity(state, g), g) for g in groups if len(g) == top)

    def size_class(self, req: RequestInfo, state: ClusterState) -> int:
        """The smallest group size whose capacity can ever hold req (0: none can)."""
        for g in self.formable_groups(state):  # smallest first
            if len(g) >= self.base_tp and group_capacity(state, g) >= req.need_tokens:
                return len(g)
        return 0

    def prefill_seconds(self, prompt_tokens: int, tp: int) -> float:
        """Predicted time to prefill prompt_tokens alone on an instance of TP tp, chunk by chunk."""
        key = (prompt_tokens, tp)
        if key not in self._prefill_s:
            total, done = 0.0, 0
            while done < prompt_tokens:
                chunk = min(self.chunk_tokens, prompt_tokens - done)
                done += chunk
                total += self.step_model.step_time(chunk, done, tp, requests=1)
            self._prefill_s[key] = total
        return self._prefill_s[key]

    def speed_tp(self, prompt_tokens: int, tp: int, top: int) -> int:
        """The TP (>= tp, <= top) at which a prefill of prompt_tokens should run: tp unless its predicted
        time misses the TTFT target and a larger TP is min_speedup times faster."""
        if self.step_model is None or self.ttft_target_s is None or prompt_tokens <= 0:
            return tp
        here = self.prefill_seconds(prompt_tokens, tp)
        if here <= self.ttft_target_s:
            return tp
        best, best_s = tp, here
        t = tp * 2
        while t <= top:
            s = self.prefill_seconds(prompt_tokens, t)
            if s < best_s:
                best, best_s = t, s
            if s <= self.ttft_target_s:
                best, best_s = t, s
                break
            t *= 2
        return best if best_s * self.min_speedup <= here else tp

    def target_tp(self, req: RequestInfo, state: ClusterState) -> int:
        mem = self.size_class(req, state)
        self._memory_tp[req.rid] = mem
        if mem == 0:
            return 0
        top = max(len(g) for g in self.formable_groups(state))
        fast = self.speed_tp(req.prompt_tokens, mem, top)
        if fast > mem and not self._speed_room(req, fast, state):
            return mem  # merging busy devices would cost their decodes more than the prefill gains
        return fast

    def _speed_room(self, req: RequestInfo, tp: int, state: ClusterState) -> bool:
        """A merge for speed pays only on lightly loaded devices: an instance of TP >= tp with no prefill in
        flight that fits req now, or an aligned group of size tp whose instances together run at most
        max_disturbed_per_device requests per device (each of them would be batched with the prefill)."""
        for i in state.instances:
            if i.tp >= tp and not i.transforming and not i.prefill_tokens_left and fits_now(req, i):
                return True
        for g in self.formable_groups(state):
            if len(g) != tp:
                continue
            members = [i for i in state.instances if set(i.devices) <= set(g)]
            if (len(members) >= 2 and sum(m.tp for m in members) == tp and not any(m.transforming for m in members)
                    and sum(m.num_requests for m in members) <= self.max_disturbed_per_device * tp):
                return True
        return False

    def _part_capacity(self, inst: InstanceLoad, part_tp: int) -> int:
        """KV tokens of one part of TP part_tp after a split: what the runtime reports when it knows (a
        merge turned freed weight memory into KV, which a split gives back), else an even share."""
        known = dict(self._capacity_by_tp)
        if part_tp in known:
            return known[part_tp]
        return inst.kv_capacity_tokens * part_tp // inst.tp

    # -- placement -----------------------------------------------------------------------------------------
    def _fits_parts(self, inst: InstanceLoad, part_tp: int, extra: Optional[RequestInfo] = None) -> bool:
        """inst's requests (plus extra) can be dealt over its parts of TP part_tp."""
        parts = inst.tp // part_tp
        cap = self._part_capacity(inst, part_tp)
        largest = self._sizes.bound(inst)
        held = inst.held_tokens
        if extra is not None:
            largest, held = max(largest, extra.need_tokens), held + extra.need_tokens
        return largest <= cap and held <= parts * cap - (parts - 1) * largest

    def drain_part(self, inst: InstanceLoad, need: float) -> Optional[int]:
        """The TP of the parts a merged instance larger than its work needs drains towards (None: it is
        needed at its size): the smallest part that holds its largest request, that it is not KV-rich
        against (requests of `need` tokens), and at which no prefill there is too slow. A draining instance
        takes only the work that keeps it splittable into those parts, and splits as soon as it is."""
        part = self.base_tp
        while part < inst.tp:
            if (self._sizes.bound(inst) <= self._part_capacity(inst, part)
                    and not self._capacity_rich(inst, need, part)
                    and (inst.prefill_tokens_left is None
                         or self.speed_tp(inst.prefill_tokens_left, part, inst.tp) <= part)):
                return part
            part *= 2
        return None

    def _draining(self, req: RequestInfo, target: int, loads: Sequence[InstanceLoad]
                  ) -> Dict[int, Tuple[int, bool]]:
        """{instance base: (part, long work runs)} of the merged instances that take req only if it keeps them
        splittable into parts of that TP: those larger than their work needs (drain_part), and those whose
        long work is all that keeps them large (once it ends, what they hold besides it must fit the parts
        they are not KV-rich against). Except that when no other instance of req's size or larger serves,
        the fullest of the smallest such ones serves (one that drains to base TP never does: the way back)."""
        out: Dict[int, Tuple[int, bool]] = {}
        for i in loads:
            if i.tp <= max(target, self.base_tp) or i.transforming:
                continue
            part = self.drain_part(i, req.need_tokens)
            if part is not None:
                out[i.base] = (part, False)
                continue
            part = self.base_tp
            while part < i.tp and self._capacity_rich(i, req.need_tokens, part):
                part *= 2
            if part < i.tp:
                out[i.base] = (part, True)
        serves = [i for i in loads if i.tp >= target and not i.transforming and i.base not in out]
        if not serves:
            wide = [i for i in loads if i.base in out and (out[i.base][1] or out[i.base][0] > self.base_tp)]
            if wide:
                keeper = min(wide, key=lambda i: (i.tp, -i.held_tokens, i.base))
                del out[keeper.base]
        return out

    def _keeps_splittable(self, req: RequestInfo, inst: InstanceLoad, part: int, long_work: bool) -> bool:
        if not long_work:
            return self._fits_parts(inst, part, req)
        parts, cap = inst.tp // part, self._part_capacity(inst, part)
        rest = inst.held_tokens - self._sizes.bound(inst) + req.need_tokens  # what stays once the long one ends
        return rest <= parts * cap - (parts - 1) * req.need_tokens

    def _choose(self, req: RequestInfo, target: int, ledger: LoadLedger, reserved: Set[int]
                ) -> Optional[InstanceLoad]:
        cands = [i for i in ledger.loads() if i.base not in reserved and i.tp >= target and fits_now(req, i)
                 and (i.base != self._base_drain or (target <= self.base_tp
                                                       and self._fits_parts(i, self.base_tp, req)))]
        if target > self._memory_tp.get(req.rid, target):
            # merged for speed: one long prefill at a time (a second one would stretch both, and every
            # decode batched with them); the next gets its own group or waits
            cands = [i for i in cands if not i.prefill_tokens_left]
        # an instance larger than its work needs drains to a split: it takes only what keeps it splittable
        draining = self._draining(req, target, ledger.loads())
        cands = [i for i in cands if i.base not in draining or self._keeps_splittable(req, i, *draining[i.base])]
        if target <= self.base_tp:
            rich = [i for i in cands if self._capacity_rich(i, req.need_tokens)]
            base = [i for i in cands if i.tp <= self.base_tp]
            if rich:  # a KV-rich merged instance of the smallest such size is as good a home as a base one
                # (the emptiest by share); larger ones only when none of those has room
                tier = min(i.tp for i in rich)
                return min(base + rich, key=lambda i: (i.tp > tier and i.tp, (i.held_tokens + req.need_tokens)
                                                       / i.kv_capacity_tokens, i.num_requests, i.base))
            if base:  # where its cached prefix lives, unless the load there costs more than recomputing it
                return pick_by_affinity(req, base, self.step_model, self.chunk_tokens)
        if not cands:
            return None
        smallest = min(i.tp for i in cands)
        return least_loaded([i for i in cands if i.tp == smallest])

    # -- plans for requests no instance takes now ----------------------------------------------------------
    def _forming_instance(self, state: ClusterState) -> Optional[Tuple[int, ...]]:
        """Devices of the merge this policy started that is still in flight."""
        if self._forming is None:
            return None
        devs = set(self._forming)
        if any(i.transforming and set(i.devices) <= devs for i in state.instances):
            return self._forming
        self._forming = None
        return None

    def merge_group(self, req: RequestInfo, target: int, state: ClusterState, ledger: LoadLedger
                    ) -> Optional[Tuple[Tuple[int, ...], bool]]:
        """(group, fits right after the merge) of the best aligned group of size target to merge for req;
        None when no such group can start now."""
        best = None
        for g in self.formable_groups(state):
            if len(g) != target or group_capacity(state, g) < req.need_tokens:
                continue
            members = [ledger.load(i.base) for i in state.instances if set(i.devices) <= set(g)]
            if len(members) < 2 or sum(m.tp for m in members) != len(g):
                continue  # already one instance, or cut by a larger one
            if any(m.transforming for m in members) or not self.keeps_base_reserve(g, state):
                continue
            held = sum(m.held_tokens for m in members)
            fits_after = req.need_tokens <= group_capacity(state, g) - held
            key = (not fits_after, sum(m.num_requests for m in members), held, g[0])
            if best is None or key < best[0]:
                best = (key, g, fits_after)
        return (best[1], best[2]) if best else None

    def plan_for(self, req: RequestInfo, target: int, state: ClusterState, ledger: LoadLedger) -> Optional[Plan]:
        if req.rid in self._plans:
            return self._plans[req.rid]
        homes = [i.base for i in state.instances if i.tp >= target and can_ever_fit(req, i)]
        forming = self._forming_instance(state)
        if forming is not None and len(forming) >= target and group_capacity(state, forming) >= req.need_tokens:
            homes.append(forming[0])
        plan: Optional[Plan] = None
        merge = self.merge_group(req, target, state, ledger) if target > self.base_tp else None
        loses = merge is not None and self.merge_loses(state, merge[0], ledger)
        if loses and req.rid not in self._committed and state.now - req.arrival < self.long_defer_s and any(
                self.target_tp(h, state) < target for h in state.held):
            # the merge would cost the devices throughput while smaller requests wait: they go first
            self._plans[req.rid] = None
            return None
        if merge is not None and not merge[1] and not homes and loses:
            plan = ("drain", merge[0])  # its members finish their work at their own (faster) speed first
        elif merge is not None and (merge[1] or not homes) and not (homes and loses):
            plan = ("merge", merge[0])
        elif homes:
            plan = ("wait", tuple(homes))
        self._plans[req.rid] = plan
        if plan is not None and plan[0] != "wait":
            self._committed.add(req.rid)  # its group drains or merges: deferring it now would undo that
        return plan

    def merge_loses(self, state: ClusterState, group: Sequence[int], ledger: LoadLedger) -> bool:
        """With a step-time model: merged, the group's members' requests (at least one each) would decode
        fewer tokens per second than they do apart (the TP cost outweighs the larger batch). Then a request
        waits for an existing instance of its size rather than merge another group, and a group that it does
        not fit right after merging drains (takes no new smaller work) before it merges."""
        if self.step_model is None:
            return False
        members = [ledger.load(i.base) for i in state.instances if set(i.devices) <= set(group)]
        batch = [max(1, m.num_requests) for m in members]
        context = [max(b, m.held_tokens // 2) for b, m in zip(batch, members)]  # half of what they hold attended
        apart = sum(b / self.step_model.step_time(b, c, m.tp) for b, c, m in zip(batch, context, members))
        merged = sum(batch) / self.step_model.step_time(sum(batch), sum(context), len(group))
        return merged < apart

    def _reserved(self, target: int, ahead: Sequence[Tuple[RequestInfo, int]], state: ClusterState,
                  ledger: LoadLedger) -> Set[int]:
        """Instances kept from a request of class target for the held larger requests ahead of it."""
        out: Set[int] = set()
        for h, ht in ahead:
            if ht <= target:
                continue
            plan = self.plan_for(h, ht, state, ledger)
            if plan is None:
                continue
            kind, devs = plan
            if kind == "wait":
                if state.now - h.arrival < self.long_defer_s:
                    continue  # smaller work goes first for up to long_defer_s, as before a merge (plan_for)
                out.update(devs)
            else:
                out.update(i.base for i in state.instances if set(i.devices) <= set(devs))
        return out

    # -- the base reserve ----------------------------------------------------------------------------------
    def _base_capacity(self, state: ClusterState) -> int:
        known = dict(state.capacity_by_tp)
        if self.base_tp in known:
            return known[self.base_tp]
        base = [i.kv_capacity_tokens for i in state.instances if i.tp == self.base_tp]
        if base:
            return min(base)
        return min(i.kv_capacity_tokens * self.base_tp // i.tp for i in state.instances)

    def _record_base_arrival(self, req: RequestInfo, state: ClusterState) -> None:
        if self._base_demand is None or self.step_model is None:
            return
        cap = self._base_capacity(state)
        batch = max(1, cap // max(1, req.need_tokens))
        step = self.step_model.step_time(batch, batch * req.need_tokens // 2, self.base_tp)
        self._base_demand.record(state.now, BaseDemand.occupancy(
            req.need_tokens, cap, self.prefill_seconds(req.prompt_tokens, self.base_tp), step, req.max_new_tokens))

    def _base_instances(self, state: ClusterState) -> int:
        return sum(1 for i in state.instances if i.tp == self.base_tp and not i.transforming)

    def base_reserve(self, state: ClusterState) -> int:
        """Base-TP instances no merge may take (0 without a step model): what the base class's demand
        needs (BaseDemand), at most what leaves room for the largest group a held request needs."""
        if self._base_demand is None or self.step_model is None:
            return 0
        if self._reserve_round is None or self._reserve_round[0] is not state:
            cap = self._base_capacity(state)
            targets = [(h, self.target_tp(h, state)) for h in state.held]
            backlog = sum(h.need_tokens for h, t in targets if t <= self.base_tp) / max(1, cap)
            largest = max((t for _, t in targets if t > self.base_tp), default=0)
            upper = (state.num_devices - largest) // self.base_tp
            self._reserve_round = (state, min(upper, self._base_demand.instances_needed(state.now, backlog)))
        return self._reserve_round[1]

    def _update_base_drain(self, state: ClusterState) -> None:
        """While base-class requests are held and fewer base instances serve than the reserve, drain one
        merged instance to base TP (it takes only base work that keeps it splittable into base parts, and
        splits once its larger work ends): the smallest, holding least; never the only instance that a held
        larger request can run on."""
        base_held = any(self.target_tp(h, state) <= self.base_tp for h in state.held)
        self._base_short = base_held and self._base_instances(state) < self.base_reserve(state)
        if not self._base_short:
            self._base_drain = None
            return
        current = [i for i in state.instances if i.base == self._base_drain and i.tp > self.base_tp]
        if current:
            return
        need = max((self.target_tp(h, state) for h in state.held), default=0)
        merged = [i for i in state.instances if i.tp > self.base_tp and not i.transforming]
        cands = [i for i in merged
                 if i.tp < need or sum(1 for j in merged if j.tp >= need and j.base != i.base) > 0]
        self._base_drain = min(cands, key=lambda i: (i.tp, i.held_tokens, i.base)).base if cands else None

    def keeps_base_reserve(self, group: Sequence[int], state: ClusterState) -> bool:
        """Merging group leaves at least base_reserve base-TP instances outside it (or takes none)."""
        devs = set(group)
        inside = [i for i in state.instances if i.tp == self.base_tp and set(i.devices) <= devs]
        if not inside:
            return True
        outside = sum(1 for i in state.instances
                      if i.tp == self.base_tp and not i.transforming and not set(i.devices) <= devs)
        return outside >= self.base_reserve(state)

    # -- the interface -------------------------------------------------------------------------------------
    def _begin_round(self, state: ClusterState) -> None:
        self._capacity_by_tp = state.capacity_by_tp
        self._plans = {}
        self._memory_tp = {}
        self._reserve_round = None

    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        self._begin_round(state)
        limit, group = self.largest_formable(state)
        if req.need_tokens > limit:
            return Reject(req.rid, too_long_message(
                req, limit, f"the largest instance Gyges can form (TP {len(group)} on devices {list(group)})"))
        target = self.target_tp(req, state)
        if target <= self.base_tp:
            self._record_base_arrival(req, state)
        held = [(h, self.target_tp(h, state)) for h in state.held]
        if any(ht == target for _, ht in held):
            return Hold(req.rid, f"queued behind earlier held requests of its class (TP {target})")
        ledger = LoadLedger(state)
        inst = self._choose(req, target, ledger, self._reserved(target, held, state, ledger))
        if inst is not None:
            self._sizes.on_place(inst, req.need_tokens)
            return Place(req.rid, inst.base)
        if target > self.base_tp:
            return Hold(req.rid, f"needs an instance of TP {target}: waiting for a merge or for room on one")
        return Hold(req.rid, "waiting for KV memory on an instance that can hold it")

    def on_tick(self, state: ClusterState) -> List[TickDecision]:
        self._begin_round(state)
        out: List[TickDecision] = []
        ledger = LoadLedger(state)
        limit, _ = self.largest_formable(state)
        self._update_base_drain(state)
        still_held: List[Tuple[RequestInfo, int]] = []
        blocked: Set[int] = set()
        for h in state.held:
            if h.need_tokens > limit:
                out.append(Reject(h.rid, too_long_message(h, limit, "the largest instance Gyges can form")))
                continue
            target = self.target_tp(h, state)
            inst = None
            if target not in blocked:
                inst = self._choose(h, target, ledger, self._reserved(target, still_held, state, ledger))
            if inst is not None:
                self._sizes.on_place(inst, h.need_tokens)
                out.append(ledger.place(h, inst.base))
            else:
                blocked.add(target)
                still_held.append((h, target))

        if state.transform_in_flight:
            self._split_decision(still_held, state, ledger)  # keeps the readiness timers current
            return out
        self._sizes.forget_missing(state)
        self._committed &= {h.rid for h, _ in still_held}
        transform = self._merge_decision(still_held, state, ledger) or self._capacity_merge(still_held, state, ledger)
        split = self._split_decision(still_held, state, ledger)
        transform = transform or split
        if transform is not None:
            if transform.is_merge:
                self._sizes.on_merge(transform.devices, [ledger.load(i.base) for i in state.instances
                                                         if set(i.devices) <= set(transform.devices)])
                self._forming = transform.devices
            out.append(transform)
        return out

    # -- transformations -----------------------------------------------------------------------------------
    def _merge_decision(self, held: Sequence[Tuple[RequestInfo, int]], state: ClusterState,
                        ledger: LoadLedger) -> Optional[Transform]:
        for h, target in held:
            if target <= self.base_tp:
                continue
            plan = self.plan_for(h, target, state, ledger)
            if plan is not None and plan[0] == "merge":
                return Transform(plan[1], len(plan[1]))
        return None

    def capacity_gain(self, state: ClusterState, group: Sequence[int]) -> float:
        """KV capacity of an instance on group over its members' together (a merge frees the weight
        memory each device no longer needs: on a GPU whose weights take most of it the gain is large)."""
        members = [i for i in state.instances if set(i.devices) <= set(group)]
        have = sum(m.kv_capacity_tokens for m in members)
        return group_capacity(state, group) / have if have else 0.0

    def _capacity_rich(self, inst: InstanceLoad, need: float, part_tp: Optional[int] = None) -> bool:
        """inst holds capacity_merge_gain x the KV of its parts of TP part_tp (default: base TP) together,
        and (with a step model) decodes requests of `need` tokens faster than they would: splitting it into
        them would give that up."""
        part_tp = part_tp or self.base_tp
        if self.capacity_merge_gain is None or inst.tp <= part_tp:
            return False
        parts = inst.tp // part_tp
        part = self._part_capacity(inst, part_tp)
        if inst.kv_capacity_tokens < self.capacity_merge_gain * parts * part:
            return False
        return self._decode_rate(inst.kv_capacity_tokens, inst.tp, need) > parts * self._decode_rate(
            part, part_tp, need)

    def _decode_gain(self, state: ClusterState, group: Sequence[int], members: Sequence[InstanceLoad],
                     need: float) -> bool:
        """With a step-time model: the merged instance, its KV filled with requests of `need` tokens (half
        of them attended on average), decodes more tokens per second than its members do apart."""
        apart = sum(self._decode_rate(m.kv_capacity_tokens, m.tp, need) for m in members)
        return self._decode_rate(group_capacity(state, group), len(group), need) > apart

    def _decode_rate(self, capacity: int, tp: int, need: float) -> float:
        """Tokens/s an instance decodes with its KV full of requests of `need` tokens (half attended on
        average); without a step model, the batch size (memory is all that is known)."""
        batch = max(1, int(capacity // max(1.0, need)))
        if self.step_model is None:
            return float(batch)
        return batch / self.step_model.step_time(batch, int(batch * need / 2), tp)

    def _capacity_merge(self, held: Sequence[Tuple[RequestInfo, int]], state: ClusterState,
                        ledger: LoadLedger) -> Optional[Transform]:
        """Base-TP requests have waited capacity_merge_wait_s for KV memory that no instance has: merge the
        fullest pair of equal instances whose merge multiplies their KV capacity by capacity_merge_gain
        (a larger batch out-serves the TP cost). None when no pair gains that much."""
        waiting = [h for h, t in held if t <= self.base_tp]
        if (self.capacity_merge_gain is None or not waiting
                or state.now - min(h.arrival for h in waiting) < self.capacity_merge_wait_s):
            return None
        best = None
        for g in self.formable_groups(state):
            members = [ledger.load(i.base) for i in state.instances if set(i.devices) <= set(g)]
            if (len(members) != 2 or members[0].tp != members[1].tp or any(m.transforming for m in members)
                    or not self.keeps_base_reserve(g, state)
                    or self.capacity_gain(state, g) < self.capacity_merge_gain
                    or not self._decode_gain(state, g, members, sum(h.need_tokens for h in waiting) / len(waiting))):
                continue
            key = (len(g), -sum(m.held_tokens for m in members), g[0])
            if best is None or key < best[0]:
                best = (key, g)
        return Transform(best[1], len(best[1])) if best else None

    def split_target(self, inst: InstanceLoad, held: Sequence[Tuple[RequestInfo, int]] = ()) -> Optional[int]:
        """The smallest TP inst can split into now (None: it must stay as it is)."""
        part = self.base_tp
        while part < inst.tp:
            wanted = any(t > part for _, t in held)  # a held request needs more than a part
            if part == self.base_tp and inst.base == self._base_drain:
                wanted = False  # drained for the base reserve: base requests wait for it
            if (held and not (part == self.base_tp and self._base_short)
                    and self._capacity_rich(inst, sum(h.need_tokens for h, _ in held) / len(held), part)):
                wanted = True  # splitting into these parts would cost KV capacity while requests wait for memory
            fast_enough = (inst.prefill_tokens_left is None
                           or self.speed_tp(inst.prefill_tokens_left, part, inst.tp) <= part)
            if not wanted and fast_enough and self._fits_parts(inst, part):
                return part
            part *= 2
        return None

    def _split_decision(self, held: Sequence[Tuple[RequestInfo, int]], state: ClusterState,
                        ledger: LoadLedger) -> Optional[Transform]:
        """Track, per merged instance, since when some split is possible; the one ready longest, once
        ready for split_delay seconds, splits to the smallest TP it allows now."""
        ready: List[Tuple[float, Tuple[int, ...], int]] = []
        alive = set()
        for inst in ledger.loads():
            if inst.tp <= self.base_tp or inst.transforming:
                continue
            alive.add(inst.devices)
            part = self.split_target(inst, held)
            if part is None:
                self._split_ready_since.pop(inst.devices, None)
                continue
            since = self._split_ready_since.setdefault(inst.devices, state.now)
            if state.now - since >= self.split_delay:
                ready.append((since, inst.devices, part))
        for devs in list(self._split_ready_since):
            if devs not in alive:
                del self._split_ready_since[devs]
        if not ready:
            return None
        _, devices, part = min(ready)
        return Transform(devices, part)
