"""Devices, aligned groups and instance shapes (pure data, no torch).

Data flow: the controller holds one `Topology` (a partition of the host's devices into instances). A
transformation is `topology.merge(devices)` or `topology.split(devices, tp)`, which validates the request
and returns the new Topology; `gyges.plans` then turns (old instances, new instances) into byte moves.

Alignment: an instance of TP t occupies devices [b, b+t) with t a power of two and b a multiple of t (the
buddy rule). Every such group gets its communicators once at start-up, so no transformation creates one.

Shard order (which TP rank a device plays): inside an aligned group of size T at base b, device b+x is
TP rank `bitrev(x, log2 T)` (bit reversal). This is the one order that is the same whatever sequence of
merges and splits produced the instance, and it makes every merge and split keep each device's weight
slice and its own KV head slice in place: after a merge a device's new TP rank R satisfies
R // (T/t) == r (its old rank r), i.e. its new shard is a sub-slice of its old one; a split is the reverse.
For TP1 and TP2 the order is the device order; for TP4 it is devices [b, b+2, b+1, b+3] for ranks 0..3.
The runtime must slice heads/weights, and order all-gathered vocab shards, by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Tuple


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def log2_exact(n: int) -> int:
    if not is_power_of_two(n):
        raise ValueError(f"{n} is not a power of two")
    return n.bit_length() - 1


def bitrev(x: int, bits: int) -> int:
    """Reverse the lowest `bits` bits of x (x < 2**bits)."""
    out = 0
    for _ in range(bits):
        out = (out << 1) | (x & 1)
        x >>= 1
    return out


def is_aligned(devices: Sequence[int]) -> bool:
    """True when devices are exactly [b, b+n) with n a power of two and b % n == 0."""
    devs = sorted(devices)
    n = len(devs)
    if n == 0 or not is_power_of_two(n) or len(set(devs)) != n:
        return False
    b = devs[0]
    return b % n == 0 and devs == list(range(b, b + n))


def alignment_error(devices: Sequence[int]) -> str:
    """Why `devices` is not an aligned group ('' when it is)."""
    devs = sorted(devices)
    n = len(devs)
    if n == 0:
        return "no devices given"
    if len(set(devs)) != n:
        return f"devices {list(devices)} contain duplicates"
    if not is_power_of_two(n):
        return f"group size {n} is not a power of two (1, 2, 4, 8)"
    if devs != list(range(devs[0], devs[0] + n)):
        return f"devices {devs} are not contiguous"
    if devs[0] % n:
        return f"devices {devs} start at {devs[0]}, not a multiple of the group size {n}"
    return ""


def aligned_groups(num_devices: int, max_size: int) -> List[Tuple[int, ...]]:
    """Every aligned group of size 1, 2, 4, ... <= max_size inside devices 0..num_devices-1, smallest
    first (the communicators the runtime creates at start-up are those of size >= 2)."""
    out: List[Tuple[int, ...]] = []
    size = 1
    while size <= max_size and size <= num_devices:
        for base in range(0, num_devices - size + 1, size):
            out.append(tuple(range(base, base + size)))
        size *= 2
    return out


@dataclass(frozen=True)
class Instance:
    """One TP group: `devices` (sorted, aligned) and its TP degree (== len(devices))."""

    devices: Tuple[int, ...]
    tp: int

    def __post_init__(self):
        devs = tuple(sorted(self.devices))
        object.__setattr__(self, "devices", devs)
        if self.tp != len(devs):
            raise ValueError(f"instance tp={self.tp} does not match its {len(devs)} devices {list(devs)}")
        err = alignment_error(devs)
        if err:
            raise ValueError(f"instance devices not aligned: {err}")

    @classmethod
    def of(cls, devices: Iterable[int]) -> "Instance":
        devs = tuple(sorted(devices))
        return cls(devs, len(devs))

    @property
    def base(self) -> int:
        return self.devices[0]

    @property
    def leader(self) -> int:
        """The device that runs the instance's scheduler (lowest id)."""
        return self.devices[0]

    @property
    def shard_order(self) -> Tuple[int, ...]:
        """Devices in TP-rank order: shard_order[rank] is the device of that rank."""
        bits = log2_exact(self.tp)
        return tuple(self.base + bitrev(r, bits) for r in range(self.tp))

    def shard_rank(self, device: int) -> int:
        """The TP rank (head / weight shard index) that `device` plays in this instance."""
        if device not in self.devices:
            raise ValueError(f"device {device} is not in instance {list(self.devices)}")
        return bitrev(device - self.base, log2_exact(self.tp))

    def device_of_rank(self, rank: int) -> int:
        if not 0 <= rank < self.tp:
            raise ValueError(f"rank {rank} out of range for tp={self.tp}")
        return self.base + bitrev(rank, log2_exact(self.tp))

    def contains(self, other: "Instance") -> bool:
        return set(other.devices) <= set(self.devices)


@dataclass(frozen=True)
class Topology:
    """A partition of devices 0..num_devices-1 into aligned instances, sorted by base device."""

    num_devices: int
    instances: Tuple[Instance, ...]
    max_tp: int = 8

    def __post_init__(self):
        insts = tuple(sorted(self.instances, key=lambda i: i.base))
        object.__setattr__(self, "instances", insts)
        if not is_power_of_two(self.max_tp):
            raise ValueError(f"max_tp={self.max_tp} is not a power of two")
        seen: Dict[int, Instance] = {}
        for inst in insts:
            if inst.tp > self.max_tp:
                raise ValueError(f"instance {list(inst.devices)} has tp={inst.tp} above max_tp={self.max_tp}")
            for d in inst.devices:
                if not 0 <= d < self.num_devices:
                    raise ValueError(f"device {d} out of range [0, {self.num_devices})")
                if d in seen:
                    raise ValueError(f"device {d} is in two instances")
                seen[d] = inst
        missing = sorted(set(range(self.num_devices)) - set(seen))
        if missing:
            raise ValueError(f"devices {missing} belong to no instance")

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, num_devices: int, tp: int = 1, max_tp: int = 8) -> "Topology":
        """num_devices // tp instances of TP tp (SGLang's --tp-size tp --dp-size num_devices//tp)."""
        if tp < 1 or num_devices % tp:
            raise ValueError(f"{num_devices} devices cannot be split into instances of tp={tp}")
        insts = tuple(Instance.of(range(b, b + tp)) for b in range(0, num_devices, tp))
        return cls(num_devices, insts, max(max_tp, tp))

    # -- queries ---------------------------------------------------------------------------------------
    def instance_of(self, device: int) -> Instance:
        for inst in self.instances:
            if device in inst.devices:
                return inst
        raise ValueError(f"device {device} out of range [0, {self.num_devices})")

    def instances_within(self, devices: Iterable[int]) -> List[Instance]:
        devs = set(devices)
        return [i for i in self.instances if set(i.devices) <= devs]

    def shapes(self) -> List[int]:
        return [i.tp for i in self.instances]

    # -- transformations -------------------------------------------------------------------------------
    def merge(self, devices: Iterable[int]) -> "Topology":
        """Merge the instances covering `devices` into one instance of TP len(devices). The devices must be
        an aligned group, a union of at least two existing instances, within max_tp."""
        devs = tuple(sorted(set(devices)))
        err = alignment_error(devs)
        if err:
            raise ValueError(f"cannot merge {list(devs)}: {err}")
        for d in devs:
            if not 0 <= d < self.num_devices:
                raise ValueError(f"cannot merge {list(devs)}: device {d} out of range [0, {self.num_devices})")
        if len(devs) > self.max_tp:
            raise ValueError(f"cannot merge {list(devs)}: tp {len(devs)} above max_tp={self.max_tp}")
        parts = self.merge_sources(devs)
        merged = Instance.of(devs)
        rest = [i for i in self.instances if i not in parts]
        return Topology(self.num_devices, tuple(rest) + (merged,), self.max_tp)

    def merge_sources(self, devices: Sequence[int]) -> List[Instance]:
        """The instances a merge of `devices` combines (ValueError if they do not tile it exactly)."""
        devs = set(devices)
        parts = []
        for inst in self.instances:
            inside = devs & set(inst.devices)
            if inside and inside != set(inst.devices):
                raise ValueError(
                    f"cannot merge {sorted(devs)}: it cuts instance {list(inst.devices)} (not a union of instances)")
            if inside:
                parts.append(inst)
        if len(parts) < 2:
            raise ValueError(f"cannot merge {sorted(devs)}: it is already one instance")
        return parts

    def split(self, devices: Iterable[int], tp: int) -> "Topology":
        """Split the instance on exactly `devices` into instances of TP tp (aligned sub-groups)."""
        devs = tuple(sorted(set(devices)))
        try:
            inst = self.instance_of(devs[0]) if devs else None
        except ValueError as e:
            raise ValueError(f"cannot split {list(devs)}: {e}") from None
        if inst is None or inst.devices != devs:
            raise ValueError(f"cannot split {list(devs)}: not exactly one existing instance")
        if not is_power_of_two(tp):
            raise ValueError(f"cannot split {list(devs)} to tp={tp}: tp must be a power of two")
        if tp >= inst.tp:
            raise ValueError(f"cannot split {list(devs)} to tp={tp}: the instance already has tp={inst.tp}")
        parts = tuple(Instance.of(range(b, b + tp)) for b in range(inst.base, inst.base + inst.tp, tp))
        rest = [i for i in self.instances if i != inst]
        return Topology(self.num_devices, tuple(rest) + parts, self.max_tp)

    def describe(self) -> List[dict]:
        return [{"devices": list(i.devices), "tp": i.tp, "shard_order": list(i.shard_order)}
                for i in self.instances]
