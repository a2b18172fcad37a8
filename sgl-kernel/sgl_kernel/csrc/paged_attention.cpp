// CPU paged attention over the head-centric KV pool (sglang/srt/mem_cache/kv_pool.py), read in place.
//
//   kv_buffer [num_pages, Hkv, num_layers, 2 (K|V), page_size, D]   (contiguous; one rank's KV heads)
//   token at absolute position p of request b: page page_table[b, p / page_size], slot p % page_size
//
// paged_attention(q, k, v, kv_buffer, layer, page_table, prefix_lens, extend_lens, scale) -> out
//   q [T, Hq, D], k/v [T, Hkv, D] of the batch's new tokens, requests concatenated in order (any row and head
//   strides, dim stride 1); request b has extend_lens[b] >= 0 new tokens at positions prefix_lens[b] ..
//   prefix_lens[b] + extend_lens[b] - 1. Decodes (extend 1) and prefill / chunked-prefill requests (extend > 1
//   over a cached prefix) mix freely; nothing is padded to anything else.
//   1. store: every new token's K/V is written into its page slot of `layer` (in place in kv_buffer)
//   2. attend: query i of request b sees keys 0 .. prefix_lens[b] + i (causal), read from the pages
//   -> out [T, Hq, D] in q's dtype; GQA: query head h reads KV head h / (Hq / Hkv).
//
// Work items: (request, KV head, block of up to kRows / G of the request's tokens), G = Hq / Hkv; the rows of an
// item are its tokens x the G query heads that share the KV head, so each K/V tile read from the pool serves
// all of them. Items are taken from a shared counter by torch's intra-op threads (OpenMP), largest first.
// Per item, flash-attention style in float32: keys in tiles of kTile positions (gathered from as many pages as
// the tile spans, converted to float32, K transposed); rows in groups of up to kGroup that share each tile's loads:
// scores S = Q K^T (Q pre-scaled), online softmax (running max m, sum l), acc += P V; out = acc / l. The inner
// loops are written with GCC vector extensions (16 floats: one AVX-512 register; the compiler splits them where
// vectors are narrower), exp by a polynomial so that it vectorizes too.
// dtypes: float32 and bfloat16 (q, k, v and the pool of one dtype); any head_dim (64-256 in practice).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTile = 32;  // key positions per tile
constexpr int64_t kRows = 64;  // query rows (tokens x heads of one KV head) per work item, at most
constexpr int kGroup = 4;      // rows computed together (one K/V load serves all of them)

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) {
  return f;
}
template <>
inline at::BFloat16 from_f32<at::BFloat16>(float f) {
  return at::BFloat16(f);  // round to nearest even, as torch does
}

// 16 floats as one value (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones, ...); V16u is the
// same for unaligned memory.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t I16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline V16 load16(const float* p) { return *reinterpret_cast<const V16u*>(p); }
inline void store16(float* p, V16 v) { *reinterpret_cast<V16u*>(p) = v; }
inline V16 splat16(float x) { return V16{} + x; }

// exp(x) for x <= 0 (scores minus their running max), 16 lanes at once: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by
// Cephes' degree-6 polynomial (~1 ulp), 2^n through the exponent bits. Below -87 the result is 0 (the mask's
// -inf too).
inline V16 exp_nonpos16(V16 x) {
  const I16 tiny = x < -87.0f;
  x = x < -87.0f ? splat16(-87.0f) : x;
  const V16 magic = splat16(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const V16 n = (x * 1.44269504088896341f + magic) - magic;
  V16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V16 p = splat16(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  V16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? V16{} : p * scale;
}

// The same for one float (the running-max correction, once per row and tile).
inline float exp_nonpos(float x) { return exp_nonpos16(splat16(x))[0]; }

struct Item {
  int64_t req;      // request index b
  int64_t kv_head;  // g
  int64_t tok0;     // first token (row of q) of the block
  int64_t ntok;     // tokens in the block
  int64_t cost;     // ~ rows x keys, for ordering
};

template <typename T>
struct Attention {
  const T* q;
  int64_t q_s0, q_s1;
  const T* kv;
  int64_t page_s, head_s, kv_s;  // kv_buffer strides: page, head, K->V (layer offset folded into kv)
  const int64_t* table;          // [B, max_pages] (int64)
  int64_t table_s;
  const int64_t* prefix;
  const int64_t* starts;  // first token of each request
  T* out;
  int64_t o_s0, o_s1;
  int64_t hq, hkv, group, dim, page_size;
  float scale;

  // K/V of key positions [k0, k0 + n) of request b, KV head g -> KT [dim][kTile], V [kTile][dim] in float32
  void load_tile(int64_t b, int64_t g, int64_t k0, int64_t n, float* kt, float* vt) const {
    const int64_t* pages = table + b * table_s;
    int64_t j = 0;
    while (j < n) {
      const int64_t pos = k0 + j;
      const int64_t slot = pos % page_size;
      const int64_t run = std::min(n - j, page_size - slot);  // positions left in this page
      const T* kp = kv + pages[pos / page_size] * page_s + g * head_s + slot * dim;
      const T* vp = kp + kv_s;
      for (int64_t t = 0; t < run; ++t) {
        const T* kr = kp + t * dim;
        for (int64_t d = 0; d < dim; ++d) kt[d * kTile + j + t] = to_f32(kr[d]);
        const T* vr = vp + t * dim;
        float* vo = vt + (j + t) * dim;
        for (int64_t d = 0; d < dim; ++d) vo[d] = to_f32(vr[d]);
      }
      j += run;
    }
    for (; j < kTile; ++j) {  // padding: zeros (masked anyway)
      for (int64_t d = 0; d < dim; ++d) kt[d * kTile + j] = 0.0f;
      std::memset(vt + j * dim, 0, sizeof(float) * dim);
    }
  }

  // Rows of an item at most (a GQA group larger than kRows is one item of `group` rows).
  int64_t max_rows() const { return std::max(kRows, group); }

  // Per-thread scratch, in floats: Q and acc [max_rows][dim], K^T [dim][kTile], V [kTile][dim], P [max_rows][kTile],
  // m, l [max_rows].
  int64_t scratch_floats() const { return 2 * max_rows() * dim + 2 * kTile * dim + max_rows() * (kTile + 2); }

  // One key tile [k0, k0 + n) for the NR rows r0 .. r0 + NR - 1: scores (each K^T load serves every row), online
  // softmax per row (masked keys: later positions and the tile's padding get probability 0), then
  // acc = acc * alpha + P V (each V load serves every row; acc stays in registers over the tile).
  template <int NR>
  void group_tile(int64_t r0, int64_t k0, int64_t n, int64_t first_pos, const float* qf, float* acc,
                  const float* kt, const float* vt, float* probs, float* m, float* l) const {
    V16 sa[NR], sb[NR];  // scores of keys k0 .. k0 + 15, k0 + 16 .. k0 + 31
    for (int g = 0; g < NR; ++g) sa[g] = sb[g] = V16{};
    for (int64_t d = 0; d < dim; ++d) {
      const V16 ka = load16(kt + d * kTile), kb = load16(kt + d * kTile + kLanes);
      for (int g = 0; g < NR; ++g) {
        const V16 qd = splat16(qf[(r0 + g) * dim + d]);
        sa[g] += qd * ka;
        sb[g] += qd * kb;
      }
    }
    float alpha[NR];
    int64_t group_visible = 0;
    for (int g = 0; g < NR; ++g) {
      const int64_t r = r0 + g;
      float* pr = probs + g * kTile;
      const int64_t visible = std::max<int64_t>(0, std::min(n, first_pos + r / group - k0 + 1));
      group_visible = std::max(group_visible, visible);
      if (visible == 0) {  // this row sees nothing of the tile: its state stays
        std::fill(pr, pr + kTile, 0.0f);
        alpha[g] = 1.0f;
        continue;
      }
      store16(pr, sa[g]);
      store16(pr + kLanes, sb[g]);
      for (int64_t j = visible; j < kTile; ++j) pr[j] = -std::numeric_limits<float>::infinity();
      const V16 a = load16(pr), b = load16(pr + kLanes);
      const V16 mx = a > b ? a : b;
      float tile_max = mx[0];
      for (int i = 1; i < kLanes; ++i) tile_max = std::max(tile_max, mx[i]);
      const float m_new = std::max(m[r], tile_max);
      alpha[g] = exp_nonpos(m[r] - m_new);  // 0 on the first tile (m = -inf)
      const V16 pa = exp_nonpos16(a - m_new), pb = exp_nonpos16(b - m_new);
      store16(pr, pa);
      store16(pr + kLanes, pb);
      const V16 ps = pa + pb;
      float sum = 0.0f;
      for (int i = 0; i < kLanes; ++i) sum += ps[i];
      l[r] = l[r] * alpha[g] + sum;
      m[r] = m_new;
    }
    if (group_visible == 0) return;
    int64_t d0 = 0;
    for (; d0 + kLanes <= dim; d0 += kLanes) {
      V16 a[NR];
      for (int g = 0; g < NR; ++g) a[g] = load16(acc + (r0 + g) * dim + d0) * alpha[g];
      for (int64_t j = 0; j < group_visible; ++j) {
        const V16 vj = load16(vt + j * dim + d0);
        for (int g = 0; g < NR; ++g) a[g] += probs[g * kTile + j] * vj;
      }
      for (int g = 0; g < NR; ++g) store16(acc + (r0 + g) * dim + d0, a[g]);
    }
    for (; d0 < dim; ++d0) {  // head_dim not a multiple of 16
      for (int g = 0; g < NR; ++g) {
        float a = acc[(r0 + g) * dim + d0] * alpha[g];
        for (int64_t j = 0; j < group_visible; ++j) a += probs[g * kTile + j] * vt[j * dim + d0];
        acc[(r0 + g) * dim + d0] = a;
      }
    }
  }

  void run(const Item& it, float* buf) const {
    const int64_t rows = it.ntok * group;
    float* qf = buf;                         // [rows][dim], pre-scaled
    float* acc = qf + max_rows() * dim;      // [rows][dim]
    float* kt = acc + max_rows() * dim;      // [dim][kTile]
    float* vt = kt + kTile * dim;            // [kTile][dim]
    float* probs = vt + kTile * dim;         // [kGroup][kTile]: one row group's scores, then probabilities
    float* m = probs + max_rows() * kTile;   // [rows] running max
    float* l = m + max_rows();               // [rows] running sum
    const int64_t first_pos = prefix[it.req] + (it.tok0 - starts[it.req]);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = it.tok0 + r / group, h = it.kv_head * group + r % group;
      const T* src = q + t * q_s0 + h * q_s1;
      for (int64_t d = 0; d < dim; ++d) qf[r * dim + d] = to_f32(src[d]) * scale;
      std::fill(acc + r * dim, acc + (r + 1) * dim, 0.0f);
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.0f;
    }
    const int64_t keys = first_pos + it.ntok;  // the last token sees keys 0 .. keys - 1
    static_assert(kTile == 2 * kLanes, "a key tile is two vectors of scores");
    for (int64_t k0 = 0; k0 < keys; k0 += kTile) {
      const int64_t n = std::min(kTile, keys - k0);
      load_tile(it.req, it.kv_head, k0, n, kt, vt);
      for (int64_t r0 = 0; r0 < rows; r0 += kGroup) {
        switch (std::min<int64_t>(kGroup, rows - r0)) {
          case 4: group_tile<4>(r0, k0, n, first_pos, qf, acc, kt, vt, probs, m, l); break;
          case 3: group_tile<3>(r0, k0, n, first_pos, qf, acc, kt, vt, probs, m, l); break;
          case 2: group_tile<2>(r0, k0, n, first_pos, qf, acc, kt, vt, probs, m, l); break;
          default: group_tile<1>(r0, k0, n, first_pos, qf, acc, kt, vt, probs, m, l); break;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = it.tok0 + r / group, h = it.kv_head * group + r % group;
      T* dst = out + t * o_s0 + h * o_s1;
      const float inv = 1.0f / l[r];
      const float* ar = acc + r * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = from_f32<T>(ar[d] * inv);
    }
  }
};

template <typename T>
void store_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& kv_buffer, int64_t layer,
              const int64_t* table, int64_t table_s, const std::vector<int64_t>& tok_req, const int64_t* prefix,
              const std::vector<int64_t>& starts) {
  const int64_t T_ = k.size(0), hkv = k.size(1), dim = k.size(2), page_size = kv_buffer.size(4);
  const int64_t page_s = kv_buffer.stride(0), head_s = kv_buffer.stride(1), kv_s = kv_buffer.stride(3);
  T* base = kv_buffer.data_ptr<T>() + layer * kv_buffer.stride(2);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t k_s0 = k.stride(0), k_s1 = k.stride(1), v_s0 = v.stride(0), v_s1 = v.stride(1);
  at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tok_req[t];
      const int64_t pos = prefix[b] + (t - starts[b]);
      T* dst = base + table[b * table_s + pos / page_size] * page_s + (pos % page_size) * dim;
      for (int64_t h = 0; h < hkv; ++h) {
        std::memcpy(dst + h * head_s, kp + t * k_s0 + h * k_s1, sizeof(T) * dim);
        std::memcpy(dst + h * head_s + kv_s, vp + t * v_s0 + h * v_s1, sizeof(T) * dim);
      }
    }
  });
}

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& kv_buffer, int64_t layer, const int64_t* table,
            int64_t table_s, const int64_t* prefix, const int64_t* extend, const std::vector<int64_t>& starts,
            int64_t batch, double scale, torch::Tensor& out) {
  Attention<T> a;
  a.q = q.data_ptr<T>();
  a.q_s0 = q.stride(0);
  a.q_s1 = q.stride(1);
  a.kv = kv_buffer.data_ptr<T>() + layer * kv_buffer.stride(2);
  a.page_s = kv_buffer.stride(0);
  a.head_s = kv_buffer.stride(1);
  a.kv_s = kv_buffer.stride(3);
  a.table = table;
  a.table_s = table_s;
  a.prefix = prefix;
  a.starts = starts.data();
  a.out = out.data_ptr<T>();
  a.o_s0 = out.stride(0);
  a.o_s1 = out.stride(1);
  a.hq = q.size(1);
  a.hkv = kv_buffer.size(1);
  a.group = a.hq / a.hkv;
  a.dim = q.size(2);
  a.page_size = kv_buffer.size(4);
  a.scale = static_cast<float>(scale);

  const int64_t block = std::max<int64_t>(1, kRows / a.group);  // tokens per item
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t0 = 0; t0 < extend[b]; t0 += block) {
      const int64_t n = std::min(block, extend[b] - t0);
      const int64_t cost = n * (prefix[b] + t0 + n);
      for (int64_t g = 0; g < a.hkv; ++g) items.push_back({b, g, starts[b] + t0, n, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(a.scratch_floats());
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) a.run(items[i], buf.data());
    }
  });
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_buffer,
                              int64_t layer, torch::Tensor page_table, torch::Tensor prefix_lens,
                              torch::Tensor extend_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v: [tokens, heads, head_dim]");
  TORCH_CHECK(kv_buffer.dim() == 6 && kv_buffer.is_contiguous(),
              "kv_buffer: contiguous [pages, kv_heads, layers, 2, page_size, head_dim]");
  const auto dtype = kv_buffer.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "paged_attention: float32 or bfloat16, got ", dtype);
  TORCH_CHECK(q.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "paged_attention: q, k, v must have the pool's dtype");
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->stride(2) == 1, "q, k, v: CPU tensors with a contiguous last dim");
  }
  const int64_t num_tokens = q.size(0), hq = q.size(1), dim = q.size(2), hkv = kv_buffer.size(1);
  TORCH_CHECK(k.size(0) == num_tokens && v.size(0) == num_tokens && k.size(1) == hkv && v.size(1) == hkv &&
                  k.size(2) == dim && v.size(2) == dim && kv_buffer.size(5) == dim,
              "paged_attention: shapes of q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ", kv_buffer ",
              kv_buffer.sizes(), " do not agree");
  TORCH_CHECK(hq % hkv == 0, "query heads ", hq, " not a multiple of KV heads ", hkv);
  TORCH_CHECK(layer >= 0 && layer < kv_buffer.size(2), "layer ", layer, " out of range");
  auto table = page_table.to(at::kLong).contiguous();
  auto prefix = prefix_lens.to(at::kLong).contiguous();
  auto extend = extend_lens.to(at::kLong).contiguous();
  const int64_t batch = extend.size(0);
  TORCH_CHECK(prefix.size(0) == batch && table.dim() == 2 && table.size(0) == batch, "batch sizes disagree");
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const int64_t* ext = extend.data_ptr<int64_t>();
  std::vector<int64_t> starts(batch), tok_req(num_tokens);
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(ext[b] >= 0 && pre[b] >= 0, "negative prefix / extend length");
    TORCH_CHECK((pre[b] + ext[b] + kv_buffer.size(4) - 1) / kv_buffer.size(4) <= table.size(1) || ext[b] == 0,
                "page_table too narrow for request ", b);
    starts[b] = total;
    for (int64_t i = 0; i < ext[b] && total + i < num_tokens; ++i) tok_req[total + i] = b;
    total += ext[b];
  }
  TORCH_CHECK(total == num_tokens, "sum of extend_lens ", total, " != tokens ", num_tokens);
  auto out = torch::empty({num_tokens, hq, dim}, q.options());
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t tab_s = table.stride(0);
  if (dtype == at::kFloat) {
    store_kv<float>(k, v, kv_buffer, layer, tab, tab_s, tok_req, pre, starts);
    attend<float>(q, kv_buffer, layer, tab, tab_s, pre, ext, starts, batch, scale, out);
  } else {
    store_kv<at::BFloat16>(k, v, kv_buffer, layer, tab, tab_s, tok_req, pre, starts);
    attend<at::BFloat16>(q, kv_buffer, layer, tab, tab_s, pre, ext, starts, batch, scale, out);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "store new K/V into the head-centric pool, then causal paged attention",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("kv_buffer"), pybind11::arg("layer"),
        pybind11::arg("page_table"), pybind11::arg("prefix_lens"), pybind11::arg("extend_lens"),
        pybind11::arg("scale"), pybind11::call_guard<pybind11::gil_scoped_release>());
}
