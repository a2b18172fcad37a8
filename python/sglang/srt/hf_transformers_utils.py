"""`get_tokenizer`, as SGLang programs import it (transformers' AutoTokenizer with SGLang's arguments)."""

from __future__ import annotations

from typing import Optional


def get_tokenizer(tokenizer_name: str, *args, tokenizer_mode: str = "auto", trust_remote_code: bool = False,
                  tokenizer_revision: Optional[str] = None, **kwargs):
    from transformers import AutoTokenizer

    if tokenizer_mode == "slow":
        kwargs["use_fast"] = False
    return AutoTokenizer.from_pretrained(tokenizer_name, *args, trust_remote_code=trust_remote_code,
                                         revision=tokenizer_revision, **kwargs)
