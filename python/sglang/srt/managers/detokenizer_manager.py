"""Detokenizer process: token ids from every instance leader -> cumulative text for the TokenizerManager.

    Scheduler --BatchTokenIDOut (new ids per request)--> DetokenizerManager --BatchStrOut--> TokenizerManager

Decoding is incremental: only the tokens after a stable prefix are decoded again each time, and text
ending in an incomplete UTF-8 sequence ("\\ufffd") is held back until the next token completes it. On
finish, a matched stop string and everything after it is cut (unless no_stop_trim).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List

import zmq

from sglang.srt.managers.io_struct import BatchStrOut, BatchTokenIDOut, ReqOutputDelta, ReqStrOut
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, configure_logger, die_with_parent, get_zmq_socket

logger = logging.getLogger(__name__)


@dataclass
class DecodeState:
    """Incremental decoding state of one request."""

    ids: List[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] were decoded into the end of `text`
    read_offset: int = 0


class IncrementalDetokenizer:
    """Turns growing token-id lists into growing text, one request at a time (pure, testable)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: Dict[str, DecodeState] = {}

    def _decode(self, ids: List[int], delta: ReqOutputDelta) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=delta.skip_special_tokens,
            spaces_between_special_tokens=delta.spaces_between_special_tokens,
        )

    def update(self, delta: ReqOutputDelta) -> ReqStrOut:
        st = self.states.setdefault(delta.rid, DecodeState())
        st.ids.extend(delta.new_output_ids)
        if self.tokenizer is None:
            text = ""
        elif delta.finish_reason is not None:
            text = self._decode(st.ids, delta)
            if delta.trim_stop_str:
                cut = text.find(delta.trim_stop_str)
                if cut >= 0:
                    text = text[:cut]
        else:
            if len(st.ids) > st.read_offset:
                prefix = self._decode(st.ids[st.prefix_offset:st.read_offset], delta)
                full = self._decode(st.ids[st.prefix_offset:], delta)
                if len(full) > len(prefix) and not full.endswith("\ufffd"):
                    st.text += full[len(prefix):]
                    st.prefix_offset = st.read_offset
                    st.read_offset = len(st.ids)
            text = st.text
        out = ReqStrOut(rid=delta.rid, text=text, output_ids=list(st.ids), delta=delta)
        if delta.finish_reason is not None:
            del self.states[delta.rid]
        return out


def run_detokenizer_process(server_args: ServerArgs, port_args: PortArgs, pipe_writer) -> None:
    die_with_parent()
    configure_logger(server_args.log_level, " detokenizer")
    try:
        tokenizer = None
        if not server_args.skip_tokenizer_init:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(server_args.tokenizer_path)
        detok = IncrementalDetokenizer(tokenizer)
        ctx = zmq.Context(2)
        recv = get_zmq_socket(ctx, zmq.PULL, port_args.detokenizer_input, bind=True)
        send = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_input, bind=False)
        pipe_writer.send("ready")
    except Exception as e:
        logger.exception("detokenizer failed to start")
        pipe_writer.send(f"detokenizer failed: {e}")
        raise
    while True:
        batch: BatchTokenIDOut = recv.recv_pyobj()
        send.send_pyobj(BatchStrOut([detok.update(d) for d in batch.outputs]))
