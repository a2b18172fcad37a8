"""Attention heads padded for every TP degree up to the weight granularity G (pure arithmetic, no torch).

A model with H query heads and Hkv KV heads (GQA group g = H / Hkv: query head h uses KV head h // g) is
run as a *padded* model with H' query heads and Hkv' KV heads, the same for every TP degree t dividing G,
so that a merge or split only regroups whole heads (weights and KV pages) and never re-slices one:

    Hkv' = K * G          K = ceil(Hkv / G) KV slots per fine shard (the fewest that hold every KV head)
    H'   = Qk * Hkv'      every KV slot serves Qk query slots: query slot i uses KV slot i // Qk
    rank r of TP t holds KV slots [r*Hkv'/t, (r+1)*Hkv'/t) and query slots [r*H'/t, (r+1)*H'/t)

Each KV slot is a copy of one real KV head (`kv_source`); when there are more slots than heads some
heads are replicated (SGLang's rule when Hkv < t: a rank holds the KV head its query heads use). The g
query heads of a KV head are split as evenly as possible over its replicas, and each replica's unused
query slots are padding (`q_source` -1): zero q rows and zero o_proj columns, so they add exactly zero to
the output. When G divides Hkv the layout is the identity (no padding, no replication).

Costs (documented in README "Head padding"): per device at TP t the KV pool stores Hkv'/t heads per token
instead of Hkv/t, and q/o projections and attention compute H'/t heads instead of H/t.

Data flow:
    (H, Hkv, G) --pad_heads--> HeadLayout(q_source [H'], kv_source [Hkv'], ...)
    HeadLayout --> the runtime's QKV / o_proj row copies (which HF head fills which padded head) and its
                   KV pool width (Hkv'/t heads per rank); gyges.plans sees Hkv' as the model's KV heads
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int  # H, real query heads of the checkpoint
    num_kv_heads: int  # Hkv, real KV heads
    granularity: int  # G, the finest TP degree the layout serves
    q_source: Tuple[int, ...]  # [H'] real query head in each padded query slot, -1 = padding (zero)
    kv_source: Tuple[int, ...]  # [Hkv'] real KV head each padded KV slot copies

    @property
    def padded_heads(self) -> int:
        return len(self.q_source)

    @property
    def padded_kv_heads(self) -> int:
        return len(self.kv_source)

    @property
    def q_per_kv_slot(self) -> int:
        return self.padded_heads // self.padded_kv_heads

    @property
    def is_identity(self) -> bool:
        return self.q_source == tuple(range(self.num_heads)) and self.kv_source == tuple(range(self.num_kv_heads))

    def _check_tp(self, tp: int) -> None:
        if tp < 1 or self.granularity % tp:
            raise ValueError(f"tp={tp} must divide the head layout's granularity {self.granularity}")

    def heads_per_rank(self, tp: int) -> int:
        self._check_tp(tp)
        return self.padded_heads // tp

    def kv_heads_per_rank(self, tp: int) -> int:
        self._check_tp(tp)
        return self.padded_kv_heads // tp

    def q_sources_of_rank(self, rank: int, tp: int) -> Tuple[int, ...]:
        """Real query head of each query slot rank `rank` of TP `tp` holds (-1 = padding)."""
        n = self.heads_per_rank(tp)
        return self.q_source[rank * n:(rank + 1) * n]

    def kv_sources_of_rank(self, rank: int, tp: int) -> Tuple[int, ...]:
        n = self.kv_heads_per_rank(tp)
        return self.kv_source[rank * n:(rank + 1) * n]


def _even_split(n: int, parts: int) -> List[int]:
    """n items over `parts` bins, the first bins one larger: [ceil, ..., floor]."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


@lru_cache(maxsize=None)
def pad_heads(num_heads: int, num_kv_heads: int, granularity: int) -> HeadLayout:
    """The padded head layout of an (H, Hkv) model for weight granularity G (see the module docstring)."""
    H, Hkv, G = num_heads, num_kv_heads, granularity
    if H < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"num_attention_heads={H} must be a positive multiple of num_key_value_heads={Hkv}")
    if G < 1 or G & (G - 1):
        raise ValueError(f"weight granularity {G} must be a power of two")
    g = H // Hkv
    slots = -(-Hkv // G) * G  # Hkv' = K * G
    replicas = _even_split(slots, Hkv)  # KV slots of each real KV head (>= 1 each)
    qk = -(-g // min(replicas))  # query slots per KV slot: the least replicated head bounds it
    q_source: List[int] = []
    kv_source: List[int] = []
    for j, n in enumerate(replicas):
        first = j * g
        for size in _even_split(g, n):
            kv_source.append(j)
            q_source.extend(range(first, first + size))
            q_source.extend([-1] * (qk - size))
            first += size
    return HeadLayout(H, Hkv, G, tuple(q_source), tuple(kv_source))


# ---- overhead report: python -m gyges.heads --config path/to/config.json ---------------------------------
def overhead_rows(cfg: dict, dtype_bytes: int = 2, granularities=(1, 2, 4, 8)) -> List[dict]:
    """Per (G, TP) the padding's cost for an HF config dict: heads per device padded / ideal, KV bytes per
    token per device padded / ideal (ideal = Hkv/t heads, fractional), attention + MLP weight per device."""
    H = int(cfg["num_attention_heads"])
    Hkv = int(cfg.get("num_key_value_heads") or H)
    D = int(cfg.get("head_dim") or cfg["hidden_size"] // H)
    hidden, inter, layers = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    kv_head_bytes = layers * 2 * D * dtype_bytes  # one KV head of one token, all layers, K and V
    rows = []
    for G in granularities:
        lay = pad_heads(H, Hkv, G)
        inter_p = -(-inter // G) * G

        def layer_params(h, hkv, i):
            return hidden * (h + 2 * hkv) * D + h * D * hidden + 3 * hidden * i

        for t in (t for t in granularities if G % t == 0):
            rows.append({
                "G": G, "tp": t,
                "q_heads": f"{lay.padded_heads // t} / {H / t:g}",
                "kv_heads": f"{lay.padded_kv_heads // t} / {Hkv / t:g}",
                "kv_bytes_per_token": lay.padded_kv_heads // t * kv_head_bytes,
                "kv_ideal": kv_head_bytes * Hkv / t,
                "layer_weights_ratio": layer_params(lay.padded_heads, lay.padded_kv_heads, inter_p)
                / layer_params(H, Hkv, inter),
            })
    return rows


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Cost of the head padding of one model at every TP / G")
    parser.add_argument("--config", required=True, help="HF config.json of the model")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV element (2 = bf16/fp16)")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        rows = overhead_rows(json.load(f), args.dtype_bytes)
    print(f"{'G':>3} {'TP':>3} {'q heads/dev':>12} {'KV heads/dev':>13} {'KV B/token/dev':>15} {'ideal':>8} "
          f"{'KV x':>6} {'layer weights x':>16}")
    for r in rows:
        print(f"{r['G']:>3} {r['tp']:>3} {r['q_heads']:>12} {r['kv_heads']:>13} {r['kv_bytes_per_token']:>15} "
              f"{r['kv_ideal']:>8.0f} {r['kv_bytes_per_token'] / r['kv_ideal']:>6.2f} "
              f"{r['layer_weights_ratio']:>16.3f}")


if __name__ == "__main__":
    main()
