"""`python -m sglang.launch_server --model-path DIR [...]`: parse every flag (ServerArgs), serve HTTP.

Data flow: argv -> prepare_server_args() -> ServerArgs.check() -> http_server.launch_server(), which starts
the controller, the workers and the detokenizer, serves until SIGINT/SIGTERM and stops them all.
Exit status: 0 after a normal shutdown (SIGINT / SIGTERM), 2 for invalid flags, 1 when start-up failed or
when the server stopped because nothing could serve any more (no instance left, controller or detokenizer
dead).
"""

from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=server_args.log_level.upper(),
                        format="[%(asctime)s %(processName)s] %(levelname)s %(name)s: %(message)s")
    try:
        server_args.check()
        from sglang.srt.managers.tokenizer_manager import RequestLimits

        RequestLimits.from_server_args(server_args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from sglang.srt.entrypoints.http_server import launch_server

    try:
        launch_server(server_args)
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # noqa: BLE001 - one clear line, the traceback at debug level
        logging.getLogger("sglang.launch_server").debug("start-up failed", exc_info=True)
        print(f"error: the server failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
