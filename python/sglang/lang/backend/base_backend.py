"""What the interpreter asks of a backend. `s` is the program's StreamExecutor (its text so far is
`s.text_`, its finished chat turns `s.messages_`)."""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

from sglang.lang.chat_template import ChatTemplate, get_chat_template
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.ir import SglSamplingParams


class BaseBackend:
    support_concate_and_append = False
    is_chat_model = False

    def __init__(self) -> None:
        self.chat_template: ChatTemplate = get_chat_template("default")

    def get_model_name(self) -> str:
        raise NotImplementedError

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def cache_prefix(self, prefix_str: str) -> None:
        """Have the server hold `prefix_str` in its prefix cache (no-op where there is none)."""

    def commit_lazy_operations(self, s) -> None:
        """Send s's text so far (before a fork) so that the forks' requests share its cache."""

    def end_program(self, s) -> None:
        pass

    def generate(self, s, sampling_params: SglSamplingParams) -> Tuple[str, dict]:
        raise NotImplementedError

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[Tuple[str, dict]]:
        raise NotImplementedError

    def select(self, s, choices: List[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        raise NotImplementedError

    def flush_cache(self) -> None:
        pass

    def get_server_info(self) -> Optional[dict]:
        return None

    def shutdown(self) -> None:
        pass
