"""Sampling parameters of one request: parsing, validation and normalization.

Data flow:

    HTTP JSON "sampling_params" (dict)
      -> SamplingParams.from_dict(d)        unknown keys / wrong types -> ValueError (HTTP 400)
      -> params.verify(vocab_size)          out-of-range values        -> ValueError (HTTP 400)
      -> params.normalize(tokenizer)        stop -> list[str], stop_str_max_len, greedy convention
         (verify and normalize may run in either order; verify turns logit_bias keys into ints)
      -> TokenizedGenerateReqInput.sampling_params (pickled to the Controller and the instance leader)
      -> sglang.srt.sampling.sampler.SamplingState (per request, on the leader)

Field names and defaults are SGLang's, so that SGLang clients (the frontend language, bench_serving, raw
HTTP users) work unchanged. Stop strings are checked by the scheduler / detokenizer with
`find_stop(text, params)` over the decoded tail of the output; `stop_str_max_len` (tokens) says how many
trailing tokens need decoding for that check.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

# Temperatures below this are treated as greedy decoding (SGLang's convention).
GREEDY_EPS = 1e-6

# user-facing field -> accepted python types (bool is checked separately: it is an int subclass)
_NUM = (int, float)
_FIELD_TYPES: Dict[str, tuple] = {
    "max_new_tokens": (int, type(None)),
    "stop": (str, list, tuple, type(None)),
    "stop_token_ids": (list, tuple, type(None)),
    "stop_regex": (str, list, tuple, type(None)),
    "temperature": _NUM,
    "top_p": _NUM,
    "top_k": (int,),
    "min_p": _NUM,
    "frequency_penalty": _NUM,
    "presence_penalty": _NUM,
    "repetition_penalty": _NUM,
    "min_new_tokens": (int,),
    "n": (int,),
    "json_schema": (str, dict, type(None)),
    "regex": (str, type(None)),
    "ebnf": (str, type(None)),
    "structural_tag": (str, type(None)),
    "ignore_eos": (bool,),
    "skip_special_tokens": (bool,),
    "spaces_between_special_tokens": (bool,),
    "no_stop_trim": (bool,),
    "logit_bias": (dict, type(None)),
    "sampling_seed": (int, type(None)),
    "custom_params": (dict, type(None)),
    "stream_interval": (int, type(None)),
}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}


@dataclass
class SamplingParams:
    """SGLang's sampling parameters (same names, same defaults)."""

    max_new_tokens: Optional[int] = 128  # None: up to the context limit; 0: prefill only
    stop: Optional[Union[str, List[str]]] = None  # normalize() turns it into a list
    stop_token_ids: Optional[List[int]] = None
    stop_regex: Optional[Union[str, List[str]]] = None  # normalize() turns it into a list
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    json_schema: Optional[str] = None  # a dict is accepted and json.dumps'ed
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[str] = None  # accepted for client compatibility; not supported (verify)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: Optional[Dict[Union[str, int], float]] = None  # token id (str or int) -> additive bias
    sampling_seed: Optional[int] = None
    custom_params: Optional[Dict[str, Any]] = None
    stream_interval: Optional[int] = None  # accepted for compatibility; the server's flag decides

    # ---- derived by normalize(); not user-settable ----
    is_greedy: bool = field(default=False, init=False)
    stop_str_max_len: int = field(default=0, init=False)  # longest stop string, in tokens
    stop_str_max_chars: int = field(default=0, init=False)  # longest stop string, in characters

    def __post_init__(self):
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def allowed_keys(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "SamplingParams":
        """Build from a JSON object; ValueError on unknown keys or values of the wrong type."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        allowed = cls.allowed_keys()
        unknown = sorted(k for k in d if k not in allowed)
        if unknown:
            raise ValueError(
                f"Unknown sampling parameter(s) {unknown}. Allowed keys: {', '.join(allowed)}"
            )
        kwargs = {}
        for key, value in d.items():
            kwargs[key] = _check_type(key, value)
        if kwargs.get("custom_params"):
            raise ValueError("sampling parameter 'custom_params' is only read by a custom_logit_processor, which "
                             "this server does not support; leave it out, null or {}")
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.allowed_keys()}

    # ------------------------------------------------------------------ validation
    def verify(self, vocab_size: Optional[int] = None) -> None:
        """Raise ValueError saying what is wrong and what is allowed; a no-op for valid parameters."""
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(
                f"top_k must be -1 (disable) or at least 1, got {self.top_k}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 2] (1 disables it), got {self.repetition_penalty}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(
                f"max_new_tokens must be >= 0 (0 means prefill only), got {self.max_new_tokens}"
            )
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be <= max_new_tokens, got min_new_tokens={self.min_new_tokens} "
                f"> max_new_tokens={self.max_new_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        constraints = [k for k in ("regex", "json_schema", "ebnf") if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise ValueError(
                f"Only one of regex, json_schema and ebnf may be set, got {', '.join(constraints)}"
            )
        if self.structural_tag is not None:
            raise ValueError("structural_tag is not supported; use regex, json_schema or ebnf")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except (TypeError, ValueError) as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        for pattern in _as_list(self.stop_regex):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: {e}") from None
        if self.sampling_seed is not None and self.sampling_seed < 0:
            raise ValueError(f"sampling_seed must be >= 0, got {self.sampling_seed}")
        if self.logit_bias:
            self.logit_bias = self._verified_logit_bias(vocab_size)
        if self.stop_token_ids:
            for t in self.stop_token_ids:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise ValueError(f"stop_token_ids must be a list of integers, got {t!r}")
                # ids outside the vocabulary are accepted, as SGLang does: they can never be sampled, so
                # they never stop the request

    def _verified_logit_bias(self, vocab_size: Optional[int]) -> Dict[int, float]:
        bias: Dict[int, float] = {}
        upper = f"{vocab_size})" if vocab_size is not None else "vocab_size)"
        for key, value in self.logit_bias.items():
            try:
                if isinstance(key, bool):
                    raise ValueError
                tok = int(key)
                if isinstance(key, float) or (isinstance(key, str) and str(tok) != key.strip()):
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(
                    f"logit_bias key {key!r} is not a token id; keys must be integer token ids in [0, {upper}"
                ) from None
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise ValueError(f"logit_bias key {tok} is out of range; allowed token ids: [0, {upper}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"logit_bias value for token {tok} must be a number, got {value!r}")
            bias[tok] = float(value)
        return bias

    # ------------------------------------------------------------------ normalization
    def normalize(self, tokenizer=None) -> "SamplingParams":
        """Lists for stop/stop_regex, stop-string lengths, greedy convention. Returns self."""
        self.stop = _as_list(self.stop)
        self.stop_regex = _as_list(self.stop_regex)
        max_tokens, max_chars = 0, 0
        for s in self.stop:
            max_chars = max(max_chars, len(s))
            if tokenizer is not None:
                max_tokens = max(max_tokens, len(tokenizer.encode(s, add_special_tokens=False)))
            else:
                max_tokens = max(max_tokens, len(s))
        self.stop_str_max_len = max_tokens
        self.stop_str_max_chars = max_chars
        if 0.0 <= self.temperature < GREEDY_EPS:  # negative values are left for verify() to reject
            # SGLang: greedy = top_k 1 at temperature 1 (no division by ~0).
            self.is_greedy = True
            self.temperature = 1.0
            self.top_k = 1
        elif self.top_k == 1:
            self.is_greedy = True
        return self

    @property
    def stop_strs(self) -> List[str]:
        """SGLang's internal name for the stop strings (always a list)."""
        return _as_list(self.stop)

    @property
    def grammar_key(self) -> Optional[Tuple[str, str]]:
        """(kind, value) of the structured-output constraint, or None."""
        for kind in ("regex", "json_schema", "ebnf"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        return None


def find_stop(text: str, params: SamplingParams, start: int = 0) -> Optional[Tuple[int, int]]:
    """Earliest stop string / stop regex match in text[start:].

    Returns (match_begin, match_end) as indices into `text`, or None. With `no_stop_trim` the output is
    cut at match_end, otherwise at match_begin. Search from a few characters before the previously
    checked end (len(previous text) - params.stop_str_max_chars) so a stop string spanning two tokens
    is found.
    """
    best: Optional[Tuple[int, int]] = None
    for s in _as_list(params.stop):
        if not s:
            continue
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    for pattern in _as_list(params.stop_regex):
        m = re.compile(pattern).search(text, start)
        if m is not None and (best is None or m.start() < best[0]):
            best = (m.start(), m.end())
    return best


# Output tokens decoded for the stop_regex check (a regex has no length bound; matches must end in this tail).
STOP_REGEX_WINDOW_TOKENS = 256


def stop_check_window(params: SamplingParams) -> int:
    """How many trailing output tokens the stop check decodes after each new token (0: no stop strings or
    regexes, nothing to decode). A stop string spans at most stop_str_max_len tokens, plus one for a token
    that began before it."""
    if _as_list(params.stop_regex):
        return max(STOP_REGEX_WINDOW_TOKENS, params.stop_str_max_len + 1)
    if _as_list(params.stop):
        return params.stop_str_max_len + 1
    return 0


def matched_stop_text(tail: str, params: SamplingParams) -> Optional[str]:
    """The text of the earliest stop string or stop_regex match in the decoded tail, or None. Empty regex
    matches (e.g. "a*" before any "a") do not stop."""
    found = find_stop(tail, params)
    if found is None:
        return None
    begin, end = found
    if begin == end:
        for pattern in _as_list(params.stop_regex):  # look for a non-empty match instead
            for m in re.finditer(pattern, tail):
                if m.end() > m.start():
                    return m.group(0)
        return None
    return tail[begin:end]


def _as_list(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _check_type(key: str, value: Any) -> Any:
    types = _FIELD_TYPES.get(key)
    if types is None:
        return value
    expected = " or ".join(sorted({_type_name(t) for t in types}))
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"sampling parameter {key!r} must be a boolean, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, types):
        # JSON clients sometimes send 1.0 for an integer field: accept integral floats there.
        if int in types and float not in types and isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(
            f"sampling parameter {key!r} must be {expected}, got {type(value).__name__} {value!r}"
        )
    if value is None:
        return None
    if key in ("stop", "stop_regex") and isinstance(value, (list, tuple)):
        if not all(isinstance(s, str) for s in value):
            raise ValueError(f"sampling parameter {key!r} must be a string or a list of strings")
        return list(value)
    if key == "stop_token_ids":
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ValueError("sampling parameter 'stop_token_ids' must be a list of integers")
        return list(value)
    if isinstance(value, int) and float in types:
        return float(value)
    return value


def _type_name(t) -> str:
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object", bool: "a boolean"}.get(t, t.__name__)
