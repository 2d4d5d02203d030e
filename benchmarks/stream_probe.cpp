// The hypotheses behind decode_linear's one-row loop (csrc/cpu/decode_gemm.cpp: one_row_f32),
// measured outside torch: how fast one core reads a Qwen3-0.6B-sized weight stream, and what
// changes it. Standalone, one thread, process CPU time, median of interleaved repeats:
//
//   g++ -O3 -march=x86-64-v3 -o /tmp/stream_probe benchmarks/stream_probe.cpp && /tmp/stream_probe
//
// For each shape (the weight in panels [N / 32, K, 32], copies rotated past 256 MB so nothing
// stays in the 32 MB L3), with 4 KB pages and with transparent huge pages (2 MB-aligned,
// madvise(MADV_HUGEPAGE) before first touch):
//   read, 1 stream          a plain vector sum of the bytes in order (the one-stream limit)
//   read, 3 streams         the same bytes as 3 panels side by side (one_row_f32's order)
//   1 row, 1 panel          decode_linear's tile before: one panel at a time
//   1 row, 3 panels         one_row_f32: 3 panels in lockstep
//   1 row, 1 panel + pf X   one panel with a software prefetch X bytes ahead (hint t0/t1/nta)
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr int64_t PANEL = 32;
using vec = __m256;

double cpu_now() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

float* alloc(size_t bytes, bool huge) {  // 2 MB-aligned, huge pages asked for (or refused) before first touch
  const size_t align = 2 << 20, size = (bytes + align - 1) / align * align;
  void* p = mmap(nullptr, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  char* a = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + align - 1) / align * align);
  madvise(a, size, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return reinterpret_cast<float*>(a);
}

template <int S>  // S panels of K x 32 floats read side by side, 128 bytes of each per step
float read_panels(const float* w, int64_t panels, int64_t K) {
  vec acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm256_setzero_ps();
  for (int64_t p = 0; p + S <= panels; p += S)
    for (int64_t k = 0; k < K; ++k)
      _Pragma("GCC unroll 8") for (int s = 0; s < S; ++s) {
        const float* q = w + (p + s) * K * PANEL + k * PANEL;
        acc[s] = _mm256_add_ps(acc[s], _mm256_add_ps(_mm256_add_ps(_mm256_load_ps(q), _mm256_load_ps(q + 8)),
                                                     _mm256_add_ps(_mm256_load_ps(q + 16), _mm256_load_ps(q + 24))));
      }
  for (int s = 1; s < S; ++s) acc[0] = _mm256_add_ps(acc[0], acc[s]);  // every stream's sum used: none optimised away
  float o[8];
  _mm256_storeu_ps(o, acc[0]);
  return o[0] + o[7];
}

template <int P, int HINT = -1, int DIST = 0>  // one row, P panels in lockstep (+ a prefetch)
void one_row(const float* w, int64_t panels, int64_t K, const float* x, float* out) {
  for (int64_t p = 0; p + P <= panels; p += P) {
    vec acc[P][4];
    for (int q = 0; q < P; ++q)
      for (int v = 0; v < 4; ++v) acc[q][v] = _mm256_setzero_ps();
    const float* a = w + p * K * PANEL;
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (HINT >= 0)
        if (k % 2 == 0)  // 256 bytes (two k) per prefetch group
          for (int l = 0; l < 4; ++l)
            _mm_prefetch(reinterpret_cast<const char*>(a + k * PANEL) + DIST + 64 * l, static_cast<_mm_hint>(HINT));
      const vec xv = _mm256_broadcast_ss(x + k);
      _Pragma("GCC unroll 8") for (int q = 0; q < P; ++q)
        _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v)
          acc[q][v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(a + q * K * PANEL + k * PANEL + v * 8), acc[q][v]);
    }
    for (int q = 0; q < P; ++q)
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + (p + q) * PANEL + v * 8, acc[q][v]);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 5;
  struct Shape { const char* name; int64_t K, N; };
  const Shape shapes[] = {{"qkv 1024->4096", 1024, 4096}, {"gate_up 1024->6144", 1024, 6144},
                          {"down 3072->1024", 3072, 1024}, {"lm_head 1024->151936", 1024, 151872}};
  std::vector<float> x(4096, 0.5f), out(151936);
  volatile float sink = 0;
  for (const Shape& s : shapes) {
    const int64_t panels = s.N / PANEL;
    const size_t bytes = s.K * s.N * 4;
    const int copies = std::max<size_t>(1, 256e6 / bytes);
    float* W[2];
    for (int h = 0; h < 2; ++h) {
      W[h] = alloc(bytes * copies, h);
      for (size_t i = 0; i < bytes * copies / 4; ++i) W[h][i] = (i % 7) * 0.1f;
    }
    const std::vector<std::pair<std::string, std::function<void(const float*)>>> variants = {
        {"read, 1 stream", [&](const float* w) { sink = sink + read_panels<1>(w, panels, s.K); }},
        {"read, 3 streams", [&](const float* w) { sink = sink + read_panels<3>(w, panels, s.K); }},
        {"1 row, 1 panel", [&](const float* w) { one_row<1>(w, panels, s.K, x.data(), out.data()); }},
        {"1 row, 3 panels", [&](const float* w) { one_row<3>(w, panels, s.K, x.data(), out.data()); }},
        {"1 row, 1 panel + pf t0 1 KB", [&](const float* w) { one_row<1, _MM_HINT_T0, 1024>(w, panels, s.K, x.data(), out.data()); }},
        {"1 row, 1 panel + pf t1 8 KB", [&](const float* w) { one_row<1, _MM_HINT_T1, 8192>(w, panels, s.K, x.data(), out.data()); }},
        {"1 row, 1 panel + pf nta 2 KB", [&](const float* w) { one_row<1, _MM_HINT_NTA, 2048>(w, panels, s.K, x.data(), out.data()); }},
    };
    std::vector<std::vector<double>> t(2 * variants.size());
    for (int r = 0; r <= reps; ++r)  // interleaved; the first round warms up
      for (int h = 0; h < 2; ++h)
        for (size_t i = 0; i < variants.size(); ++i) {
          const double c0 = cpu_now();
          for (int c = 0; c < copies; ++c) variants[i].second(W[h] + c * bytes / 4);
          if (r) t[h * variants.size() + i].push_back((cpu_now() - c0) / copies);
        }
    for (size_t i = 0; i < variants.size(); ++i) {
      double gbs[2];
      for (int h = 0; h < 2; ++h) {
        auto& v = t[h * variants.size() + i];
        std::sort(v.begin(), v.end());
        gbs[h] = bytes / v[v.size() / 2] / 1e9;
      }
      printf("%-22s %-30s 4 KB pages %5.1f GB/s | huge pages %5.1f GB/s\n", s.name, variants[i].first.c_str(), gbs[0], gbs[1]);
    }
    fflush(stdout);
  }
  return 0;
}
