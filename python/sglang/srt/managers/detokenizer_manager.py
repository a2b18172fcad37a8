"""Detokenizer process: token ids from every instance leader -> text deltas for the TokenizerManager.

    Scheduler --BatchTokenIDOut (new ids per request)--> DetokenizerManager --BatchStrOut--> TokenizerManager

Decoding is incremental: only the tokens after a stable prefix are decoded again each time, and text
ending in an incomplete UTF-8 sequence ("\\ufffd") is held back until the next token completes it. On
finish, a matched stop string and everything after it is cut (unless no_stop_trim).

Each ReqStrOut carries only what is new: the output ids and the text added since the request's previous
ReqStrOut (the TokenizerManager reassembles the cumulative text and ids SGLang's API returns), so a stream
of L tokens costs O(L) ids and characters on the wire, not O(L^2). The final text (the whole output decoded
once, a stop string cut) can differ from the streamed text at its end: the final delta then says from which
character on it replaces it (ReqStrOut.text_offset).

A request whose decoding raises fails alone: it gets a finish_reason {"type": "abort", "status_code": 500,
"message": ...} (the TokenizerManager answers it with a 500 and aborts it in the scheduler), its later
deltas are dropped until its final one, and every other request of the batch is served as usual.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Set

import zmq

from sglang.srt.managers.io_struct import BatchStrOut, BatchTokenIDOut, ReqOutputDelta, ReqStrOut
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, configure_logger, die_with_parent, get_zmq_socket

logger = logging.getLogger(__name__)


@dataclass
class DecodeState:
    """Incremental decoding state of one request."""

    ids: List[int] = field(default_factory=list)
    text: str = ""  # decoded so far; all of it has been sent
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] were decoded into the end of `text`
    read_offset: int = 0


class IncrementalDetokenizer:
    """Turns growing token-id lists into growing text, one request at a time (pure, testable)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: Dict[str, DecodeState] = {}
        self.failed: Set[str] = set()  # requests failed here that the scheduler has not finished yet

    def _decode(self, ids: List[int], delta: ReqOutputDelta) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=delta.skip_special_tokens,
            spaces_between_special_tokens=delta.spaces_between_special_tokens,
        )

    def update(self, delta: ReqOutputDelta) -> ReqStrOut:
        st = self.states.setdefault(delta.rid, DecodeState())
        st.ids.extend(delta.new_output_ids)
        sent = len(st.text)
        offset = -1
        if self.tokenizer is None:
            new_text = ""
        elif delta.finish_reason is not None:
            text = self._decode(st.ids, delta)
            if delta.trim_stop_str:
                cut = text.find(delta.trim_stop_str)
                if cut >= 0:
                    text = text[:cut]
            if text.startswith(st.text):
                new_text = text[sent:]
            else:  # the final text differs from the streamed one at its end: replace from where they differ
                offset = len(os.path.commonprefix([st.text, text]))
                new_text = text[offset:]
        else:
            if len(st.ids) > st.read_offset:
                prefix = self._decode(st.ids[st.prefix_offset:st.read_offset], delta)
                full = self._decode(st.ids[st.prefix_offset:], delta)
                if len(full) > len(prefix) and not full.endswith("\ufffd"):
                    st.text += full[len(prefix):]
                    st.prefix_offset = st.read_offset
                    st.read_offset = len(st.ids)
            new_text = st.text[sent:]
        out = ReqStrOut(rid=delta.rid, text_delta=new_text, output_ids=list(delta.new_output_ids), delta=delta,
                        text_offset=offset)
        if delta.finish_reason is not None:
            del self.states[delta.rid]
        return out

    def update_batch(self, deltas: List[ReqOutputDelta]) -> List[ReqStrOut]:
        """update() for each delta; a delta whose decoding raises fails its request only."""
        outs = []
        for delta in deltas:
            if delta.rid in self.failed:
                if delta.finish_reason is not None:  # the scheduler's last word on it: let the TM forget it
                    self.failed.discard(delta.rid)
                    outs.append(ReqStrOut(rid=delta.rid, text_delta="", output_ids=[], delta=delta))
                continue
            try:
                outs.append(self.update(delta))
            except Exception as e:  # noqa: BLE001 - one request's bad output must not stop the others
                logger.exception("decoding the output of request %s failed; failing that request", delta.rid)
                self.states.pop(delta.rid, None)
                if delta.finish_reason is None:
                    self.failed.add(delta.rid)
                failed = dataclasses.replace(delta, new_output_ids=[], finish_reason={
                    "type": "abort", "status_code": 500,
                    "message": f"decoding the output failed: {type(e).__name__}: {e}"})
                outs.append(ReqStrOut(rid=delta.rid, text_delta="", output_ids=[], delta=failed,
                                      failed_in_detokenizer=delta.finish_reason is None))
        return outs


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
        send.send_pyobj(BatchStrOut(detok.update_batch(batch.outputs)))
