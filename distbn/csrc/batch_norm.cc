// distbn_batch_norm: training-mode batch norm of one worker's batch, float32, (N, C) or
// (N, C, H, W), on the CPU; loaded into MXNet through its extension API (lib_api.h, shipped in
// the MXNet wheel) by distbn/native.py.
//
//   inputs:  x, gamma (C), beta (C), moving_mean (C), moving_var (C)   (the last two mutated)
//   outputs: y (x's shape), mean (C), invstd (C) = 1 / sqrt(var + eps)
//   attrs:   eps, momentum   (moving = momentum * moving + (1 - momentum) * batch, biased var)
//
// Why: MXNet's fused kernel sums in float32 one value after another, which loses the variance
// of data far from zero, and fixing that with MXNet's own ops costs an extra pass and several
// calls per layer (each ~0.1 ms on a busy CPU). Here the sums are taken of x minus each
// channel's first value (of the order of the spread, so float32 row sums are exact enough),
// gathered per row into doubles; forward and backward are one call each, moving statistics
// included. Single-threaded: no second OpenMP runtime next to MXNet's.
#include <cmath>
#include <string>
#include <vector>
#include "mxnet/lib_api.h"

using namespace mxnet::ext;

namespace {

struct Dims { int64_t n, c, hw; };

Dims dims_of(const MXTensor& x) {
  Dims d{x.shape[0], x.shape[1], 1};
  for (size_t i = 2; i < x.shape.size(); ++i) d.hw *= x.shape[i];
  return d;
}

float attr(const std::unordered_map<std::string, std::string>& a, const char* k, float dflt) {
  auto it = a.find(k);
  return it == a.end() ? dflt : std::stof(it->second);
}

MXReturnValue forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                      const OpResource&) {
  const float eps = attr(attrs, "eps", 1e-5f), mom = attr(attrs, "momentum", 0.9f);
  MXTensor& X = (*in)[0];
  const Dims d = dims_of(X);
  const float* x = X.data<float>();
  const float* gamma = (*in)[1].data<float>();
  const float* beta = (*in)[2].data<float>();
  float* mm = (*in)[3].data<float>();
  float* mv = (*in)[4].data<float>();
  float* y = (*out)[0].data<float>();
  float* mean_out = (*out)[1].data<float>();
  float* invstd_out = (*out)[2].data<float>();
  const double count = static_cast<double>(d.n * d.hw);
  for (int64_t c = 0; c < d.c; ++c) {
    const float shift = x[c * d.hw];
    double s1 = 0, s2 = 0;
    for (int64_t i = 0; i < d.n; ++i) {
      const float* row = x + (i * d.c + c) * d.hw;
      float r1 = 0.f, r2 = 0.f;
      for (int64_t j = 0; j < d.hw; ++j) { const float v = row[j] - shift; r1 += v; r2 += v * v; }
      s1 += r1; s2 += r2;
    }
    const double mean_d = s1 / count;
    double var = s2 / count - mean_d * mean_d;
    if (var < 0) var = 0;
    const double mean = shift + mean_d;
    const float invstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float scale = gamma[c] * invstd, bias = beta[c] - static_cast<float>(mean) * scale;
    for (int64_t i = 0; i < d.n; ++i) {
      const float* row = x + (i * d.c + c) * d.hw;
      float* yrow = y + (i * d.c + c) * d.hw;
      for (int64_t j = 0; j < d.hw; ++j) yrow[j] = row[j] * scale + bias;
    }
    mean_out[c] = static_cast<float>(mean);
    invstd_out[c] = invstd;
    mm[c] = mom * mm[c] + (1 - mom) * static_cast<float>(mean);
    mv[c] = mom * mv[c] + (1 - mom) * static_cast<float>(var);
  }
  return MX_SUCCESS;
}

// MXNet hands backward the output gradients, then the inputs, then the outputs:
//   in:  dy, dmean, dinvstd, x, gamma, beta, moving_mean, moving_var, y, mean, invstd
//   out: dx, dgamma, dbeta (and zeros for the moving statistics when MXNet asks for them)
// dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over the batch.
MXReturnValue backward(const std::unordered_map<std::string, std::string>&,
                       std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                       const OpResource&) {
  MXTensor& X = (*in)[3];
  const Dims d = dims_of(X);
  const float* dy = (*in)[0].data<float>();
  const float* x = X.data<float>();
  const float* gamma = (*in)[4].data<float>();
  const float* mean = (*in)[9].data<float>();
  const float* invstd = (*in)[10].data<float>();
  float* dx = (*out)[0].data<float>();
  float* dgamma = (*out)[1].data<float>();
  float* dbeta = (*out)[2].data<float>();
  const double count = static_cast<double>(d.n * d.hw);
  for (int64_t c = 0; c < d.c; ++c) {
    const float m = mean[c], s = invstd[c];
    double sdy = 0, sdyx = 0;
    for (int64_t i = 0; i < d.n; ++i) {
      const float* row = x + (i * d.c + c) * d.hw;
      const float* g = dy + (i * d.c + c) * d.hw;
      float r1 = 0.f, r2 = 0.f;
      for (int64_t j = 0; j < d.hw; ++j) { r1 += g[j]; r2 += g[j] * (row[j] - m); }
      sdy += r1; sdyx += r2;
    }
    sdyx *= s;  // sum(dy * x_hat)
    const float k = gamma[c] * s;
    const float a = static_cast<float>(sdy / count), b = static_cast<float>(sdyx / count) * s;
    for (int64_t i = 0; i < d.n; ++i) {
      const float* row = x + (i * d.c + c) * d.hw;
      const float* g = dy + (i * d.c + c) * d.hw;
      float* o = dx + (i * d.c + c) * d.hw;
      for (int64_t j = 0; j < d.hw; ++j) o[j] = k * (g[j] - a - (row[j] - m) * b);
    }
    dgamma[c] = static_cast<float>(sdyx);
    dbeta[c] = static_cast<float>(sdy);
  }
  for (size_t k = 3; k < out->size(); ++k) {  // no gradient for the moving statistics
    float* z = (*out)[k].data<float>();
    for (int64_t i = 0; i < (*out)[k].size(); ++i) z[i] = 0.f;
  }
  return MX_SUCCESS;
}

MXReturnValue parse_attrs(const std::unordered_map<std::string, std::string>&, int* n_in, int* n_out) {
  *n_in = 5;
  *n_out = 3;
  return MX_SUCCESS;
}

MXReturnValue infer_type(const std::unordered_map<std::string, std::string>&,
                         std::vector<int>* in, std::vector<int>* out) {
  for (int t : *in) if (t != kFloat32) { MX_ERROR_MSG << "distbn batch norm: float32 only"; return MX_FAIL; }
  for (auto& t : *out) t = kFloat32;
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const std::unordered_map<std::string, std::string>&,
                          std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  const auto& x = (*in)[0];
  if (x.size() != 2 && x.size() != 4) { MX_ERROR_MSG << "distbn batch norm: 2-D or 4-D input"; return MX_FAIL; }
  (*out)[0] = x;
  (*out)[1] = {x[1]};
  (*out)[2] = {x[1]};
  return MX_SUCCESS;
}

MXReturnValue mutate_inputs(const std::unordered_map<std::string, std::string>&, std::vector<int>* idx) {
  idx->push_back(3);
  idx->push_back(4);
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(distbn_batch_norm)
.setParseAttrs(parse_attrs)
.setInferType(infer_type)
.setInferShape(infer_shape)
.setMutateInputs(mutate_inputs)
.setForward(forward, "cpu")
.setBackward(backward, "cpu");

MXReturnValue initialize(int version) {
  return version >= 10900 ? MX_SUCCESS : MX_FAIL;
}
