"""Host-side cost of one serving step outside the model: sampler, penalties, scheduler step, stream bytes.

bench_one_batch.py times the model's forward; this times what runs around it on an instance leader and
on the way out, with a fake model (a fixed random logits tensor) so nothing but host code is measured:

    sampler     Sampler.sample on [B, V] logits: greedy, seeded (temperature 0.8, top_p 0.95), greedy with
                logprobs (top 5) -> ms per call (every time below: the fastest of the repeats / steps)
    penalties   B rows with frequency + presence + repetition penalties, decoded step by step up to L output
                tokens (prompt --prompt-len); ms per sample() call over the last 32 steps
    scheduler   Scheduler.step() + report_load() with B decoding requests (prompt --prompt-len, page 16):
                ms per step, the part of it spent building the ForwardBatch, InstanceReports sent per step
    stream      one request streamed token by token through the IncrementalDetokenizer: pickled bytes of the
                detokenizer -> TokenizerManager messages for L output tokens (demo tokenizer)

    python benchmark/bench_hot_path.py                   # V=32000, B=1,16,64
    python benchmark/bench_hot_path.py --sections sampler --vocab 151936
"""

from __future__ import annotations

import argparse
import inspect
import pickle
import tempfile
import time
from types import SimpleNamespace

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--penalty-lens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--stream-lens", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sections", nargs="+", default=["sampler", "penalties", "scheduler", "stream"])
    return p.parse_args(argv)


def best_ms(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after a warm-up, in ms (the machine is shared: the minimum is the
    estimate least moved by other jobs)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def _sample_kwargs(sampler, wants_logprob):
    """return_logprob when this version of the sampler takes it (the fast path), else nothing."""
    if "return_logprob" in inspect.signature(sampler.sample).parameters:
        return {"return_logprob": wants_logprob}
    return {}


def bench_sampler(args):
    from sglang.srt.sampling.sampler import Sampler, SamplingState
    from sglang.srt.sampling.sampling_params import SamplingParams

    rows = []
    sampler = Sampler(args.vocab, eos_token_ids=[0])
    modes = {
        "greedy": (dict(temperature=0.0), 0, False),
        "seeded T0.8 top_p0.95": (dict(temperature=0.8, top_p=0.95, sampling_seed=1), 0, False),
        "greedy + logprobs(top5)": (dict(temperature=0.0), 5, True),
    }
    for bs in args.batch_sizes:
        logits = torch.randn(bs, args.vocab, generator=torch.Generator().manual_seed(bs))
        for name, (kw, top, lp) in modes.items():
            states = [SamplingState.create(SamplingParams(max_new_tokens=16, **kw)) for _ in range(bs)]
            outs = [[] for _ in range(bs)]
            extra = _sample_kwargs(sampler, [lp] * bs)
            ms = best_ms(lambda: sampler.sample(logits, states, outs, top_logprobs_nums=[top] * bs, **extra),
                           args.repeats)
            rows.append((f"sampler {name}", f"B={bs}", f"{ms:.3f} ms"))
    return rows


def bench_penalties(args):
    from sglang.srt.sampling.sampler import Sampler, SamplingState
    from sglang.srt.sampling.sampling_params import SamplingParams

    rows = []
    bs = 16
    sampler = Sampler(args.vocab, eos_token_ids=[0])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(bs, args.vocab, generator=gen)
    for length in args.penalty_lens:
        prompts = [torch.randint(1, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(bs)]
        params = SamplingParams(max_new_tokens=length, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3,
                                repetition_penalty=1.2)
        states = [SamplingState.create(params, prompts[i]) for i in range(bs)]
        outs = [[] for _ in range(bs)]
        extra = _sample_kwargs(sampler, [False] * bs)
        times = []
        for step in range(length):
            t = time.perf_counter()
            out = sampler.sample(logits, states, outs, **extra)
            times.append(time.perf_counter() - t)
            for i, tok in enumerate(out.next_token_ids):
                outs[i].append(tok)
        rows.append(("sample() with 3 penalties", f"B={bs} L={length}", f"{1e3 * min(times[-32:]):.3f} ms"))
    return rows


class _FakeRunner:
    def __init__(self, vocab, num_pages):
        self.model_config = SimpleNamespace(vocab_size=vocab, eos_token_ids=[0], context_len=1 << 20)
        self.num_pages = num_pages
        self.reserved_pages = 0
        self.logits = torch.randn(256, vocab, generator=torch.Generator().manual_seed(0))  # [256, vocab]

    def forward(self, fb):
        n = len(fb.logits_indices)
        return self.logits[:n] if n <= 256 else torch.randn(n, self.logits.shape[1])


class _Outbox:
    def __init__(self):
        self.count = 0

    def send_pyobj(self, msg):
        self.count += 1
        pickle.dumps(msg)


def bench_scheduler(args):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import ServerArgs

    rows = []
    for bs in args.batch_sizes:
        steps = 64
        pages = bs * ((args.prompt_len + steps + 64) // 16 + 2) + 16
        runner = _FakeRunner(args.vocab, pages)
        channels = SimpleNamespace(recv_from_controller=None, send_to_detokenizer=_Outbox(),
                                   send_to_controller=_Outbox(), poller=None)
        sched = Scheduler(ServerArgs(model_path="fake", page_size=16), channels, runner,
                          SimpleNamespace(size=1, ranks=[0]), 0, tokenizer=None)
        gen = torch.Generator().manual_seed(bs)
        for i in range(bs):
            ids = torch.randint(1, args.vocab, (args.prompt_len,), generator=gen).tolist()
            sched.add_request(TokenizedGenerateReqInput(
                rid=f"r{i}", input_text="", input_ids=ids,
                sampling_params=SamplingParams(max_new_tokens=steps + 32, ignore_eos=True, temperature=0.0),
                return_logprob=False, logprob_start_len=-1, top_logprobs_num=0, stream=True,
                arrival_time=time.time()))
        while not all(r.is_decoding for r in sched.running) or len(sched.running) < bs:
            sched.step()
            sched.report_load()
        build = []
        orig_build = sched.build_forward_batch

        def timed_build(batch):
            t = time.perf_counter()
            out = orig_build(batch)
            build.append(time.perf_counter() - t)
            return out

        sched.build_forward_batch = timed_build
        reports_before = channels.send_to_controller.count
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            sched.step()
            sched.report_load()
            times.append(time.perf_counter() - t)
        reports = channels.send_to_controller.count - reports_before
        rows.append(("scheduler decode step (fake model)", f"B={bs}", f"{1e3 * min(times):.3f} ms"))
        rows.append(("  of which ForwardBatch build", f"B={bs}", f"{1e3 * min(build):.3f} ms"))
        rows.append(("  InstanceReports per step", f"B={bs}", f"{reports / steps:.2f}"))
    return rows


def bench_stream(args):
    from transformers import AutoTokenizer

    from sglang.srt.demo_model import train_tokenizer
    from sglang.srt.managers.detokenizer_manager import IncrementalDetokenizer
    from sglang.srt.managers.io_struct import BatchStrOut, ReqOutputDelta

    tok_dir = tempfile.mkdtemp(prefix="bench-hot-path-tok-")
    train_tokenizer(tok_dir, 512)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = []
    for length in args.stream_lens:
        ids = torch.randint(5, tokenizer.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        detok = IncrementalDetokenizer(tokenizer)
        wire = 0
        t = time.perf_counter()
        for i, tid in enumerate(ids):
            last = i == length - 1
            delta = ReqOutputDelta(rid="r", new_output_ids=[tid], finish_reason={"type": "length"} if last else None,
                                   prompt_tokens=8, completion_tokens=i + 1, cached_tokens=0)
            wire += len(pickle.dumps(BatchStrOut(detok.update_batch([delta])), protocol=pickle.HIGHEST_PROTOCOL))
        elapsed = time.perf_counter() - t
        rows.append(("stream: detokenizer -> TokenizerManager bytes", f"L={length}", f"{wire / 1e3:.1f} kB"))
        rows.append(("stream: detokenizer time per token", f"L={length}", f"{1e6 * elapsed / length:.1f} us"))
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = {"sampler": bench_sampler, "penalties": bench_penalties, "scheduler": bench_scheduler,
                "stream": bench_stream}
    rows = []
    for name in args.sections:
        rows.extend(sections[name](args))
    print(f"\nhost hot path, V={args.vocab}, torch threads={args.threads}\n")
    print("| what | shape | value |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
