"""`python -m sgl_kernel`: build every extension now (instead of at first use) and print where each one is.

Run once after `pip install -e ./sgl-kernel` (scripts/test.sh does) so that the first server or test does not
spend its start-up compiling; exits non-zero when one does not build.
"""

from __future__ import annotations

import sys
import time

from sgl_kernel._build import EXTENSIONS, load


def main() -> int:
    failed = 0
    for name in EXTENSIONS:
        t = time.perf_counter()
        try:
            module = load(name)
            print(f"{name}: {module.__file__} ({time.perf_counter() - t:.1f} s)")
        except Exception as e:  # report every extension, then fail
            failed += 1
            print(f"{name}: does not build: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
