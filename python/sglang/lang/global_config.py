"""Process-wide settings of the frontend language (one instance, `global_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class GlobalConfig:
    default_backend: Optional[Any] = None  # set by sgl.set_default_backend
    # run_batch of more than one program first sends the program's constant prefix (found by tracing) once,
    # so that every program's request hits the radix cache instead of prefilling it concurrently.
    enable_precache_with_tracing: bool = True
    precache_min_chars: int = 64  # shorter prefixes are not worth a request
    skip_special_tokens_in_output: bool = True
    spaces_between_special_tokens_in_out: bool = True
    verbosity: int = 0  # >= 2: print each program's text when it ends


global_config = GlobalConfig()
