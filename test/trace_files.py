"""Where the shared request traces live (imported by the trace and simulator tests; not a conftest, so it
resolves the same from every test directory)."""

from pathlib import Path


def find_traces_dir() -> Path:
    """shared/traces next to the repository (../shared/traces), or where this project's machines mount it."""
    for candidate in (Path(__file__).resolve().parents[1].parent / "shared" / "traces", Path("/work/shared/traces")):
        if candidate.is_dir():
            return candidate
    raise AssertionError("trace directory shared/traces is missing (expected at <repo>/../shared/traces or "
                         "/work/shared/traces)")
