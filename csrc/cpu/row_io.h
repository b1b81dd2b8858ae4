// CPU helpers: load a run of elements of any I/O dtype as fp32, store fp32 back (round to nearest
// even). The dtype switch happens once per run, so the inner loops are typed.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../kernels.h"

namespace ditfast {
namespace cpu {

inline void load(const void* base, DType dt, int64_t off, int64_t n, float* dst) {
  switch (dt) {
    case DType::F32: {
      const float* p = static_cast<const float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = p[i];
      break;
    }
    case DType::BF16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    case DType::F16: {
      const c10::Half* p = static_cast<const c10::Half*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
  }
}

inline void store(void* base, DType dt, int64_t off, int64_t n, const float* src) {
  switch (dt) {
    case DType::F32: {
      float* p = static_cast<float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = src[i];
      break;
    }
    case DType::BF16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(src[i]);
      break;
    }
    case DType::F16: {
      c10::Half* p = static_cast<c10::Half*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(src[i]);
      break;
    }
  }
}

// Round n fp32 values in place to what dtype dt holds (nearest even); fp32: unchanged.
inline void round_to(DType dt, int64_t n, float* v) {
  if (dt == DType::BF16) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(c10::BFloat16(v[i]));
  } else if (dt == DType::F16) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(c10::Half(v[i]));
  }
}

inline int64_t roff(const Rows& t, int64_t b, int64_t l) { return b * t.sb + l * t.sl; }

}  // namespace cpu
}  // namespace ditfast
