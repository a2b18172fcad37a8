"""Discrete-event simulator of one host's instances, driving the same gyges.policy objects as the live
controller (see gyges.sim.simulator; CLI: python -m gyges.sim.simulator --help).

The names below are loaded on first use, so that running the simulator module with -m does not import
it twice."""

__all__ = ["SimConfig", "SimResult", "SimulationError", "Simulator", "compare", "simulate"]


def __getattr__(name):
    if name in __all__:
        from gyges.sim import simulator

        return getattr(simulator, name)
    raise AttributeError(f"module 'gyges.sim' has no attribute {name!r}")
