"""Load a HF safetensors checkpoint straight into this rank's shard of the padded layout.

Data flow:
    model.safetensors.index.json (or every *.safetensors)  -> {tensor name: file}
    model.weight_targets()                                  -> {tensor name: WeightTarget (param, HF shape, copies)}
    check (headers only): every target present, every shape as the config says
    per file, per tensor: read only the row (or, transposed, column) ranges of this rank's copies with
        safetensors get_slice, copy them into the local parameter (dtype converted on copy)
At most one tensor's rows for this rank are materialised at a time; a tqdm bar counts tensors.
A GGUF side directory (gguf_loader.gguf_model_dir: config + tokenizer + gguf_source.json) is dequantized from
its GGUF file instead (gguf_loader.load_gguf_weights), through the same copy_into_target.
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from typing import Dict, List

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from sglang.srt.model_executor.weight_layout import WeightTarget


def checkpoint_index(model_path: str) -> Dict[str, str]:
    """{tensor name: safetensors file path} for a checkpoint directory."""
    index_path = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_path, fname) for name, fname in weight_map.items()}
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_path}")
    out: Dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = path
    return out


def _check_targets(targets: Dict[str, WeightTarget], index: Dict[str, str], model_path: str) -> None:
    missing = sorted(set(targets) - set(index))
    if missing:
        raise ValueError(f"checkpoint {model_path} is missing {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing)}")
    by_file: Dict[str, List[str]] = defaultdict(list)
    for name in targets:
        by_file[index[name]].append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(targets[name].hf_shape):
                    raise ValueError(f"tensor {name} in {os.path.basename(path)} has shape {list(found)}, but the "
                                     f"config expects {list(targets[name].hf_shape)}")


@torch.no_grad()
def load_weights(model, model_path: str, show_progress: bool = True) -> None:
    """Fill model's parameters (its weight_targets()) from the checkpoint in model_path."""
    from sglang.srt.model_executor import gguf_loader

    gguf_file = gguf_loader.gguf_source(model_path)
    if gguf_file is not None:
        return gguf_loader.load_gguf_weights(model, gguf_file, show_progress)
    targets = model.weight_targets()
    index = checkpoint_index(model_path)
    _check_targets(targets, index, model_path)
    by_file: Dict[str, List[str]] = defaultdict(list)
    for name in targets:
        by_file[index[name]].append(name)
    bar = tqdm(total=len(targets), desc="Loading safetensors", unit="tensor", disable=not show_progress)
    for path in sorted(by_file):
        with safe_open(path, framework="pt") as f:
            for name in sorted(by_file[path]):
                copy_into_target(f.get_slice(name), targets[name])
                bar.update(1)
    bar.close()


def copy_into_target(src, target: WeightTarget) -> None:
    """Copy this rank's row ranges of one HF tensor (a safetensors slice or a torch tensor) into its parameter."""
    param = target.param
    for c in target.copies:
        if target.transpose:
            rows = src[:, c.src_start:c.src_start + c.length].t()  # [length, out]
        else:
            rows = src[c.src_start:c.src_start + c.length]  # [length, ...]
        param[c.dst_start:c.dst_start + c.length].copy_(rows)
