"""Scheduling policies: where each request goes, and when instances merge or split (DESIGN §6).

One policy per module, all behind the interface in `gyges.policies.base` (ClusterState in; Place / Hold /
Reject / Transform out), so the live controller and gyges.sim drive every policy the same way:

    gyges_policy   GygesPolicy: base-TP instances, merged on demand, split back as soon as possible
    gyges_naive    GygesRoundRobin, GygesLeastLoaded: the same mechanism, placement blind to it (ablations)
    static_dp      StaticDPLeastLoad, StaticDPRoundRobin (and StaticPolicy, the static machinery)
    static_tp      StaticTP: one instance over all devices
    static_hybrid  StaticHybrid: TP1 instances plus one large instance, requests split by length

`make_policy(name, **kwargs)` builds one by name (the names of --gyges-policy and the simulator).
"""

from gyges.policies.base import (ClusterState, Decision, Hold, InstanceLoad, LoadLedger, Place, Policy, Reject,
                                 RequestInfo, TickDecision, Transform, can_ever_fit, fits_now, group_capacity,
                                 least_loaded, too_long_message, uniform_groups, validate_transform)
from gyges.policies.gyges_naive import GygesLeastLoaded, GygesRoundRobin
from gyges.policies.gyges_policy import GygesPolicy
from gyges.policies.size_bound import RequestSizeBound
from gyges.policies.static_dp import StaticDPLeastLoad, StaticDPRoundRobin, StaticPolicy
from gyges.policies.static_hybrid import StaticHybrid, StaticShape
from gyges.policies.static_tp import StaticTP

POLICIES = {
    "gyges": GygesPolicy,
    "auto": GygesPolicy,
    "gyges-rr": GygesRoundRobin,
    "gyges-ll": GygesLeastLoaded,
    "static-dp-rr": StaticDPRoundRobin,
    "static-dp-ll": StaticDPLeastLoad,
    "static-tp": StaticTP,
    "static-hybrid": StaticHybrid,
    "static-shape": StaticShape,
}


def make_policy(name: str, **kwargs) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(**kwargs)


__all__ = [
    "ClusterState", "Decision", "GygesLeastLoaded", "GygesPolicy", "GygesRoundRobin", "Hold", "InstanceLoad", "LoadLedger", "POLICIES", "Place", "Policy",
    "Reject", "RequestInfo", "RequestSizeBound", "StaticDPLeastLoad", "StaticDPRoundRobin", "StaticHybrid", "StaticShape",
    "StaticPolicy", "StaticTP", "TickDecision", "Transform", "can_ever_fit", "fits_now", "group_capacity",
    "least_loaded", "make_policy", "too_long_message", "uniform_groups", "validate_transform",
]
