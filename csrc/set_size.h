// The largest set (elements per set, m and n) the native smooth-Chamfer kernels take: the CPU
// epilogue keeps per-column statistics in arrays of this size, the CUDA tile is a multiple of it.
// Both bindings export it as max_set_size.
#pragma once

namespace dive {

constexpr int kMaxSetSize = 32;

}  // namespace dive
