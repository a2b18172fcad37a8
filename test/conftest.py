"""Shared fixtures: tiny random checkpoints built locally (no downloads) and cached per test session.

`test_model(name)` returns the directory of one of the named checkpoints below; each is built once per
session with transformers' own model classes (see sglang.srt.demo_model).
"""


import pytest

from sglang.srt.demo_model import DemoModelSpec, make_demo_model

# Named checkpoints the suites share. Odd sizes (intermediate 172, vocab 512 not a multiple of 3...),
# GQA, tied and untied embeddings, several safetensors shards.
TEST_MODEL_SPECS = {
    "llama": DemoModelSpec(arch="llama"),
    "llama_tied": DemoModelSpec(arch="llama", tie_word_embeddings=True, seed=1, intermediate_size=100),
    "llama_sharded": DemoModelSpec(arch="llama", seed=2, max_shard_size="100KB"),
    "llama3_rope": DemoModelSpec(
        arch="llama", seed=3, num_key_value_heads=4,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
    ),
    "qwen2": DemoModelSpec(arch="qwen2", seed=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=150, num_hidden_layers=3),
    # 4 KV heads: splits into TP4 (Gyges tests).
    "llama_kv4": DemoModelSpec(arch="llama", seed=7, num_key_value_heads=4, intermediate_size=92),
    "qwen3": DemoModelSpec(arch="qwen3", seed=5, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=130),
}


@pytest.fixture(scope="session")
def test_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    built = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = make_demo_model(str(root / name), TEST_MODEL_SPECS[name])
        return built[name]

    return get
