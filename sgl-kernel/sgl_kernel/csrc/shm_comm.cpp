// Host-local shared-memory collectives for one tensor-parallel group (all ranks are processes of one host).
//
// One POSIX shared-memory segment per group, created by the group's rank 0 and mapped by every rank:
//
//   [ header: per rank one 64-byte line { std::atomic<uint64_t> seq; int64 pid } ]      size * 64 bytes
//   [ data:   2 parities x size ranks x chunk_bytes ]   rank r's input slot of a call with parity p
//   [ out:    2 parities x chunk_bytes ]                the reduced chunk (large all-reduces only)
//
// Synchronisation: every rank keeps a counter `seq` in its own header line. barrier() increments it with a
// release store and waits (acquire loads) until every rank's counter has reached the same value. A call
// (one chunk of one collective; counted per rank, the same count on every rank) alternates the data parity: rank r only overwrites parity p's slot at call
// k + 2 after passing call k + 1's barrier, i.e. after every rank has finished reading call k's slots, so
// one barrier per small call is enough.
//
//   all_reduce (sum), chunk of n bytes:
//     small (n <= kDirectBytes): copy in -> barrier -> every rank sums all slots in rank order into its tensor
//     large: copy in -> barrier -> rank r sums its 1/size slice into out[p] -> barrier -> copy out[p] back
//   all_gather: copy in -> barrier -> copy every rank's slot into out[r]
//   broadcast_bytes: the root copies [int64 length][bytes] into its slot -> barrier -> the others copy it out
//     (messages longer than a chunk take one call per chunk; only the first carries the length)
//
// Sums are accumulated in float32 in rank order 0..size-1, so every rank gets bit-identical results.
// Waiting spins with a pause, then yields the core, then sleeps briefly (ranks may outnumber cores); it
// checks the peers' pids and a timeout so that a dead or hung peer raises instead of hanging forever.

#include <torch/extension.h>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SGL_PAUSE() _mm_pause()
#else
#define SGL_PAUSE() std::this_thread::yield()
#endif

namespace {

constexpr int64_t kLine = 64;
constexpr int64_t kDirectBytes = 256 * 1024;

struct alignas(64) RankLine {
  std::atomic<uint64_t> seq;
  int64_t pid;
};
static_assert(sizeof(RankLine) == kLine, "one cache line per rank");

// The process no longer runs: it does not exist, or it has exited and waits to be reaped (a zombie).
bool process_gone(pid_t pid) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return false;
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close_paren = std::strrchr(buf, ')');  // "pid (comm) S ..."
  return close_paren != nullptr && close_paren[1] == ' ' && (close_paren[2] == 'Z' || close_paren[2] == 'X');
}

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// out[i] = sum_r srcs[r][i], accumulated in float32 in rank order.
void sum_f32(float* out, const std::vector<const char*>& srcs, int64_t begin, int64_t end) {
  const float* s0 = reinterpret_cast<const float*>(srcs[0]);
  for (int64_t i = begin; i < end; ++i) out[i] = s0[i];
  for (size_t r = 1; r < srcs.size(); ++r) {
    const float* s = reinterpret_cast<const float*>(srcs[r]);
    for (int64_t i = begin; i < end; ++i) out[i] += s[i];
  }
}

void sum_bf16(uint16_t* out, const std::vector<const char*>& srcs, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 1024;
  float acc[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const uint16_t* s0 = reinterpret_cast<const uint16_t*>(srcs[0]) + b;
    for (int64_t i = 0; i < n; ++i) acc[i] = bf16_to_f32(s0[i]);
    for (size_t r = 1; r < srcs.size(); ++r) {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(srcs[r]) + b;
      for (int64_t i = 0; i < n; ++i) acc[i] += bf16_to_f32(s[i]);
    }
    for (int64_t i = 0; i < n; ++i) out[b + i] = f32_to_bf16(acc[i]);
  }
}

void sum_f16(at::Half* out, const std::vector<const char*>& srcs, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float acc = 0.f;
    for (const char* p : srcs) acc += static_cast<float>(reinterpret_cast<const at::Half*>(p)[i]);
    out[i] = static_cast<at::Half>(acc);
  }
}

class ShmGroup {
 public:
  // create: rank 0 makes (and sizes) the segment; the others map it after rank 0 has (the caller orders
  // this with a barrier of another communicator). chunk_bytes: largest piece one call moves per rank.
  ShmGroup(const std::string& name, bool create, int64_t rank, int64_t size, int64_t chunk_bytes)
      : name_(name), rank_(rank), size_(size), chunk_(chunk_bytes) {
    TORCH_CHECK(size >= 1 && rank >= 0 && rank < size, "bad rank/size ", rank, "/", size);
    TORCH_CHECK(chunk_bytes > 0 && chunk_bytes % kLine == 0, "chunk_bytes must be a positive multiple of 64");
    bytes_ = size * kLine + 2 * size * chunk_ + 2 * chunk_;
    int fd = create ? shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600) : shm_open(name.c_str(), O_RDWR, 0600);
    TORCH_CHECK(fd >= 0, "shm_open(", name, ") failed: ", std::strerror(errno));
    if (create && ftruncate(fd, bytes_) != 0) {
      int err = errno;
      close(fd);
      shm_unlink(name.c_str());
      TORCH_CHECK(false, "ftruncate(", name, ", ", bytes_, ") failed: ", std::strerror(err));
    }
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    TORCH_CHECK(p != MAP_FAILED, "mmap(", name, ") failed: ", std::strerror(errno));
    base_ = static_cast<char*>(p);
    lines_ = reinterpret_cast<RankLine*>(base_);
    seq_ = lines_[rank_].seq.load(std::memory_order_acquire);  // 0 in a fresh segment (ftruncate zeroes)
    lines_[rank_].pid = static_cast<int64_t>(getpid());
  }

  ~ShmGroup() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }

  // Remove the name (every rank has mapped it): the memory lives until the last rank unmaps it.
  void unlink() { shm_unlink(name_.c_str()); }

  void set_timeout(double seconds) { timeout_s_ = seconds; }
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  int64_t chunk_bytes() const { return chunk_; }

  void barrier() {
    ++seq_;
    lines_[rank_].seq.store(seq_, std::memory_order_release);
    for (int64_t r = 0; r < size_; ++r) {
      if (r != rank_) wait_for(r, seq_);
    }
  }

  // In place: t = sum over ranks of t. t: contiguous CPU float32 / bfloat16 / float16.
  void all_reduce_(torch::Tensor t) {
    check(t);
    const int64_t elem = t.element_size();
    const int64_t per_call = chunk_ / elem;
    char* data = static_cast<char*>(t.data_ptr());
    const auto dtype = t.scalar_type();
    for (int64_t start = 0; start < t.numel(); start += per_call) {
      const int64_t n = std::min(per_call, t.numel() - start);
      const int parity = static_cast<int>(calls_++ & 1);
      char* mine = slot(parity, rank_);
      std::memcpy(mine, data + start * elem, n * elem);
      barrier();
      std::vector<const char*> srcs(size_);
      for (int64_t r = 0; r < size_; ++r) srcs[r] = slot(parity, r);
      char* dst = data + start * elem;
      if (n * elem <= kDirectBytes || size_ == 1) {
        reduce(dtype, dst, srcs, 0, n);
      } else {  // rank r reduces its slice into out[parity]; everyone then copies the whole of out[parity]
        char* out = out_slot(parity);
        const int64_t per = (n + size_ - 1) / size_;
        const int64_t b = std::min(n, rank_ * per), e = std::min(n, b + per);
        reduce(dtype, out, srcs, b, e);
        barrier();
        std::memcpy(dst, out, n * elem);
      }
    }
  }

  // out[r] = rank r's t, for every rank r. t: contiguous CPU tensor; out: [size, *t.shape], same dtype.
  void all_gather_into(torch::Tensor out, torch::Tensor t) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "all_gather: contiguous CPU tensor expected");
    TORCH_CHECK(out.is_contiguous() && out.scalar_type() == t.scalar_type() && out.numel() == t.numel() * size_,
                "all_gather: out must be a contiguous [size, *t.shape] tensor of t's dtype");
    const int64_t total = t.numel() * t.element_size();
    const char* src = static_cast<const char*>(t.data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    for (int64_t start = 0; start < total; start += chunk_) {
      const int64_t n = std::min(chunk_, total - start);
      const int parity = static_cast<int>(calls_++ & 1);
      std::memcpy(slot(parity, rank_), src + start, n);
      barrier();
      for (int64_t r = 0; r < size_; ++r) std::memcpy(dst + r * total + start, slot(parity, r), n);
    }
  }

  // The root's `data` to every rank: the root gets b"" back (it has the message), the others the root's bytes.
  // The receivers do not know the length: the first chunk carries it.
  pybind11::bytes broadcast_bytes(const std::string& data, int64_t root) {
    TORCH_CHECK(root >= 0 && root < size_, "broadcast: root out of range");
    std::string out;
    {
      pybind11::gil_scoped_release nogil;
      int64_t total = rank_ == root ? static_cast<int64_t>(data.size()) : -1;
      int64_t start = 0;
      do {
        const int parity = static_cast<int>(calls_++ & 1);
        char* src = slot(parity, root);
        const int64_t header = start == 0 ? static_cast<int64_t>(sizeof(int64_t)) : 0;
        if (rank_ == root) {
          if (header) std::memcpy(src, &total, sizeof(int64_t));
          std::memcpy(src + header, data.data() + start, std::min(chunk_ - header, total - start));
        }
        barrier();
        if (rank_ != root) {
          if (header) {
            std::memcpy(&total, src, sizeof(int64_t));
            out.resize(static_cast<size_t>(total));
          }
          std::memcpy(&out[0] + start, src + header, std::min(chunk_ - header, total - start));
        }
        start += std::min(chunk_ - header, total - start);
      } while (start < total);
    }
    return pybind11::bytes(out);
  }

 private:
  char* slot(int parity, int64_t r) const { return base_ + size_ * kLine + (parity * size_ + r) * chunk_; }
  char* out_slot(int parity) const { return base_ + size_ * kLine + 2 * size_ * chunk_ + parity * chunk_; }

  static void check(const torch::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "all_reduce: contiguous CPU tensor expected");
    const auto d = t.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "all_reduce: unsupported dtype ", d);
  }

  static void reduce(at::ScalarType dtype, char* dst, const std::vector<const char*>& srcs, int64_t b, int64_t e) {
    if (dtype == at::kFloat) {
      sum_f32(reinterpret_cast<float*>(dst), srcs, b, e);
    } else if (dtype == at::kBFloat16) {
      sum_bf16(reinterpret_cast<uint16_t*>(dst), srcs, b, e);
    } else {
      sum_f16(reinterpret_cast<at::Half*>(dst), srcs, b, e);
    }
  }

  void wait_for(int64_t r, uint64_t target) {
    std::atomic<uint64_t>& seq = lines_[r].seq;
    if (seq.load(std::memory_order_acquire) >= target) return;
    for (int i = 0; i < 4096; ++i) {
      SGL_PAUSE();
      if (seq.load(std::memory_order_acquire) >= target) return;
    }
    const auto start = std::chrono::steady_clock::now();
    auto last_check = start;
    uint64_t rounds = 0;
    while (seq.load(std::memory_order_acquire) < target) {
      ++rounds;
      if (rounds < 2000) {
        sched_yield();
        continue;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if ((rounds & 255) != 0) continue;
      const auto now = std::chrono::steady_clock::now();
      if (now - last_check < std::chrono::seconds(1)) continue;
      last_check = now;
      const pid_t pid = static_cast<pid_t>(lines_[r].pid);
      if (pid > 0 && process_gone(pid)) {
        throw std::runtime_error("shm collective: rank " + std::to_string(r) + " (pid " + std::to_string(pid) +
                                 ") of " + name_ + " has exited");
      }
      if (std::chrono::duration<double>(now - start).count() > timeout_s_) {
        throw std::runtime_error("shm collective: rank " + std::to_string(r) + " of " + name_ +
                                 " did not arrive within " + std::to_string(timeout_s_) + " s");
      }
    }
  }

  std::string name_;
  int64_t rank_, size_, chunk_;
  int64_t bytes_ = 0;
  char* base_ = nullptr;
  RankLine* lines_ = nullptr;
  uint64_t seq_ = 0;    // this rank's barrier count (mirrored in its header line)
  uint64_t calls_ = 0;  // chunks moved so far: every rank of the group makes the same calls in the same order
  double timeout_s_ = 365.0 * 24 * 3600;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<ShmGroup>(m, "ShmGroup")
      .def(pybind11::init<const std::string&, bool, int64_t, int64_t, int64_t>(), pybind11::arg("name"),
           pybind11::arg("create"), pybind11::arg("rank"), pybind11::arg("size"), pybind11::arg("chunk_bytes"))
      .def("unlink", &ShmGroup::unlink)
      .def("set_timeout", &ShmGroup::set_timeout)
      .def("barrier", &ShmGroup::barrier, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("all_reduce_", &ShmGroup::all_reduce_, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("all_gather_into", &ShmGroup::all_gather_into, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("broadcast_bytes", &ShmGroup::broadcast_bytes, pybind11::arg("data"), pybind11::arg("root"))
      .def_property_readonly("rank", &ShmGroup::rank)
      .def_property_readonly("size", &ShmGroup::size)
      .def_property_readonly("chunk_bytes", &ShmGroup::chunk_bytes);
}
