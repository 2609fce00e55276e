// Training or prediction, for distbn's extension operators, which MXNet does not tell. The
// layer passes `probe`: MXNet's BatchNorm of [-1e15, +1e15] per channel with the layer's
// running statistics and momentum 1 (distbn/stats.py, mode_probe): about -1 in training
// (batch statistics), of magnitude ~1e15 / sqrt(running_var) in prediction.
#pragma once
#include <cmath>
#include "mxnet/lib_api.h"

// `first`: the probe's first value (read from host memory).
inline bool is_training(float first) { return std::fabs(first) < 2.f; }

// The probe has the type of the layer's running statistics: float32, or float64 after
// net.cast('float64').
inline bool is_training(mxnet::ext::MXTensor& probe) {
  return is_training(probe.dtype == mxnet::ext::kFloat64
                         ? static_cast<float>(probe.data<double>()[0]) : probe.data<float>()[0]);
}
