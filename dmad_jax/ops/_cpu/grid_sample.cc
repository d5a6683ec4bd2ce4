// dmad_jax.ops.grid_sample on CPU (forward and backward), as XLA FFI custom calls.
//
// XLA:CPU runs the image gradient of grid_sample (a scatter-add) single-threaded and slowly, and
// its forward pass as four separate gathers; these kernels make one pass over the sampling
// points on XLA's intra-op thread pool. The forward splits the points into chunks; the backward
// computes both gradients together, one image per task, visiting its points in order, so no
// result depends on the thread count.
//
// The arithmetic follows dmad_jax/ops/sampling.py (which follows torch's GridSampler.h)
// operation by operation in float32, compiled without FMA contraction: the forward pass is
// bit-identical to the XLA formulation and the backward pass differs only by summation order.
// Coordinates are computed for blocks of points in arrays, so that the compiler vectorises them.
//
// Layout: x (B..., H, W, C), grid (B..., Ho, Wo, 2) holding (x, y), out and g (B..., Ho, Wo, C);
// any number of leading batch dimensions (vmap adds them). The backward returns dx like x and
// dgrid like grid.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dmad_cpu::ParallelFor;

constexpr int32_t kBilinear = 0;
constexpr int32_t kNearest = 1;
constexpr int32_t kZeros = 0;
constexpr int32_t kBorder = 1;
constexpr int32_t kReflection = 2;

// Clamp to [0, size - 1]; the gradient factor is 1 strictly inside, else 0 (torch).
inline float Clip(float c, int32_t size, float* mult) {
  const float hi = static_cast<float>(size - 1);
  *mult = *mult * ((c > 0.0f && c < hi) ? 1.0f : 0.0f);
  return c <= 0.0f ? 0.0f : (c >= hi ? hi : c);
}

// Reflect into [twice_low / 2, twice_high / 2]; multiplies the gradient factor by +-1.
inline float Reflect(float c, int32_t twice_low, int32_t twice_high, float* mult) {
  if (twice_low == twice_high) {
    *mult = *mult * 0.0f;
    return 0.0f;
  }
  const float lo = static_cast<float>(twice_low / 2.0);
  const float span = static_cast<float>((twice_high - twice_low) / 2.0);
  c = c - lo;
  const float sign = c < 0.0f ? -1.0f : 1.0f;
  c = std::fabs(c);
  const float extra = std::fmod(c, span);
  const float flips = std::floor(c / span);
  const bool even = std::fmod(flips, 2.0f) == 0.0f;
  *mult = *mult * (even ? sign : -sign);
  return even ? extra + lo : (span - extra) + lo;
}

// Pixel coordinate of a normalised grid value, and d(coordinate)/d(grid) in *mult. Templated
// on the options so that the loops calling it have no branches and vectorise.
template <int32_t kPadding, bool kAlign>
inline float SourceIndex(float g, int32_t size, float* mult) {
  float c;
  if constexpr (kAlign) {
    c = (g + 1.0f) * 0.5f * static_cast<float>(size - 1);
    *mult = static_cast<float>(0.5 * static_cast<double>(size - 1));
  } else {
    c = ((g + 1.0f) * static_cast<float>(size) - 1.0f) * 0.5f;
    *mult = static_cast<float>(0.5 * static_cast<double>(size));
  }
  if constexpr (kPadding == kBorder) {
    c = Clip(c, size, mult);
  } else if constexpr (kPadding == kReflection) {
    float m1 = 1.0f, m2 = 1.0f;
    c = kAlign ? Reflect(c, 0, 2 * (size - 1), &m1) : Reflect(c, -1, 2 * size - 1, &m1);
    c = Clip(c, size, &m2);
    *mult = *mult * m1 * m2;
  }
  return c;
}

struct Shape {
  int64_t images, h, w, c, points;
};

// Where a block of up to kBlock consecutive grid points sample: for each corner (nw, ne, sw, se;
// only the first for nearest) the offset of its pixel in the image (-1 when outside it) and its
// weight, plus what the grid gradient needs. Kept as arrays so the compiler vectorises the
// coordinate arithmetic across points; the gathers and scatters that follow are scalar.
constexpr int64_t kBlock = 128;

struct Block {
  int32_t offset[4][kBlock];
  float weight[4][kBlock];
  float tx[kBlock], ty[kBlock], mx[kBlock], my[kBlock];
  int32_t x0[kBlock], y0[kBlock];  // top-left corner (nearest: the pixel), clamped
};

// Integer part of a whole-valued coordinate, clamped to [-2, size] first: anything outside that
// range is outside the image for both neighbours, and the clamp keeps the conversion defined.
// NaN maps to -2. (Ternaries rather than fmin/fmax: they vectorise.)
inline int32_t ToIndex(float f, int32_t size) {
  const float hi = static_cast<float>(size);
  f = f > -2.0f ? f : -2.0f;
  return static_cast<int32_t>(f < hi ? f : hi);
}

inline int32_t Offset(int32_t xi, int32_t yi, int32_t w, int32_t h, int32_t c) {
  const bool inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h);
  return inside ? (yi * w + xi) * c : -1;
}

// Two loops rather than one: GCC vectorises each of them, not their fusion.
template <int32_t kMode, int32_t kPadding, bool kAlign>
void LocateImpl(const Shape& s, const float* __restrict grid, int64_t n, Block* __restrict b) {
  // Sizes as locals: loop-invariant values the vectoriser can hoist.
  const int32_t w = static_cast<int32_t>(s.w), h = static_cast<int32_t>(s.h);
  const int32_t c = static_cast<int32_t>(s.c);
  for (int64_t i = 0; i < n; ++i) {
    const float ix = SourceIndex<kPadding, kAlign>(grid[2 * i], w, &b->mx[i]);
    const float iy = SourceIndex<kPadding, kAlign>(grid[2 * i + 1], h, &b->my[i]);
    if constexpr (kMode == kNearest) {
      // std::nearbyint rounds half to even (default rounding mode), like torch and jnp.round.
      b->x0[i] = ToIndex(std::nearbyint(ix), w);
      b->y0[i] = ToIndex(std::nearbyint(iy), h);
    } else {
      const float x0f = std::floor(ix);
      const float y0f = std::floor(iy);
      b->tx[i] = ix - x0f;
      b->ty[i] = iy - y0f;
      b->x0[i] = ToIndex(x0f, w);
      b->y0[i] = ToIndex(y0f, h);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t x0 = b->x0[i], y0 = b->y0[i];
    if constexpr (kMode == kNearest) {
      b->offset[0][i] = Offset(x0, y0, w, h, c);
      b->weight[0][i] = 1.0f;
    } else {
      const float tx = b->tx[i], ty = b->ty[i];
      b->offset[0][i] = Offset(x0, y0, w, h, c);
      b->offset[1][i] = Offset(x0 + 1, y0, w, h, c);
      b->offset[2][i] = Offset(x0, y0 + 1, w, h, c);
      b->offset[3][i] = Offset(x0 + 1, y0 + 1, w, h, c);
      b->weight[0][i] = (1.0f - tx) * (1.0f - ty);
      b->weight[1][i] = tx * (1.0f - ty);
      b->weight[2][i] = (1.0f - tx) * ty;
      b->weight[3][i] = tx * ty;
    }
  }
}

using LocateFn = void (*)(const Shape&, const float*, int64_t, Block*);

template <int32_t kMode, int32_t kPadding>
LocateFn PickAlign(bool align) {
  return align ? &LocateImpl<kMode, kPadding, true> : &LocateImpl<kMode, kPadding, false>;
}

template <int32_t kMode>
LocateFn PickPadding(int32_t padding, bool align) {
  if (padding == kBorder) return PickAlign<kMode, kBorder>(align);
  if (padding == kReflection) return PickAlign<kMode, kReflection>(align);
  return PickAlign<kMode, kZeros>(align);
}

// The coordinate routine for these options.
LocateFn PickLocate(int32_t mode, int32_t padding, bool align) {
  return mode == kNearest ? PickPadding<kNearest>(padding, align)
                          : PickPadding<kBilinear>(padding, align);
}

// Points [begin, end) of one image: out = ((w0 v0 + w1 v1) + w2 v2) + w3 v3, v = 0 outside.
// kC > 0 fixes the channel count at compile time (the few-channel images DMAD warps).
template <int64_t kC>
void ForwardPoints(const Shape& s, const float* __restrict x, const float* __restrict grid,
                   float* __restrict out, int64_t begin, int64_t end, int32_t mode,
                   int32_t padding, bool align) {
  const int64_t c = kC > 0 ? kC : s.c;
  const int corners = mode == kNearest ? 1 : 4;
  const LocateFn locate = PickLocate(mode, padding, align);
  Block b;
  for (int64_t p0 = begin; p0 < end; p0 += kBlock) {
    const int64_t n = std::min(kBlock, end - p0);
    locate(s, grid + 2 * p0, n, &b);
    for (int64_t i = 0; i < n; ++i) {
      float* o = out + (p0 + i) * c;
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = 0.0f;
      for (int k = 0; k < corners; ++k) {
        const float wk = b.weight[k][i];
        const int32_t off = b.offset[k][i];
        if (off < 0) {
          for (int64_t ch = 0; ch < c; ++ch) o[ch] += wk * 0.0f;
        } else {
          for (int64_t ch = 0; ch < c; ++ch) o[ch] += wk * x[off + ch];
        }
      }
    }
  }
}

// One image: dgrid for each of its points, and dx accumulated in point order.
template <int64_t kC>
void BackwardImage(const Shape& s, const float* __restrict x, const float* __restrict grid,
                   const float* __restrict g, float* __restrict dx, float* __restrict dgrid,
                   int32_t mode, int32_t padding, bool align) {
  std::fill(dx, dx + s.h * s.w * s.c, 0.0f);
  const int64_t c = kC > 0 ? kC : s.c;
  const int corners = mode == kNearest ? 1 : 4;
  const LocateFn locate = PickLocate(mode, padding, align);
  Block b;
  for (int64_t p0 = 0; p0 < s.points; p0 += kBlock) {
    const int64_t n = std::min(kBlock, s.points - p0);
    locate(s, grid + 2 * p0, n, &b);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = p0 + i;
      const float* gp = g + p * c;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int k = 0; k < corners; ++k) {
        const int32_t off = b.offset[k][i];
        if (off < 0) continue;
        const float wk = b.weight[k][i];
        float dot = 0.0f;
        for (int64_t ch = 0; ch < c; ++ch) {
          dot += x[off + ch] * gp[ch];
          dx[off + ch] += wk * gp[ch];
        }
        v[k] = dot;
      }
      if (mode == kNearest) {
        dgrid[2 * p] = 0.0f;
        dgrid[2 * p + 1] = 0.0f;
        continue;
      }
      const float tx = b.tx[i], ty = b.ty[i];
      const float d_ix = (v[1] - v[0]) * (1.0f - ty) + (v[3] - v[2]) * ty;
      const float d_iy = (v[2] - v[0]) * (1.0f - tx) + (v[3] - v[1]) * tx;
      dgrid[2 * p] = d_ix * b.mx[i];
      dgrid[2 * p + 1] = d_iy * b.my[i];
    }
  }
}

// Reads the shapes of x and grid (any leading batch dims) and checks the attributes.
ffi::Error ReadShape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& grid,
                     int32_t mode, int32_t padding, Shape* s) {
  const auto xd = x.dimensions();
  const auto gd = grid.dimensions();
  if (xd.size() < 3 || gd.size() != xd.size() || gd.back() != 2) {
    return ffi::Error::InvalidArgument(
      "dmad grid_sample: expected x (..., H, W, C) and grid (..., Ho, Wo, 2) of equal rank");
  }
  if (mode != kBilinear && mode != kNearest) {
    return ffi::Error::InvalidArgument("dmad grid_sample: unknown mode");
  }
  if (padding != kZeros && padding != kBorder && padding != kReflection) {
    return ffi::Error::InvalidArgument("dmad grid_sample: unknown padding");
  }
  const size_t r = xd.size();
  s->h = xd[r - 3];
  s->w = xd[r - 2];
  s->c = xd[r - 1];
  s->points = gd[r - 3] * gd[r - 2];
  if (s->h * s->w * s->c >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("dmad grid_sample: an image has 2^31 or more values");
  }
  s->images = 1;
  for (size_t i = 0; i + 3 < r; ++i) {
    if (xd[i] != gd[i]) return ffi::Error::InvalidArgument("dmad grid_sample: batch dims differ");
    s->images *= xd[i];
  }
  return ffi::Error::Success();
}

constexpr int64_t kPointsPerTask = 16384;

ffi::Error GridSampleFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grid,
                         ffi::ResultBuffer<ffi::F32> out, int32_t mode, int32_t padding,
                         int32_t align_corners) {
  Shape s;
  if (ffi::Error e = ReadShape(x, grid, mode, padding, &s); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* gridp = grid.typed_data();
  float* outp = out->typed_data();
  const bool align = align_corners != 0;
  auto points = &ForwardPoints<0>;
  if (s.c == 1) points = &ForwardPoints<1>;
  if (s.c == 2) points = &ForwardPoints<2>;
  if (s.c == 3) points = &ForwardPoints<3>;
  if (s.c == 4) points = &ForwardPoints<4>;
  const int64_t chunks = std::max<int64_t>(1, (s.points + kPointsPerTask - 1) / kPointsPerTask);
  ParallelFor(pool, s.images * chunks, [&](int64_t item) {
    const int64_t b = item / chunks;
    const int64_t begin = (item % chunks) * kPointsPerTask;
    const int64_t end = std::min(s.points, begin + kPointsPerTask);
    points(s, xp + b * s.h * s.w * s.c, gridp + b * s.points * 2, outp + b * s.points * s.c,
           begin, end, mode, padding, align);
  });
  return ffi::Error::Success();
}

ffi::Error GridSampleBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grid,
                         ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dgrid, int32_t mode, int32_t padding,
                         int32_t align_corners) {
  Shape s;
  if (ffi::Error e = ReadShape(x, grid, mode, padding, &s); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* gridp = grid.typed_data();
  const float* gp = g.typed_data();
  float* dxp = dx->typed_data();
  float* dgp = dgrid->typed_data();
  const bool align = align_corners != 0;
  auto image = &BackwardImage<0>;
  if (s.c == 1) image = &BackwardImage<1>;
  if (s.c == 2) image = &BackwardImage<2>;
  if (s.c == 3) image = &BackwardImage<3>;
  if (s.c == 4) image = &BackwardImage<4>;
  ParallelFor(pool, s.images, [&](int64_t b) {
    const int64_t in = s.h * s.w * s.c;
    image(s, xp + b * in, gridp + b * s.points * 2, gp + b * s.points * s.c, dxp + b * in,
          dgp + b * s.points * 2, mode, padding, align);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmadGridSampleFwd, GridSampleFwd,
                              ffi::Ffi::Bind()
                                .Ctx<ffi::ThreadPool>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Ret<ffi::Buffer<ffi::F32>>()
                                .Attr<int32_t>("mode")
                                .Attr<int32_t>("padding")
                                .Attr<int32_t>("align_corners"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmadGridSampleBwd, GridSampleBwd,
                              ffi::Ffi::Bind()
                                .Ctx<ffi::ThreadPool>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Ret<ffi::Buffer<ffi::F32>>()
                                .Ret<ffi::Buffer<ffi::F32>>()
                                .Attr<int32_t>("mode")
                                .Attr<int32_t>("padding")
                                .Attr<int32_t>("align_corners"));
