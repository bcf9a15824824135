// The SlimAdamW step for float32 CPU parameters, one C call per block of rows.
//
// A block is `rows` rows of `ld` values (its row stride) in the parameter, its gradient and its first
// moment (float32, or bfloat16 rounded to nearest), cut along the columns into segments: [col_start, col_start + ncols) with its own second
// moment at v + v_offset, of one of four kinds:
//   FULL (0): ncols entries per row, exactly AdamW;
//   ROWS (1): one entry per row, the mean of g**2 over the segment's part of the row;
//   COLS (2): one entry per column, the mean of g**2 over the column;
//   ALL  (3): one entry, the mean of g**2 over the segment;
//   ROWS_FACTORED (4), COLS_FACTORED (5): ROWS or COLS with robust=True's factored second moment
//     (slimadam_hf/core/factored.py): the complement w at w + w_offset keeps the mean over the other dim
//     (one entry per column, or per row), and sqrt(v_hat) / bc2_sqrt = a * b with
//     a = sqrt(v) / bc2_sqrt, b = sqrt(w / mean(w)).
// Per element, with the entry's factor f = neg_step_size / (sqrt(v) / bc2_sqrt + eps), factored
// f = neg_step_size / (a * b + eps):
//   m <- lerp(m, g, 1 - beta1);  p <- p * decay + f * m
// One pass over the rows does everything while a row is in cache (a ROWS segment sums its part of the
// row, then updates it), so p, g and m are read from memory once. COLS, ALL and factored segments need
// every row's statistic first: one pass before reads their part of g.
// FULL rounds each operation as torch.optim.AdamW does (built with -ffp-contract=off: no implicit fused
// multiply-adds; the one in lerp is torch's own).
// Called through ctypes from slimadam_hf/core/fused.py; threads are ATen's intra-op pool.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Kind : int32_t { kFull = 0, kRows = 1, kCols = 2, kAll = 3, kRowsFactored = 4, kColsFactored = 5 };

inline bool needs_column_sums(int32_t kind) { return kind != kFull && kind != kRows; }

struct Hyper {
  float decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps;
};

// a second moment (or complement) entry's new value from its statistic, the mean of g**2
inline float ema(float moment, float mean_sq, const Hyper& h) {
  return moment * h.beta2 + h.one_minus_beta2 * mean_sq;
}

inline float factor(float v, const Hyper& h) {
  return h.neg_step_size / (std::sqrt(v) / h.bias_correction2_sqrt + h.eps);
}

// torch's lerp as its vectorized CPU kernel computes it (one fused multiply-add from the nearer end)
inline float lerp(float start, float end, float weight) {
  return std::abs(weight) < 0.5f ? std::fma(weight, end - start, start) : std::fma(weight - 1.f, end - start, end);
}

// The first moment is float32 or bfloat16 (its bits, rounded to nearest even as torch rounds; the stored
// value drives the update, as in the reference).
inline float load(const float* m, int64_t j) { return m[j]; }
inline float load(const uint16_t* m, int64_t j) {
  const uint32_t bits = static_cast<uint32_t>(m[j]) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline float store(float* m, int64_t j, float x) {
  m[j] = x;
  return x;
}
inline float store(uint16_t* m, int64_t j, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  m[j] = std::isnan(x) ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return load(m, j);
}

inline float sum_of_squares(const float* __restrict g, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += g[j] * g[j];
  return s;
}

// m and p of one row's segment, with one factor (f_row) or one per column (f_cols)
template <typename M>
inline void update(float* __restrict p, const float* __restrict g, M* __restrict m, int64_t n, float f_row,
                   const float* __restrict f_cols, const Hyper& h) {
  const float w = h.one_minus_beta1, decay = h.decay;
  if (f_cols == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float mj = store(m, j, lerp(load(m, j), g[j], w));
      p[j] = p[j] * decay + f_row * mj;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float mj = store(m, j, lerp(load(m, j), g[j], w));
      p[j] = p[j] * decay + f_cols[j] * mj;
    }
  }
}

// m and p of one row's factored segment: f = neg_step_size / (row_scale * col_scale[j] + eps)
template <typename M>
inline void update_factored(float* __restrict p, const float* __restrict g, M* __restrict m, int64_t n,
                            float row_scale, const float* __restrict col_scale, const Hyper& h) {
  const float w = h.one_minus_beta1, decay = h.decay;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float mj = store(m, j, lerp(load(m, j), g[j], w));
    p[j] = p[j] * decay + h.neg_step_size / (row_scale * col_scale[j] + h.eps) * mj;
  }
}

// torch.optim.AdamW's operations on one row's segment, rounded in its order
template <typename M>
inline void update_full(float* __restrict p, const float* __restrict g, M* __restrict m, float* __restrict v,
                        int64_t n, const Hyper& h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j] * h.decay;
    const float mj = store(m, j, lerp(load(m, j), g[j], h.one_minus_beta1));
    const float vj = v[j] * h.beta2 + h.one_minus_beta2 * g[j] * g[j];
    v[j] = vj;
    p[j] = pj + h.neg_step_size * mj / (std::sqrt(vj) / h.bias_correction2_sqrt + h.eps);
  }
}

template <typename M>
void step_block(float* p, const float* g, M* m, float* v, float* w, int64_t rows, int64_t ld, int32_t nseg,
                const int64_t* col_start, const int64_t* ncols, const int32_t* kinds, const int64_t* v_offset,
                const int64_t* w_offset, const Hyper& h) {
  if (rows <= 0 || ld <= 0) return;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / ld);

  // COLS, ALL and factored segments: column sums of g**2 over every row (one accumulator row per task;
  // COLS_FACTORED also keeps each row's sum), then per column of theirs a factor (COLS, ALL) or a scale
  // (factored: b for ROWS_FACTORED, a for COLS_FACTORED)
  std::vector<float> f_cols, row_sums, w_mean(nseg, 0.f);
  bool whole_column = false, factored_cols = false;
  for (int32_t s = 0; s < nseg; ++s) {
    whole_column |= needs_column_sums(kinds[s]);
    factored_cols |= kinds[s] == kColsFactored;
  }
  if (whole_column) {
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / grain));
    std::vector<float> acc(tasks * ld, 0.f);
    if (factored_cols) row_sums.assign(rows * nseg, 0.f);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* a = acc.data() + t * ld;
        for (int64_t r = rows * t / tasks; r < rows * (t + 1) / tasks; ++r) {
          for (int32_t s = 0; s < nseg; ++s) {
            if (!needs_column_sums(kinds[s])) continue;
            float* __restrict as = a + col_start[s];
            const float* __restrict gr = g + r * ld + col_start[s];
            float row_sum = 0.f;
#pragma omp simd reduction(+ : row_sum)
            for (int64_t j = 0; j < ncols[s]; ++j) {
              const float q = gr[j] * gr[j];
              as[j] += q;
              row_sum += q;
            }
            if (kinds[s] == kColsFactored) row_sums[s * rows + r] = row_sum;
          }
        }
      }
    });
    f_cols.assign(ld, 0.f);
    for (int32_t s = 0; s < nseg; ++s) {
      if (!needs_column_sums(kinds[s])) continue;
      float* vs = v + v_offset[s];
      std::vector<float> sums(ncols[s], 0.f);
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t j = 0; j < ncols[s]; ++j) sums[j] += acc[t * ld + col_start[s] + j];
      if (kinds[s] == kCols) {
        for (int64_t j = 0; j < ncols[s]; ++j) {
          vs[j] = ema(vs[j], sums[j] / static_cast<float>(rows), h);
          f_cols[col_start[s] + j] = factor(vs[j], h);
        }
      } else if (kinds[s] == kColsFactored) {  // a per column; w per row, its mean for b in the row pass
        float* ws = w + w_offset[s];
        double total = 0.0;
        for (int64_t j = 0; j < ncols[s]; ++j) {
          vs[j] = ema(vs[j], sums[j] / static_cast<float>(rows), h);
          f_cols[col_start[s] + j] = std::sqrt(vs[j]) / h.bias_correction2_sqrt;
        }
        for (int64_t r = 0; r < rows; ++r) {
          ws[r] = ema(ws[r], row_sums[s * rows + r] / static_cast<float>(ncols[s]), h);
          total += ws[r];
        }
        w_mean[s] = std::max(static_cast<float>(total / rows), std::numeric_limits<float>::min());
      } else if (kinds[s] == kRowsFactored) {  // w per column, and b from it; a comes with each row
        float* ws = w + w_offset[s];
        double total = 0.0;
        for (int64_t j = 0; j < ncols[s]; ++j) {
          ws[j] = ema(ws[j], sums[j] / static_cast<float>(rows), h);
          total += ws[j];
        }
        const float mean = std::max(static_cast<float>(total / ncols[s]), std::numeric_limits<float>::min());
        for (int64_t j = 0; j < ncols[s]; ++j) f_cols[col_start[s] + j] = std::sqrt(ws[j] / mean);
      } else {
        double total = 0.0;
        for (float x : sums) total += x;
        vs[0] = ema(vs[0], static_cast<float>(total / (static_cast<double>(rows) * ncols[s])), h);
        std::fill_n(f_cols.begin() + col_start[s], ncols[s], factor(vs[0], h));
      }
    }
  }

  // every row once: each segment's statistic (ROWS) and update while the row is in cache
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int32_t s = 0; s < nseg; ++s) {
        const int64_t at = r * ld + col_start[s], n = ncols[s];
        switch (kinds[s]) {
          case kFull:
            update_full(p + at, g + at, m + at, v + v_offset[s] + r * n, n, h);
            break;
          case kRows: {
            float& vr = v[v_offset[s] + r];
            vr = ema(vr, sum_of_squares(g + at, n) / static_cast<float>(n), h);
            update(p + at, g + at, m + at, n, factor(vr, h), nullptr, h);
            break;
          }
          case kRowsFactored: {
            float& vr = v[v_offset[s] + r];
            vr = ema(vr, sum_of_squares(g + at, n) / static_cast<float>(n), h);
            update_factored(p + at, g + at, m + at, n, std::sqrt(vr) / h.bias_correction2_sqrt,
                            f_cols.data() + col_start[s], h);
            break;
          }
          case kColsFactored:
            update_factored(p + at, g + at, m + at, n, std::sqrt(w[w_offset[s] + r] / w_mean[s]),
                            f_cols.data() + col_start[s], h);
            break;
          default:
            update(p + at, g + at, m + at, n, 0.f, f_cols.data() + col_start[s], h);
        }
      }
    }
  });
}

}  // namespace

// m: float32, or bfloat16 when momentum_bf16 is set; w: the factored segments' complements (or null)
extern "C" void slimadamw_block(float* p, const float* g, void* m, int32_t momentum_bf16, float* v, float* w,
                                int64_t rows, int64_t ld, int32_t nseg, const int64_t* col_start,
                                const int64_t* ncols, const int32_t* kinds, const int64_t* v_offset,
                                const int64_t* w_offset, float decay, float one_minus_beta1,
                                float beta2, float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt,
                                float eps) {
  const Hyper h{decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps};
  if (momentum_bf16)
    step_block(p, g, static_cast<uint16_t*>(m), v, w, rows, ld, nseg, col_start, ncols, kinds, v_offset, w_offset, h);
  else
    step_block(p, g, static_cast<float*>(m), v, w, rows, ld, nseg, col_start, ncols, kinds, v_offset, w_offset, h);
}
