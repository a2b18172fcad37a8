"""One server for every module under test/lang: this package's own `sgl.Runtime` (which starts
`python -m sglang.launch_server` in a subprocess) on the random demo checkpoint; stopped with
`shutdown()` at the end, which must leave no process behind."""

import psutil
import pytest

import sglang as sgl


@pytest.fixture(scope="package")
def runtime(test_model):
    rt = sgl.Runtime(model_path=test_model("llama"), device="cpu", log_level="warning")
    children = psutil.Process(rt.pid).children(recursive=True)
    yield rt
    rt.shutdown()
    gone, alive = psutil.wait_procs(children, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, f"processes outlived Runtime.shutdown(): {[p.pid for p in alive]}"
    assert rt.proc is None


@pytest.fixture(scope="package")
def backend(runtime):
    return runtime.endpoint
