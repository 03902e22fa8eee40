// Fused CPU kernels for the bandwidth-bound chains of a Mamba-2 mixer and the block norms:
// silu(depthwise causal conv) over packed documents, and (gated, grouped) RMSNorm, forward and
// backward. In PyTorch each is a chain of elementwise ops that streams its [T, X] activation
// through memory once per op (issue 18: the conv ran at 2 GFLOP/s and took 9% of a Hydra-29m step
// for 0.2% of its FLOPs); here each direction is one pass that keeps a row in registers/L1.
//
// Plain C entry points over raw pointers (loaded with ctypes by kernels/cpu/native.py, so the
// build needs no torch headers and takes about a second). The definitions of the ops are the
// pure-PyTorch references in pretrain/models/common/{causal_conv,fused_norm}.py; the tests
// compare against them in fp32 and fp64, forward and backward.
//
// Work is split into fixed tiles (rows of one sequence), never by thread: every tile writes its
// own outputs and its own partial weight gradients, which Python sums in a fixed order, so the
// results do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

// Run fn(tile) for tile in [0, n_tiles) on n_threads threads (the calling one included).
template <typename Fn>
void parallel_tiles(int64_t n_tiles, int n_threads, Fn&& fn) {
  const int64_t workers = std::min<int64_t>(std::max(n_threads, 1), n_tiles);
  if (workers <= 1) {
    for (int64_t i = 0; i < n_tiles; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t i = next.fetch_add(1); i < n_tiles; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t j = 1; j < workers; ++j) pool.emplace_back(work);
  } catch (...) {  // no more threads: the ones started and this one finish the tiles
  }
  work();
  for (auto& t : pool) t.join();
}

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// ---------------------------------------------------------------------------------------------
// silu(depthwise causal conv). x [B, T, X] with row strides (sxb, sxt) and unit channel stride;
// wt [K, X] (tap k multiplies position t - (K-1-k)); prefix [B, K-1, X] contiguous or null
// (zeros); doc [B, T] contiguous document ids or null (one document per row). A tap reading an
// earlier document reads zero; positions before t = 0 read the prefix, which continues the row's
// first document.

template <typename T>
struct Conv {
  const T* x;
  int64_t sxb, sxt;
  const T* wt;
  const T* bias;
  const T* prefix;
  const int64_t* doc;
  int64_t B, T_, X, K;

  // Input row of position u of sequence b (u < 0: the prefix), or null where it reads zero.
  const T* row(int64_t b, int64_t u) const {
    if (u >= 0) return x + b * sxb + u * sxt;
    return prefix ? prefix + (b * (K - 1) + (u + K - 1)) * X : nullptr;
  }
  // Does position u (u < 0: the prefix, first document) share t's document?
  bool same(int64_t b, int64_t u, int64_t t) const {
    if (!doc) return true;
    const int64_t* d = doc + b * T_;
    return d[u < 0 ? 0 : u] == d[t];
  }
  // pre[X] = bias + the taps at position t
  void pre_activation(int64_t b, int64_t t, T* __restrict__ pre) const {
    for (int64_t c = 0; c < X; ++c) pre[c] = bias[c];
    for (int64_t s = 0; s < K; ++s) {
      const T* __restrict__ r = row(b, t - s);
      if (!r || !same(b, t - s, t)) continue;
      const T* __restrict__ w = wt + (K - 1 - s) * X;
      for (int64_t c = 0; c < X; ++c) pre[c] += w[c] * r[c];
    }
  }
};

constexpr int64_t kConvTile = 64;  // time rows per tile

template <typename T>
void conv_silu_forward(const Conv<T>& a, T* out, int n_threads) {
  const int64_t per_seq = (a.T_ + kConvTile - 1) / kConvTile;
  parallel_tiles(a.B * per_seq, n_threads, [&](int64_t tile) {
    const int64_t b = tile / per_seq, t0 = (tile % per_seq) * kConvTile;
    const int64_t t1 = std::min(t0 + kConvTile, a.T_);
    for (int64_t t = t0; t < t1; ++t) {
      T* __restrict__ o = out + (b * a.T_ + t) * a.X;
      a.pre_activation(b, t, o);
      for (int64_t c = 0; c < a.X; ++c) o[c] = o[c] * sigmoid(o[c]);
    }
  });
}

// Backward, recomputing the conv. grad_out and grad_x [B, T, X] contiguous; grad_prefix
// [B, K-1, X] or null; grad_wt_tiles [tiles, K, X] and grad_bias_tiles [tiles, X] receive each
// tile's partial sums (tile = b * ceil(T / 64) + t0 / 64).
template <typename T>
void conv_silu_backward(const Conv<T>& a, const T* grad_out, T* grad_x, T* grad_prefix,
                        T* grad_wt_tiles, T* grad_bias_tiles, int n_threads) {
  const int64_t per_seq = (a.T_ + kConvTile - 1) / kConvTile, X = a.X, K = a.K;
  parallel_tiles(a.B * per_seq, n_threads, [&](int64_t tile) {
    const int64_t b = tile / per_seq, t0 = (tile % per_seq) * kConvTile;
    const int64_t t1 = std::min(t0 + kConvTile, a.T_);
    const int64_t t_end = std::min(t1 + K - 1, a.T_);  // grad_x[t] reads grad_pre up to t+K-1
    // grad_pre of rows t0 .. t_end-1: the silu's gradient at the recomputed pre-activation
    std::vector<T> gp((t_end - t0) * X);
    for (int64_t t = t0; t < t_end; ++t) {
      T* __restrict__ g = gp.data() + (t - t0) * X;
      const T* __restrict__ go = grad_out + (b * a.T_ + t) * X;
      a.pre_activation(b, t, g);
      for (int64_t c = 0; c < X; ++c) {
        const T p = g[c], sg = sigmoid(p);
        g[c] = go[c] * sg * (T(1) + p * (T(1) - sg));
      }
    }
    T* __restrict__ gw = grad_wt_tiles + tile * K * X;
    T* __restrict__ gb = grad_bias_tiles + tile * X;
    std::fill(gw, gw + K * X, T(0));
    std::fill(gb, gb + X, T(0));
    for (int64_t t = t0; t < t1; ++t) {
      const T* __restrict__ g = gp.data() + (t - t0) * X;
      for (int64_t c = 0; c < X; ++c) gb[c] += g[c];
      for (int64_t s = 0; s < K; ++s) {  // the weights: tap K-1-s read position t - s
        const T* __restrict__ r = a.row(b, t - s);
        if (!r || !a.same(b, t - s, t)) continue;
        T* __restrict__ w = gw + (K - 1 - s) * X;
        for (int64_t c = 0; c < X; ++c) w[c] += g[c] * r[c];
      }
    }
    // the input: position u fed tap K-1-s of output u + s
    auto input_grad = [&](int64_t u, T* __restrict__ dst) {
      for (int64_t c = 0; c < X; ++c) dst[c] = T(0);
      for (int64_t s = 0; s < K; ++s) {
        const int64_t t = u + s;
        if (t < 0 || t >= t_end || !a.same(b, u, t)) continue;
        const T* __restrict__ g = gp.data() + (t - t0) * X;
        const T* __restrict__ w = a.wt + (K - 1 - s) * X;
        for (int64_t c = 0; c < X; ++c) dst[c] += g[c] * w[c];
      }
    };
    for (int64_t u = t0; u < t1; ++u) input_grad(u, grad_x + (b * a.T_ + u) * X);
    if (grad_prefix && t0 == 0) {
      for (int64_t u = -(K - 1); u < 0; ++u) input_grad(u, grad_prefix + (b * (K - 1) + u + K - 1) * X);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over groups of gs channels, optionally gated: out = rmsnorm(x * silu(gate)) * w.
// x and gate [N, E] with row strides (sx, sg) and unit channel stride; gate may be null.

template <typename T>
struct Norm {
  const T* x;
  int64_t sx;
  const T* gate;
  int64_t sg;
  const T* w;
  int64_t N, E, gs;
  T eps;

  // g[E] = x * silu(gate) of row n
  void gated(int64_t n, T* __restrict__ g) const {
    const T* __restrict__ xr = x + n * sx;
    if (!gate) {
      for (int64_t c = 0; c < E; ++c) g[c] = xr[c];
      return;
    }
    const T* __restrict__ z = gate + n * sg;
    for (int64_t c = 0; c < E; ++c) g[c] = z[c] * sigmoid(z[c]) * xr[c];
  }
};

constexpr int64_t kNormTile = 32;  // rows per tile

template <typename T>
void rms_norm_forward(const Norm<T>& a, T* out, T* rstd, int n_threads) {
  const int64_t G = a.E / a.gs;
  parallel_tiles((a.N + kNormTile - 1) / kNormTile, n_threads, [&](int64_t tile) {
    const int64_t n1 = std::min((tile + 1) * kNormTile, a.N);
    for (int64_t n = tile * kNormTile; n < n1; ++n) {
      T* __restrict__ o = out + n * a.E;
      a.gated(n, o);
      for (int64_t grp = 0; grp < G; ++grp) {
        T* __restrict__ og = o + grp * a.gs;
        const T* __restrict__ w = a.w + grp * a.gs;
        T ss = 0;
        for (int64_t c = 0; c < a.gs; ++c) ss += og[c] * og[c];
        const T r = T(1) / std::sqrt(ss / T(a.gs) + a.eps);
        rstd[n * G + grp] = r;
        for (int64_t c = 0; c < a.gs; ++c) og[c] = og[c] * r * w[c];
      }
    }
  });
}

// grad_out [N, E] contiguous; grad_x, grad_gate (or null) [N, E] contiguous; grad_w_tiles
// [tiles, E] receives each tile's partial sum (tile = n / 32).
template <typename T>
void rms_norm_backward(const Norm<T>& a, const T* rstd, const T* grad_out, T* grad_x,
                       T* grad_gate, T* grad_w_tiles, int n_threads) {
  const int64_t G = a.E / a.gs, E = a.E, gs = a.gs;
  parallel_tiles((a.N + kNormTile - 1) / kNormTile, n_threads, [&](int64_t tile) {
    std::vector<T> normed(E), d(E);
    T* __restrict__ gw = grad_w_tiles + tile * E;
    std::fill(gw, gw + E, T(0));
    const int64_t n1 = std::min((tile + 1) * kNormTile, a.N);
    for (int64_t n = tile * kNormTile; n < n1; ++n) {
      const T* __restrict__ go = grad_out + n * E;
      T* __restrict__ h = normed.data();
      T* __restrict__ dd = d.data();
      a.gated(n, h);
      for (int64_t grp = 0; grp < G; ++grp) {
        const int64_t c0 = grp * gs;
        const T r = rstd[n * G + grp];
        T dot = 0;
        for (int64_t c = c0; c < c0 + gs; ++c) {
          h[c] *= r;
          gw[c] += go[c] * h[c];
          dd[c] = go[c] * a.w[c];
          dot += dd[c] * h[c];
        }
        dot /= T(gs);
        // d loss / d (x * silu(gate)) = r * (d - normed * mean(d * normed)), per group
        for (int64_t c = c0; c < c0 + gs; ++c) dd[c] = r * (dd[c] - h[c] * dot);
      }
      T* __restrict__ gx = grad_x + n * E;
      if (!a.gate) {
        for (int64_t c = 0; c < E; ++c) gx[c] = dd[c];
        continue;
      }
      const T* __restrict__ xr = a.x + n * a.sx;
      const T* __restrict__ z = a.gate + n * a.sg;
      T* __restrict__ gz = grad_gate + n * E;
      for (int64_t c = 0; c < E; ++c) {
        const T sg = sigmoid(z[c]);
        gx[c] = dd[c] * z[c] * sg;
        gz[c] = dd[c] * xr[c] * sg * (T(1) + z[c] * (T(1) - sg));
      }
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C entry points, one per op, direction and dtype (f32: float, f64: double).

#define HYDRA_CPU_ENTRY_POINTS(T, SUFFIX)                                                          \
  extern "C" void conv_silu_forward_##SUFFIX(const T* x, int64_t sxb, int64_t sxt, const T* wt,  \
                                             const T* bias, const T* prefix, const int64_t* doc, \
                                             int64_t B, int64_t Tn, int64_t X, int64_t K, T* out, \
                                             int n_threads) {                                     \
    conv_silu_forward(Conv<T>{x, sxb, sxt, wt, bias, prefix, doc, B, Tn, X, K}, out, n_threads);  \
  }                                                                                                \
  extern "C" void conv_silu_backward_##SUFFIX(                                                     \
      const T* x, int64_t sxb, int64_t sxt, const T* wt, const T* bias, const T* prefix,          \
      const int64_t* doc, int64_t B, int64_t Tn, int64_t X, int64_t K, const T* grad_out,         \
      T* grad_x, T* grad_prefix, T* grad_wt_tiles, T* grad_bias_tiles, int n_threads) {           \
    conv_silu_backward(Conv<T>{x, sxb, sxt, wt, bias, prefix, doc, B, Tn, X, K}, grad_out,        \
                       grad_x, grad_prefix, grad_wt_tiles, grad_bias_tiles, n_threads);           \
  }                                                                                                \
  extern "C" void rms_norm_forward_##SUFFIX(const T* x, int64_t sx, const T* gate, int64_t sg,    \
                                            const T* w, int64_t N, int64_t E, int64_t gs,        \
                                            double eps, T* out, T* rstd, int n_threads) {         \
    rms_norm_forward(Norm<T>{x, sx, gate, sg, w, N, E, gs, T(eps)}, out, rstd, n_threads);         \
  }                                                                                                \
  extern "C" void rms_norm_backward_##SUFFIX(                                                      \
      const T* x, int64_t sx, const T* gate, int64_t sg, const T* w, int64_t N, int64_t E,        \
      int64_t gs, double eps, const T* rstd, const T* grad_out, T* grad_x, T* grad_gate,          \
      T* grad_w_tiles, int n_threads) {                                                            \
    rms_norm_backward(Norm<T>{x, sx, gate, sg, w, N, E, gs, T(eps)}, rstd, grad_out, grad_x,      \
                      grad_gate, grad_w_tiles, n_threads);                                        \
  }

HYDRA_CPU_ENTRY_POINTS(float, f32)
HYDRA_CPU_ENTRY_POINTS(double, f64)

// Tiles of each op, for the Python side's partial-sum buffers.
extern "C" int64_t conv_tile_rows() { return kConvTile; }
extern "C" int64_t norm_tile_rows() { return kNormTile; }
