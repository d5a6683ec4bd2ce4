// Weight gradient of a 2-D convolution on CPU (NHWC input, HWIO kernel), as an XLA FFI call.
//
// XLA:CPU computes a convolution's weight gradient as one convolution with a window the size of
// the image, several times slower than oneDNN at DMAD's 256 x 256 layers
// (experiments/profile_conv_backward.py). Here it is a sum of small matrix products instead: for
// every output row (n, r), kernel row kh and column kw,
//
//   dW[kh, kw] += X[n, r*sh + kh - ph, w*sw + kw - pw, :]^T  G[n, r, w, :]   summed over w,
//
// a (Ci x Wo) by (Wo x Co) product of two image rows (cache-resident), register-tiled over 4
// input x up to 64 output channels with the sum over w innermost. Taps that fall into the
// zero padding are skipped.
//
// Layout: x (N, H, W, Ci), g (N, Ho, Wo, Co), dw (KH, KW, Ci, Co); attributes: strides (sh, sw)
// and the low paddings (ph, pw); no dilation, one group. The output rows are split into a fixed
// number of chunks, each summed into its own buffer on XLA's thread pool, and the buffers are
// added in chunk order: the result does not depend on the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dmad_cpu::ParallelFor;

template <int kN>
using Int = std::integral_constant<int, kN>;

// C(i, j) += sum_t a[t * lda + i] * b[t * ldb + j] for i < kR, j < kC, where C(i, j) is
// c[i * ldc + j], or c[j * ldc + i] when kT (transposed). The kR x kC accumulators stay in
// registers while t runs; the j loop is what the compiler vectorises.
template <int kR, int kC, bool kT>
inline void Tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                 int64_t k, float* __restrict c, int64_t ldc) {
  float acc[kR][kC];
  for (int i = 0; i < kR; ++i) {
    for (int j = 0; j < kC; ++j) acc[i][j] = 0.0f;
  }
  for (int64_t t = 0; t < k; ++t) {
    const float* at = a + t * lda;
    const float* bt = b + t * ldb;
    for (int i = 0; i < kR; ++i) {
      const float av = at[i];
      for (int j = 0; j < kC; ++j) acc[i][j] = std::fma(av, bt[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kR; ++i) {
    for (int j = 0; j < kC; ++j) {
      if constexpr (kT) {
        c[j * ldc + i] += acc[i][j];
      } else {
        c[i * ldc + j] += acc[i][j];
      }
    }
  }
}

// C += a^T b for a (k x rows, row stride lda) and b (k x cols, row stride ldb), in tiles of up
// to 64 columns (C as in Tile).
template <bool kT>
void Panel(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb, int64_t cols,
           int64_t k, float* c, int64_t ldc) {
  int64_t j = 0;
  auto block = [&](auto width, auto height) {
    constexpr int kC = decltype(width)::value;
    constexpr int kR = decltype(height)::value;
    auto at = [&](int64_t i) { return kT ? c + j * ldc + i : c + i * ldc + j; };
    int64_t i = 0;
    for (; i + kR <= rows; i += kR) Tile<kR, kC, kT>(a + i, lda, b + j, ldb, k, at(i), ldc);
    for (; i < rows; ++i) Tile<1, kC, kT>(a + i, lda, b + j, ldb, k, at(i), ldc);
  };
  for (; j + 64 <= cols; j += 64) block(Int<64>{}, Int<4>{});
  for (; j + 32 <= cols; j += 32) block(Int<32>{}, Int<8>{});
  for (; j + 16 <= cols; j += 16) block(Int<16>{}, Int<8>{});
  for (; j < cols; ++j) block(Int<1>{}, Int<8>{});
}

// dW (ci x co, rows contiguous) += x^T g for x (k x ci, row stride ldx) and g (k x co, rows
// contiguous). The wider of the two channel counts is the vectorised one: with few output
// channels (DMAD's 2- and 3-channel heads) the product is computed transposed.
void Product(const float* x, int64_t ldx, int64_t ci, const float* g, int64_t co, int64_t k,
             float* dw) {
  if (co >= 16 || co >= ci) {
    Panel<false>(x, ldx, ci, g, co, co, k, dw, co);
  } else {
    Panel<true>(g, co, co, x, ldx, ci, k, dw, co);
  }
}

// Floor division for a positive divisor.
inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct Dims {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, ph, pw;
};

// Adds the contributions of output rows [begin, end) (row = n * Ho + r) to dw.
void Rows(const Dims& d, const float* x, const float* g, int64_t begin, int64_t end, float* dw) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / d.ho, r = row % d.ho;
    const float* grow = g + row * d.wo * d.co;
    for (int64_t kh = 0; kh < d.kh; ++kh) {
      const int64_t src = r * d.sh + kh - d.ph;
      if (src < 0 || src >= d.h) continue;
      const float* xrow = x + (b * d.h + src) * d.w * d.ci;
      for (int64_t kw = 0; kw < d.kw; ++kw) {
        // Output columns w whose input column w * sw + kw - pw lies inside the image.
        const int64_t lo = std::max<int64_t>(0, -FloorDiv(kw - d.pw, d.sw));
        const int64_t hi = std::min<int64_t>(d.wo, FloorDiv(d.w - 1 - kw + d.pw, d.sw) + 1);
        if (hi <= lo) continue;
        Product(xrow + (lo * d.sw + kw - d.pw) * d.ci, d.sw * d.ci, d.ci, grow + lo * d.co, d.co,
                hi - lo, dw + (kh * d.kw + kw) * d.ci * d.co);
      }
    }
  }
}

constexpr int64_t kChunks = 8;

ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h, int64_t stride_w,
                          int64_t pad_h, int64_t pad_w) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] || wd[2] != xd[3] ||
      wd[3] != gd[3] || stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0) {
    return ffi::Error::InvalidArgument(
      "dmad conv weight gradient: expected x (N,H,W,Ci), g (N,Ho,Wo,Co), dw (KH,KW,Ci,Co), "
      "strides >= 1 and paddings >= 0");
  }
  const Dims d{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], wd[0], wd[1],
               stride_h, stride_w, pad_h, pad_w};
  const int64_t size = d.kh * d.kw * d.ci * d.co;
  const int64_t rows = d.n * d.ho;
  const int64_t chunks = std::max<int64_t>(1, std::min(kChunks, rows));
  std::vector<float> partial(chunks * size, 0.0f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  ParallelFor(pool, chunks, [&](int64_t c) {
    Rows(d, xp, gp, rows * c / chunks, rows * (c + 1) / chunks, partial.data() + c * size);
  });
  float* out = dw->typed_data();
  std::copy(partial.begin(), partial.begin() + size, out);
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = partial.data() + c * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmadConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                .Ctx<ffi::ThreadPool>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Ret<ffi::Buffer<ffi::F32>>()
                                .Attr<int64_t>("stride_h")
                                .Attr<int64_t>("stride_w")
                                .Attr<int64_t>("pad_h")
                                .Attr<int64_t>("pad_w"));
