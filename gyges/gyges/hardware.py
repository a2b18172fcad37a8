"""GPU cost models from first principles: a roofline step time and a KV capacity per TP degree, for studies at a
scale this project's machines cannot run (pure arithmetic; gyges.costmodel holds the models it builds).

Data flow:

    GPUSpec (memory, HBM bandwidth, dense bf16 FLOP/s, NVLink bandwidth)  --+
    ModelShape (layers, hidden, heads, KV heads, head_dim, intermediate,  --+--> step_time_model() -> StepTimeModel
                vocab; bf16 weights and KV)                                 |    transform_model() -> TransformCostModel
    Efficiency (achievable fractions of the peaks, overheads; one set)    --+    kv_capacity_tokens(tp)
                                                                                 save_gpu_models() -> model file

Per forward iteration of a TP-tp instance (StepTimeModel with overlap = 1, i.e. the roofline):

    memory  = (weight bytes read per step + KV bytes per context token * context tokens) / tp / (HBM * memory eff)
    compute = (2 * matmul params * new tokens + 4 * layers * heads * head_dim * query-key pairs) / tp
              / (bf16 FLOP/s * compute eff)
    step    = step overhead + max(memory, compute) + logits of each sequence (2 * vocab * hidden FLOPs)
              + [tp > 1] (2 * layers all-reduces of latency + 2 * layers * hidden * 2 bytes per new token
                          over NVLink * nvlink eff) * 2 (tp - 1) / tp          (ring all-reduce)

KV capacity of a TP-tp instance, in tokens (SGLang's rule: weights + KV pool take mem_fraction_static of the GPU,
the rest is for activations and CUDA graphs; every rank holds its KV heads of every token; fewer KV heads than
ranks are replicated):

    (GPU memory * memory_fraction - weight bytes / tp) / (KV bytes per token * max(1/tp, 1/kv_heads))

Model shapes are the published HF configs (config.json of meta-llama/Meta-Llama-3-8B, Qwen/Qwen2.5-32B,
meta-llama/Meta-Llama-3-70B); GPU numbers are NVIDIA's data sheets (dense, i.e. without 2:4 sparsity).
`benchmark/check_gpu_model.py` compares these models with the Gyges paper's measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from gyges.costmodel import StepTimeModel, TransformCostModel, save_models


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: float  # HBM capacity
    hbm_bytes_per_s: float  # peak HBM bandwidth
    bf16_flops: float  # peak dense bf16 tensor-core FLOP/s
    nvlink_bytes_per_s: float  # NVLink bandwidth per GPU, per direction


# NVIDIA H200 SXM: 141 GB HBM3e, 4.8 TB/s, 989 TFLOP/s dense bf16 (1,979 with sparsity), NVLink 4 900 GB/s (450 each way)
H200 = GPUSpec("H200", 141e9, 4.8e12, 989e12, 450e9)
# NVIDIA H20: 96 GB HBM3, 4.0 TB/s, 148 TFLOP/s dense bf16, NVLink 4 900 GB/s (450 each way)
H20 = GPUSpec("H20", 96e9, 4.0e12, 148e12, 450e9)
GPUS: Dict[str, GPUSpec] = {g.name: g for g in (H200, H20)}


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    weight_bytes_per_param: int = 2  # bf16
    kv_bytes_per_element: int = 2  # bf16

    @property
    def layer_matmul_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden  # q, k, v, o projections
        return attn + 3 * self.hidden * self.intermediate  # gate, up, down

    @property
    def params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.layer_matmul_params + 2 * self.hidden + ((q_out + 2 * kv_out) if self.qkv_bias else 0)
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden  # + final norm

    @property
    def weight_bytes(self) -> float:
        return float(self.params * self.weight_bytes_per_param)

    @property
    def weight_bytes_per_step(self) -> float:
        """Weights a forward pass streams: all but the input embedding (only the batch's rows are read),
        unless it doubles as the LM head."""
        skip = 0 if self.tied_embeddings else self.vocab * self.hidden
        return float((self.params - skip) * self.weight_bytes_per_param)

    @property
    def matmul_flops_per_token(self) -> float:
        return 2.0 * self.layers * self.layer_matmul_params

    @property
    def logits_flops_per_sequence(self) -> float:
        """The LM head runs on the last token of each sequence only (SGLang computes no other logits)."""
        return 2.0 * self.vocab * self.hidden

    @property
    def attention_flops_per_pair(self) -> float:
        """One query attending one key: q.k and p*v over every head and layer (2 FLOPs per multiply-add)."""
        return 4.0 * self.layers * self.heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        return float(2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_element)

    @property
    def allreduce_bytes_per_token(self) -> float:
        """Row-parallel outputs summed per token: attention and MLP of every layer, bf16 activations."""
        return float(2 * self.layers * self.hidden * 2)


# HF config.json values
LLAMA3_8B = ModelShape("Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                       vocab=128256)
QWEN25_32B = ModelShape("Qwen2.5-32B", layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128,
                        intermediate=27648, vocab=152064, qkv_bias=True)
LLAMA3_70B = ModelShape("Llama-3-70B", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                        intermediate=28672, vocab=128256)
MODELS: Dict[str, ModelShape] = {m.name: m for m in (LLAMA3_8B, QWEN25_32B, LLAMA3_70B)}


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of the data-sheet peaks and fixed costs: one set for every GPU and model."""

    # Decode kernels (weight GEMVs, paged attention) reach about 80% of peak HBM bandwidth on Hopper: a plain
    # device-to-device copy reaches ~90%, and serving engines' decode steps are reported at 70-85% of it.
    memory: float = 0.80
    # Large bf16 GEMMs (cuBLAS) run at ~70% of the dense tensor-core peak on Hopper; prefill adds attention,
    # norms and rotary kernels that run slower, so a whole prefill pass is commonly at 50-60% MFU.
    compute: float = 0.55
    # nccl-tests all-reduce bus bandwidth on NVLink 4 is ~360-370 GB/s of the 450 GB/s link: ~80%.
    nvlink: float = 0.80
    # Small-message NCCL all-reduce latency within one NVLink node: ~10-20 us (nccl-tests at <= 1 MB).
    allreduce_latency_s: float = 15e-6
    # Per-iteration CPU work of the engine not hidden behind the GPU: scheduling, batch building, sampling,
    # output processing (SGLang's overlap scheduler hides most of it; ~1-3 ms per step remain with CUDA graphs).
    step_overhead_s: float = 2e-3
    # Weights + KV pool take this fraction of GPU memory; the rest is for activations and CUDA graphs
    # (SGLang's mem_fraction_static is 0.88-0.9 on 80-141 GB GPUs at TP1-TP8).
    memory_fraction: float = 0.90
    # Fixed part of a merge or split: planning, the page-table rewrite, barriers of the ranks involved; the
    # CPU runtime measures tens of ms (benchmark/measure_costs.py), no GPU measurement exists yet.
    transform_overhead_s: float = 0.05


DEFAULT_EFFICIENCY = Efficiency()


def step_time_model(gpu: GPUSpec, model: ModelShape, eff: Efficiency = DEFAULT_EFFICIENCY) -> StepTimeModel:
    """The roofline step time of `model` on `gpu` (module docstring) as a StepTimeModel (overlap = 1)."""
    mem_bw = gpu.hbm_bytes_per_s * eff.memory
    flops = gpu.bf16_flops * eff.compute
    return StepTimeModel(
        base_s=eff.step_overhead_s,
        weight_s=model.weight_bytes_per_step / mem_bw,
        per_token_s=model.matmul_flops_per_token / flops,
        per_context_token_s=model.kv_bytes_per_token / mem_bw,
        # at TP2 (allreduce_scale 1): 2 all-reduces per layer, each a latency + its bytes over the link
        allreduce_s=2 * model.layers * eff.allreduce_latency_s,
        allreduce_per_token_s=model.allreduce_bytes_per_token / (gpu.nvlink_bytes_per_s * eff.nvlink),
        per_request_s=model.logits_flops_per_sequence / flops,
        per_attended_s=model.attention_flops_per_pair / flops,
        overlap=1.0,
    )


def transform_model(gpu: GPUSpec, model: ModelShape, eff: Efficiency = DEFAULT_EFFICIENCY) -> TransformCostModel:
    """Merges and splits moving KV and weights over NVLink at the all-reduce's achievable bandwidth."""
    return TransformCostModel(kv_bytes_per_token=model.kv_bytes_per_token, weight_bytes=model.weight_bytes,
                              link_bandwidth_bytes_per_s=gpu.nvlink_bytes_per_s * eff.nvlink,
                              fixed_overhead_s=eff.transform_overhead_s)


def save_gpu_models(path: str, gpu: GPUSpec, model: ModelShape, eff: Efficiency = DEFAULT_EFFICIENCY,
                    tps=(1, 2, 4, 8)) -> dict:
    """Write the model file the simulator (--step-model) and the server (--gyges-cost-model) load, for `model`
    on `gpu`; the provenance section records the inputs and the KV capacity per TP (for the simulator's
    --kv-tokens-per-device: the TP1 figure). Returns what was written."""
    info = {"source": "gyges.hardware (first principles, not measured)", "gpu": asdict(gpu), "model": asdict(model),
            "efficiency": asdict(eff),
            "kv_capacity_tokens": {str(tp): kv_capacity_tokens(gpu, model, tp, eff) for tp in tps}}
    return save_models(path, step_time_model(gpu, model, eff), transform_model(gpu, model, eff), info)


def kv_capacity_tokens(gpu: GPUSpec, model: ModelShape, tp: int, eff: Efficiency = DEFAULT_EFFICIENCY) -> int:
    """KV tokens a TP-tp instance holds (module docstring); 0 when its weight shard does not fit."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    free = gpu.memory_bytes * eff.memory_fraction - model.weight_bytes / tp
    per_token = model.kv_bytes_per_token * max(1.0 / tp, 1.0 / model.kv_heads)
    return max(0, int(free // per_token))


@dataclass(frozen=True)
class ServingEstimate:
    """Steady state of `instances` TP-tp instances, each running `batch` requests of one shape at a time."""

    tp: int
    instances: int
    kv_capacity_tokens: int  # per instance: the longest context it can hold
    batch: int  # requests each instance runs together
    cycle_s: float  # time for one instance to serve its batch: prefill chunks, then the decode steps
    output_tokens_per_s: float  # all instances
    total_tokens_per_s: float  # prompt + output tokens, all instances


def serving_estimate(gpu: GPUSpec, model: ModelShape, devices: int, tp: int, prompt_tokens: int, output_tokens: int,
                     eff: Efficiency = DEFAULT_EFFICIENCY, max_running: int = 1024,
                     chunk_tokens: int = 8192) -> ServingEstimate:
    """Throughput of devices/tp instances of TP tp serving equal requests: each instance keeps as many requests
    as its KV holds (at most max_running) and serves them in cycles: the prompts in prefill chunks of
    chunk_tokens (SGLang's default chunked prefill on large GPUs), then output_tokens decode steps of the batch.
    Prefill and decode are not mixed (an upper bound on the cycle; SGLang mixes them only when asked)."""
    if devices % tp:
        raise ValueError(f"{devices} devices do not split into TP {tp} instances")
    cap = kv_capacity_tokens(gpu, model, tp, eff)
    per_req = prompt_tokens + output_tokens
    batch = min(max_running, cap // per_req)
    if batch < 1:
        raise ValueError(f"a {per_req}-token request does not fit a TP{tp} instance ({cap} KV tokens)")
    step = step_time_model(gpu, model, eff)
    prefill_s, left, done = 0.0, batch * prompt_tokens, 0
    while left > 0:  # chunks of whole prompts' tokens, in order; context = each prompt's own tokens so far
        n = min(chunk_tokens, left)
        seqs = _chunk_seqs(done, n, prompt_tokens)
        prefill_s += step.batch_time(seqs, tp)
        done, left = done + n, left - n
    decode_s = sum(step.step_time(batch, batch * (prompt_tokens + i), tp, requests=batch)
                   for i in range(1, output_tokens + 1))
    cycle = prefill_s + decode_s
    n_inst = devices // tp
    return ServingEstimate(tp=tp, instances=n_inst, kv_capacity_tokens=cap, batch=batch, cycle_s=cycle,
                           output_tokens_per_s=n_inst * batch * output_tokens / cycle,
                           total_tokens_per_s=n_inst * batch * per_req / cycle)


def _chunk_seqs(done: int, n: int, prompt: int):
    """(new tokens, context tokens) per sequence of a prefill chunk covering prompt tokens [done, done + n) of a
    batch of equal prompts laid end to end."""
    seqs = []
    pos = done
    while pos < done + n:
        start_in = pos % prompt
        take = min(prompt - start_in, done + n - pos)
        seqs.append((take, start_in + take))
        pos += take
    return seqs
