"""Engine-agnostic Gyges logic (no dependency on sglang or torch): topology, plans, cost model, policy."""

__version__ = "0.1.0"
