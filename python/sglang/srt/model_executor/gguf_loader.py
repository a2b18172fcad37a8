"""GGUF checkpoints (llama.cpp's single-file format): serve one with `--model-path model.gguf`, or convert it.

Data flow:
    model.gguf --gguf.GGUFReader--> metadata + tensors (quantized blocks; numpy memmap of the file)
    config     <- transformers' GGUF metadata parser (AutoConfig, gguf_file=) + `architectures` and
                  `tie_word_embeddings` (true when the file has no `output.weight`)
    tokenizer  <- transformers' GGUF tokenizer converter (AutoTokenizer, gguf_file=); the chat template
                  comes from the file's `tokenizer.chat_template`
    weights    <- per HF tensor name: gguf's own TensorNameMap gives the GGUF name, gguf.quants.dequantize
                  gives float32 [out, in] (HF orientation: GGUF's ne0 is the fastest dimension = HF's last);
                  on the llama architecture attn_q / attn_k rows are un-permuted (below)

Two uses:
    gguf_model_dir(path)             a side directory (config.json, generation_config.json, tokenizer files,
                                     gguf_source.json naming the file, no weights) that the server serves;
                                     model_loader.load_weights sees gguf_source.json and dequantizes the file
                                     at load (load_gguf_weights, a tqdm bar counts tensors)
    convert_gguf_to_hf(path, out)    a full HF safetensors directory (what demo_model writes)

The rotary permutation: HF's Llama applies rotary to the two halves of each head ([x0..x_{d/2-1}] with
[x_{d/2}..x_{d-1}]); llama.cpp's llama rope pairs adjacent elements (x0 with x1). Its converter therefore
reorders the rows of q_proj / k_proj per head, for head h (rows [h*d, (h+1)*d)), from [2, d/2] to [d/2, 2]
order: gguf_rows = hf_rows.reshape(heads, 2, d/2, in).swapaxes(1, 2). `unpermute_rotary` undoes it
(heads = attention heads for q, KV heads for k). Other GGUF architectures (qwen2, qwen3) keep HF's order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

GGUF_SOURCE_FILE = "gguf_source.json"  # in a side directory: {"gguf_file": absolute path, ...}
_CONVERTER_VERSION = 1  # bump when what gguf_model_dir / convert_gguf_to_hf write changes (invalidates caches)

# general.architecture of the GGUF file -> (HF architecture this runtime serves, rotary rows permuted)
GGUF_ARCHITECTURES: Dict[str, Tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}


def is_gguf_file(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def default_cache_dir() -> str:
    """Where converted GGUF side directories and the demo model are kept between runs."""
    return os.path.join(os.path.expanduser("~"), ".cache", "sglang-gyges")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF llama q/k rows [heads*d, ...] (adjacent rotary pairs) -> HF rows (rotary halves). Shape kept."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of unpermute_rotary: HF q/k rows -> the GGUF llama order (what llama.cpp's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """One GGUF file: its architecture, head counts and tensors dequantized to HF orientation on request."""

    def __init__(self, path: str):
        import gguf

        self.path = os.path.abspath(path)
        self.reader = gguf.GGUFReader(self.path)
        self.arch = self._field_str("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"GGUF file {path} has architecture {self.arch!r}; supported: "
                             f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
        self.hf_architecture, self.permuted_rotary = GGUF_ARCHITECTURES[self.arch]
        self.n_heads = int(self._field(f"{self.arch}.attention.head_count"))
        kv = self._field(f"{self.arch}.attention.head_count_kv", default=None)
        self.n_kv_heads = int(kv) if kv is not None else self.n_heads
        self.n_layers = int(self._field(f"{self.arch}.block_count"))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch.upper()], self.n_layers)

    def _field(self, key: str, default=KeyError):
        f = self.reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise ValueError(f"GGUF file {self.path} lacks the metadata key {key!r}")
            return default
        return f.contents()

    def _field_str(self, key: str) -> str:
        return str(self._field(key))

    @property
    def tied_embeddings(self) -> bool:
        return "output.weight" not in self.tensors

    def gguf_name(self, hf_name: str) -> Optional[str]:
        """The GGUF tensor name of an HF tensor name (gguf's TensorNameMap), None if the file lacks it."""
        name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return name if name in self.tensors else None

    def has(self, hf_name: str) -> bool:
        return self.gguf_name(hf_name) is not None

    def tensor(self, hf_name: str) -> np.ndarray:
        """Dequantized float32 tensor in HF orientation ([out, in] for linear weights)."""
        import gguf

        name = self.gguf_name(hf_name)
        if name is None:
            raise KeyError(f"GGUF file {self.path} has no tensor for {hf_name}")
        t = self.tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # GGUF lists dims fastest first (ne0 = in); numpy's shape is the reverse (HF's [out, in]).
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if not w.flags.writeable:  # an unquantized tensor is a view of the read-only memmap
            w = w.copy()
        if self.permuted_rotary and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rotary(w, self.n_heads)
        elif self.permuted_rotary and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rotary(w, self.n_kv_heads)
        return w

    def fingerprint(self) -> str:
        """Identifies the file's content cheaply (path, size, mtime) for cache keys."""
        st = os.stat(self.path)
        key = f"{self.path}|{st.st_size}|{st.st_mtime_ns}|v{_CONVERTER_VERSION}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---- config and tokenizer ---------------------------------------------------------------------------------
def hf_config(ckpt: GGUFCheckpoint, dtype: str):
    """transformers' config from the file's metadata, with what the runtime needs set explicitly."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.dirname(ckpt.path), gguf_file=os.path.basename(ckpt.path))
    cfg.architectures = [ckpt.hf_architecture]
    cfg.tie_word_embeddings = ckpt.tied_embeddings
    cfg.dtype = dtype
    return cfg


def write_config_and_tokenizer(ckpt: GGUFCheckpoint, out_dir: str, dtype: str):
    """config.json, generation_config.json and the tokenizer files (chat template included). Returns config."""
    from transformers import AutoTokenizer, GenerationConfig

    os.makedirs(out_dir, exist_ok=True)
    cfg = hf_config(ckpt, dtype)
    cfg.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=getattr(cfg, "pad_token_id", None)).save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(ckpt.path), gguf_file=os.path.basename(ckpt.path))
    tok.save_pretrained(out_dir)
    return cfg


def hf_tensor_names(cfg) -> Iterator[str]:
    """Every tensor name transformers' own model class has for cfg (built on the meta device, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name in model.state_dict():
        if tied and name == "lm_head.weight":
            continue
        yield name


# ---- the two uses ---------------------------------------------------------------------------------------
def gguf_model_dir(path: str, cache_dir: Optional[str] = None) -> str:
    """The side directory the server serves for a .gguf file (built once per file version, then reused)."""
    ckpt = GGUFCheckpoint(path)
    out = os.path.join(cache_dir or default_cache_dir(), "gguf", f"{os.path.basename(path)[:-5]}-{ckpt.fingerprint()}")
    marker = os.path.join(out, GGUF_SOURCE_FILE)
    if os.path.isfile(marker):
        return out
    tmp = out + f".tmp{os.getpid()}"
    logger.info("GGUF %s: writing config and tokenizer to %s", path, out)
    write_config_and_tokenizer(ckpt, tmp, dtype="float32")
    with open(os.path.join(tmp, GGUF_SOURCE_FILE), "w") as f:
        json.dump({"gguf_file": ckpt.path, "architecture": ckpt.arch, "converter_version": _CONVERTER_VERSION}, f)
    _publish(tmp, out)
    return out


def gguf_source(model_dir: str) -> Optional[str]:
    """The GGUF file a side directory stands for, or None for an ordinary checkpoint directory."""
    marker = os.path.join(model_dir, GGUF_SOURCE_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return json.load(f)["gguf_file"]


def convert_gguf_to_hf(path: str, out_dir: str, dtype: str = "float32", show_progress: bool = True) -> str:
    """Dequantize a GGUF file into an HF directory (config, generation config, tokenizer, model.safetensors)."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    ckpt = GGUFCheckpoint(path)
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    cfg = write_config_and_tokenizer(ckpt, tmp, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    tensors = {}
    names = list(hf_tensor_names(cfg))
    for name in tqdm(names, desc="Dequantizing GGUF", unit="tensor", disable=not show_progress):
        if not ckpt.has(name) and name.endswith(".bias"):
            continue  # a bias the class has but the file lacks (zeros): none on the architectures above
        tensors[name] = torch.from_numpy(ckpt.tensor(name)).to(torch_dtype).contiguous()
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    _publish(tmp, out_dir)
    return out_dir


def _publish(tmp: str, out: str) -> None:
    """Move a finished directory into place (another process may have won the race: keep theirs).

    Files are made world-readable (safetensors writes 0600): a container's non-root user reads them from a volume.
    """
    import shutil

    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o644)
    os.chmod(tmp, 0o755)

    if os.path.exists(out):
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out):
            raise


# ---- loading into the padded layout (model_loader hook) ----------------------------------------------------
def load_gguf_weights(model, gguf_path: str, show_progress: bool = True) -> None:
    """Fill model.weight_targets() from a GGUF file, dequantizing one tensor at a time."""
    import torch
    from tqdm.auto import tqdm

    ckpt = GGUFCheckpoint(gguf_path)
    targets = model.weight_targets()
    missing = sorted(n for n in targets if not ckpt.has(n))
    if missing:
        raise ValueError(f"GGUF file {gguf_path} is missing {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing)}")
    from sglang.srt.model_executor.model_loader import copy_into_target

    for name in tqdm(sorted(targets), desc="Dequantizing GGUF", unit="tensor", disable=not show_progress):
        w = torch.from_numpy(ckpt.tensor(name))
        if tuple(w.shape) != tuple(targets[name].hf_shape):
            raise ValueError(f"tensor {name} in {os.path.basename(gguf_path)} has shape {list(w.shape)}, but the "
                             f"config expects {list(targets[name].hf_shape)}")
        copy_into_target(w, targets[name])
