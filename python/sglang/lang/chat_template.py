"""Chat templates of the frontend language: the text that `sgl.user(...)`, `sgl.assistant(...)` etc. put around
a turn.

A ChatTemplate answers, for a role and the messages so far, the text before the turn's content (`prefix`) and
after it (`suffix`). `JinjaChatTemplate` derives both from the served model's own Jinja chat template (the
one its tokenizer, or the server's --chat-template, uses for /v1/chat/completions), so that a program's
prompt is the same text a chat request would produce:

    render(history + [{"role": r, "content": MARK}])  =  render(history) + prefix + MARK + suffix

`bos_token` renders as "" because the server's tokenizer adds BOS itself when it encodes the prompt.
`FixedChatTemplate` holds literal prefixes / suffixes (for OpenAI-style backends whose text form does not
reach a model, and for `chat_template_name=` on servers that do not expose their template).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

_MARK = "\x00SGL-CONTENT\x00"


class ChatTemplate:
    """Subclasses are dataclasses with: name, default_system_prompt (inserted before the first non-system
    turn), stop_str (added to every gen's stop strings), image_token."""

    def get_prefix_and_suffix(self, role: str, history: List[dict]) -> Tuple[str, str]:
        raise NotImplementedError


@dataclass
class FixedChatTemplate(ChatTemplate):
    name: str
    role_prefix_and_suffix: Dict[str, Tuple[str, str]]
    default_system_prompt: Optional[str] = None
    stop_str: Tuple[str, ...] = ()
    image_token: str = ""

    def get_prefix_and_suffix(self, role: str, history: List[dict]) -> Tuple[str, str]:
        if role not in self.role_prefix_and_suffix:
            raise ValueError(f"chat template {self.name!r} has no role {role!r}")
        return self.role_prefix_and_suffix[role]


@dataclass
class JinjaChatTemplate(ChatTemplate):
    source: str  # the Jinja text
    eos_token: str = ""
    name: str = "model"
    default_system_prompt: Optional[str] = None
    stop_str: Tuple[str, ...] = ()
    image_token: str = ""
    _compiled: object = field(default=None, repr=False, compare=False)

    def _render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        if self._compiled is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.source)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token="", eos_token=self.eos_token)

    def get_prefix_and_suffix(self, role: str, history: List[dict]) -> Tuple[str, str]:
        history = [{"role": m["role"], "content": _as_text(m["content"])} for m in history]
        before = self._render(history) if history else ""
        full = self._render(history + [{"role": role, "content": _MARK}])
        at = full.find(_MARK)
        if at < 0:
            raise ValueError(f"the chat template does not render the content of a {role!r} message")
        head, tail = full[:at], full[at + len(_MARK):]
        prefix = head[len(before):] if head.startswith(before) else head
        return prefix, tail


def _as_text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


# Named templates (chat_template_name=...), for servers that do not report their template.
_NAMED: Dict[str, ChatTemplate] = {
    "default": FixedChatTemplate("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                                             "assistant": ("ASSISTANT:", "\n")}),
    "chatml": FixedChatTemplate("chatml", {r: (f"<|im_start|>{r}\n", "<|im_end|>\n")
                                           for r in ("system", "user", "assistant")}, stop_str=("<|im_end|>",)),
    "llama-3-instruct": FixedChatTemplate(
        "llama-3-instruct", {r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>")
                             for r in ("system", "user", "assistant")}, stop_str=("<|eot_id|>",)),
}


def get_chat_template(name: str) -> ChatTemplate:
    if name not in _NAMED:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(_NAMED)}")
    return _NAMED[name]


def read_local_chat_template(model_path: Optional[str]) -> Optional[Tuple[str, str]]:
    """(template, eos_token) from a local HF directory's chat_template.jinja / tokenizer_config.json."""
    if not model_path or not os.path.isdir(model_path):
        return None
    cfg = {}
    cfg_path = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    eos = cfg.get("eos_token") or ""
    eos = eos.get("content", "") if isinstance(eos, dict) else eos
    jinja_path = os.path.join(model_path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read(), eos
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # named variants: take the default one
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    return (tmpl, eos) if isinstance(tmpl, str) and tmpl else None


def chat_template_for_server(model_info: dict) -> ChatTemplate:
    """The served model's template: the one /get_model_info reports, else the checkpoint's (when the model
    path is a local directory), else the plain "default" one."""
    source = model_info.get("chat_template")
    eos = model_info.get("eos_token") or ""
    if not source:
        local = read_local_chat_template(model_info.get("tokenizer_path") or model_info.get("model_path"))
        if local:
            source, eos = local
    if source:
        return JinjaChatTemplate(source=source, eos_token=eos)
    return get_chat_template("default")
