"""Splitting a generated text into reasoning and answer for models that think between markers (pure logic).

    split_reasoning("<think>a</think>b", "qwen3") -> ("a", "b")

`force_reasoning` formats (DeepSeek-R1) start thinking without an opening marker: text before the closing
marker is reasoning even when the opening one is missing; for the others, a text without the opening marker
is all answer.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

# model_type -> (opening marker, closing marker, output starts inside the reasoning)
REASONING_FORMATS: Dict[str, Tuple[str, str, bool]] = {
    "deepseek-r1": ("<think>", "</think>", True),
    "deepseek-v3": ("<think>", "</think>", False),
    "qwen3": ("<think>", "</think>", False),
    "qwen3-thinking": ("<think>", "</think>", True),
    "glm45": ("<think>", "</think>", False),
    "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7", False),
}


def split_reasoning(text: str, model_type: Optional[str]) -> Tuple[str, str]:
    """(reasoning, answer); both stripped of surrounding whitespace."""
    if model_type not in REASONING_FORMATS:
        raise ValueError(f"unknown reasoning format {model_type!r}; known: {sorted(REASONING_FORMATS)}")
    start, end, forced = REASONING_FORMATS[model_type]
    body = text.lstrip()
    opened = body.startswith(start)
    if opened:
        body = body[len(start):]
    elif not forced:
        return "", text.strip()
    if end not in body:
        return body.strip(), ""  # still thinking when the generation stopped
    reasoning, answer = body.split(end, 1)
    return reasoning.strip(), answer.strip()
