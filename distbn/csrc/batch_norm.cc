// distbn's batch-norm operators for the CPU: float32, float64 or float16 data of any
// rank >= 2 with channels on axis 1; parameters and running statistics float64 with float64
// data, float32 otherwise (as MXNet's BatchNorm keeps them); half precision is computed in
// float32 and stored back in its own type. Loaded into MXNet through its
// extension API (lib_api.h, shipped in the MXNet wheel) by distbn/native.py. Usable
// imperatively and inside hybridized graphs (mx.sym ops too).
//
//   distbn_bn_stats(x) -> L                       L: float64 (1 + 2C,) = [n, n*m (C), n*(v + m^2) (C)]
//       this worker's count, and its mean m and biased variance v packed so that a sum over
//       workers gives the global count, sum and sum of squares.
//   distbn_bn_apply(x, G, probe, gamma, beta, running_mean, running_var) -> y
//       G: a sum of L over workers (or L itself); probe: see below; running_* mutated.
//       attrs: eps, momentum, fix_gamma (gamma read as 1)
//
// Why statistics are packed that way: m and v are summed from x minus each channel's first
// value (of the order of the spread, so row sums in the data's type are exact enough), then
// combined in double: the global variance S2/N - mu^2 keeps ~1e-16 * mu^2 of error (1e-8 at a mean of 1e4),
// where MXNet's own kernel, summing raw float32 values one after another, loses it all.
//
// Training or prediction: extension operators are not told MXNet's is_train flag, so the layer
// passes `probe` (mode.h says what it is and how it is read).
//
// Backward. The statistics come from all workers: this op returns g * invstd * dy for x and the
// gradient with respect to G; the all-reduce's backward sums that over workers, and
// distbn_bn_stats' backward turns it into the rest of dx (MXNet adds the two). One worker's
// statistics are MXNet's own BatchNorm's business (distbn/layers.py), not these operators'.
//
// Channels are processed in parallel with OpenMP (OMP_NUM_THREADS threads) when the tensor is
// large enough to pay for it; MXNet links the system's libgomp, and so does this library, so
// both share one OpenMP runtime.
#include <cmath>
#include <string>
#include <utility>
#include <vector>
#include "mxnet/lib_api.h"
#include "mode.h"

using namespace mxnet::ext;

namespace {

using Attrs = std::unordered_map<std::string, std::string>;

struct Dims { int64_t n, c, hw; };  // (N, C, everything after axis 1)

// ---- data types ----------------------------------------------------------------------------
// Storage types of x, y, dx, dy: float32, float64, float16; each is read into Real<T> (float,
// double for double), the type of the arithmetic within a row and of the parameters and
// running statistics. (bfloat16 never gets here: MXNet's extension API cannot pass it to an
// operator, so the layer casts it; under AMP, MXNet casts it before the layer's reshape.)
using f16 = _Float16;  // GCC >= 12 on x86-64 and aarch64

template <typename T> struct RealOf { using type = float; };
template <> struct RealOf<double> { using type = double; };
template <typename T> using Real = typename RealOf<T>::type;

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(f16 v) { return static_cast<float>(v); }

template <typename T> T store(Real<T> v) { return static_cast<T>(v); }

// The parameters' type code for data of type code t.
int real_code(int t) { return t == kFloat64 ? kFloat64 : kFloat32; }

const char* type_name(int t) {
  switch (t) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case 12: return "bfloat16";  // mshadow's code; lib_api.h's enum has no name for it
    default: return "a non-float type";
  }
}

MXReturnValue type_error(const char* what, int t, const char* want) {
  MX_ERROR_MSG << "distbn batch norm: " << what << " is " << type_name(t) << ", expected " << want;
  return MX_FAIL;
}

// fn(T{}) for the storage type T of type code t.
template <typename Fn>
MXReturnValue by_type(int t, Fn fn) {
  switch (t) {
    case kFloat32: return fn(float{});
    case kFloat64: return fn(double{});
    case kFloat16: return fn(f16{});
    default: return type_error("x", t, "float32, float64 or float16");
  }
}

Dims dims_of(MXTensor& x) {
  Dims d{x.shape[0], x.shape[1], 1};
  for (size_t i = 2; i < x.shape.size(); ++i) d.hw *= x.shape[i];
  return d;
}

// Below this many elements a parallel region costs more than it saves (a few microseconds).
constexpr int64_t kParallelMin = 1 << 15;

double attr(const Attrs& a, const char* k, double dflt) {
  auto it = a.find(k);
  return it == a.end() ? dflt : std::stod(it->second);
}

bool flag(const Attrs& a, const char* k) {
  auto it = a.find(k);
  return it != a.end() && (it->second == "1" || it->second == "True" || it->second == "true");
}

void zero(MXTensor* t) {
  if (t->dtype == kFloat64) {
    double* p = t->data<double>();
    for (int64_t i = 0; i < t->size(); ++i) p[i] = 0;
  } else {
    float* p = t->data<float>();
    for (int64_t i = 0; i < t->size(); ++i) p[i] = 0.f;
  }
}

// Per channel c: the sums of f1(a, b) and of f2(a, b) over N and the trailing axes, in one
// pass; in Real<T> within a row (vectorized: summed in any order), double across rows. ``b``
// may be null (then f1, f2 get a twice).
template <typename T, typename F1, typename F2>
std::pair<double, double> channel_sums(const T* a, const T* b, const Dims& d, int64_t c,
                                       F1 f1, F2 f2) {
  double s1 = 0, s2 = 0;
  for (int64_t i = 0; i < d.n; ++i) {
    const T* ra = a + (i * d.c + c) * d.hw;
    const T* rb = b ? b + (i * d.c + c) * d.hw : ra;
    Real<T> r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
    for (int64_t j = 0; j < d.hw; ++j) {
      const Real<T> u = widen(ra[j]), v = widen(rb[j]);
      r1 += f1(u, v);
      r2 += f2(u, v);
    }
    s1 += r1;
    s2 += r2;
  }
  return {s1, s2};
}

// ---- distbn_bn_stats ---------------------------------------------------------------------

template <typename T>
MXReturnValue stats_forward_t(std::vector<MXTensor>* in, std::vector<MXTensor>* out) {
  MXTensor& X = (*in)[0];
  const Dims d = dims_of(X);
  using R = Real<T>;
  const T* x = X.data<T>();
  double* L = (*out)[0].data<double>();
  const double n = static_cast<double>(d.n * d.hw);
  L[0] = n;
  if (n == 0) {  // an empty batch (numpy mode): it adds nothing to the sums
    for (int64_t k = 1; k < 1 + 2 * d.c; ++k) L[k] = 0;
    return MX_SUCCESS;
  }
#pragma omp parallel for if (d.n * d.c * d.hw >= kParallelMin)
  for (int64_t c = 0; c < d.c; ++c) {
    const R shift = widen(x[c * d.hw]);
    const auto [s1, s2] = channel_sums(
        x, static_cast<const T*>(nullptr), d, c, [shift](R v, R) { return v - shift; },
        [shift](R v, R) { const R e = v - shift; return e * e; });
    const double md = s1 / n;
    const double var = std::max(s2 / n - md * md, 0.0);
    const double m = shift + md;
    L[1 + c] = n * m;
    L[1 + d.c + c] = n * (var + m * m);
  }
  return MX_SUCCESS;
}

MXReturnValue stats_forward(const Attrs&, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                            const OpResource&) {
  return by_type((*in)[0].dtype, [&](auto t) { return stats_forward_t<decltype(t)>(in, out); });
}

// in: dL, x, L   out: dx.  L1 = sum(x), L2 = sum(x^2), so dx = dL1 + 2 dL2 x, computed as
// (dL1 + 2 dL2 m) + 2 dL2 (x - m) with m the local mean: the first term is formed in double,
// where its two parts cancel when the data sit far from zero.
template <typename T>
MXReturnValue stats_backward_t(std::vector<MXTensor>* in, std::vector<MXTensor>* out) {
  const double* dL = (*in)[0].data<double>();
  MXTensor& X = (*in)[1];
  const double* L = (*in)[2].data<double>();
  const Dims d = dims_of(X);
  using R = Real<T>;
  const T* x = X.data<T>();
  T* dx = (*out)[0].data<T>();
#pragma omp parallel for if (d.n * d.c * d.hw >= kParallelMin)
  for (int64_t c = 0; c < d.c; ++c) {
    const double m = L[1 + c] / L[0];
    const R a = static_cast<R>(dL[1 + c] + 2 * dL[1 + d.c + c] * m);
    const R b = static_cast<R>(2 * dL[1 + d.c + c]);
    const R mr = static_cast<R>(m);
    for (int64_t i = 0; i < d.n; ++i) {
      const T* row = x + (i * d.c + c) * d.hw;
      T* o = dx + (i * d.c + c) * d.hw;
#pragma omp simd
      for (int64_t j = 0; j < d.hw; ++j) o[j] = store<T>(a + b * (widen(row[j]) - mr));
    }
  }
  return MX_SUCCESS;
}

MXReturnValue stats_backward(const Attrs&, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                             const OpResource&) {
  return by_type((*in)[1].dtype, [&](auto t) { return stats_backward_t<decltype(t)>(in, out); });
}

MXReturnValue stats_parse(const Attrs&, int* n_in, int* n_out) {
  *n_in = 1;
  *n_out = 1;
  return MX_SUCCESS;
}

// Type functions only fill in what they can and never fail: MXNet's AMP calls them with trial
// types while it converts a graph (and stops on a failure instead of trying another), so the
// kernels check the types they are given and fail with the message.
// The one refusal: bfloat16 (mshadow's 12), which MXNet's extension API cannot pass to an
// operator (AMP never sends it here: it runs the layer's reshape in float32).
MXReturnValue stats_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] == 12) {
    MX_ERROR_MSG << "distbn batch norm: bfloat16 data cannot reach distbn's operators inside a "
                    "graph (MXNet's extension API cannot pass bfloat16): use MXNet's AMP "
                    "(amp.init or amp.convert_hybrid_block), which hands the layer float32";
    return MX_FAIL;
  }
  (*out)[0] = kFloat64;
  return MX_SUCCESS;
}

bool known(const std::vector<unsigned int>& s) {  // unknown dims come as 0 or as -1
  if (s.empty()) return false;
  for (unsigned v : s) if (v == 0 || v == static_cast<unsigned>(-1)) return false;
  return true;
}

MXReturnValue stats_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  const auto& x = (*in)[0];
  if (x.size() < 2) { MX_ERROR_MSG << "distbn batch norm: input needs a channel axis 1"; return MX_FAIL; }
  (*out)[0] = {1 + 2 * x[1]};
  return MX_SUCCESS;
}

// ---- distbn_bn_apply ---------------------------------------------------------------------

struct Channel { double mean, var; };

// Mean and biased variance of channel c: from G in training, the running values otherwise.
template <typename T>
Channel channel_stats(const double* G, int64_t C, int64_t c, bool training,
                      const T* rm, const T* rv) {
  if (!training) return {rm[c], rv[c]};
  const double mean = G[1 + c] / G[0];
  return {mean, std::max(G[1 + C + c] / G[0] - mean * mean, 0.0)};
}

template <typename T>
MXReturnValue apply_forward_t(const Attrs& attrs, std::vector<MXTensor>* in,
                              std::vector<MXTensor>* out) {
  const double eps = attr(attrs, "eps", 1e-5);
  // MXNet's BatchNorm keeps momentum as a float32 (0.9f): the same value here, which shows
  // in float64 running statistics (2e-8 relative).
  const double mom = static_cast<float>(attr(attrs, "momentum", 0.9));
  const bool fix_gamma = flag(attrs, "fix_gamma");
  MXTensor& X = (*in)[0];
  const Dims d = dims_of(X);
  using R = Real<T>;
  const T* x = X.data<T>();
  const double* G = (*in)[1].data<double>();
  const bool training = is_training((*in)[2]);
  const R* gamma = (*in)[3].data<R>();
  const R* beta = (*in)[4].data<R>();
  R* rm = (*in)[5].data<R>();
  R* rv = (*in)[6].data<R>();
  T* y = (*out)[0].data<T>();
  // A global batch of no examples (every worker's empty): nothing to normalize, and the
  // running statistics stay as they were (PyTorch's rule).
  if (training && G[0] == 0) return MX_SUCCESS;
#pragma omp parallel for if (d.n * d.c * d.hw >= kParallelMin)
  for (int64_t c = 0; c < d.c; ++c) {
    const Channel s = channel_stats(G, d.c, c, training, rm, rv);
    const double invstd = 1.0 / std::sqrt(s.var + eps);
    const double scale = (fix_gamma ? 1.0 : gamma[c]) * invstd;
    const R k = static_cast<R>(scale), m = static_cast<R>(s.mean), b = beta[c];
    for (int64_t i = 0; i < d.n; ++i) {
      const T* row = x + (i * d.c + c) * d.hw;
      T* yrow = y + (i * d.c + c) * d.hw;
#pragma omp simd
      for (int64_t j = 0; j < d.hw; ++j) yrow[j] = store<T>((widen(row[j]) - m) * k + b);
    }
    if (training) {  // moving = momentum * moving + (1 - momentum) * batch, biased variance
      rm[c] = static_cast<R>(mom * rm[c] + (1 - mom) * s.mean);
      rv[c] = static_cast<R>(mom * rv[c] + (1 - mom) * s.var);
    }
  }
  return MX_SUCCESS;
}

MXReturnValue apply_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                            std::vector<MXTensor>* out, const OpResource&) {
  static const char* names[] = {"x", "G", "probe", "gamma", "beta", "running_mean", "running_var"};
  const int t = (*in)[0].dtype;
  if ((*in)[1].dtype != kFloat64) return type_error("G", (*in)[1].dtype, "float64");
  for (size_t i = 2; i < in->size(); ++i)
    if ((*in)[i].dtype != real_code(t)) {
      MX_ERROR_MSG << "distbn batch norm: " << names[i] << " is " << type_name((*in)[i].dtype)
                   << " for " << type_name(t) << " data, expected " << type_name(real_code(t))
                   << " (float64 parameters go with float64 data: net.cast('float64'))";
      return MX_FAIL;
    }
  return by_type(t, [&](auto v) { return apply_forward_t<decltype(v)>(attrs, in, out); });
}

// in:  dy, x, G, probe, gamma, beta, running_mean, running_var, y
// out: dx, dG, dprobe, dgamma, dbeta, (d running_mean, d running_var when MXNet asks)
template <typename T>
MXReturnValue apply_backward_t(const Attrs& attrs, std::vector<MXTensor>* in,
                               std::vector<MXTensor>* out) {
  const double eps = attr(attrs, "eps", 1e-5);
  const bool fix_gamma = flag(attrs, "fix_gamma");
  using R = Real<T>;
  const T* dy = (*in)[0].data<T>();
  MXTensor& X = (*in)[1];
  const Dims d = dims_of(X);
  const T* x = X.data<T>();
  const double* G = (*in)[2].data<double>();
  const bool training = is_training((*in)[3]);
  const R* gamma = (*in)[4].data<R>();
  const R* rm = (*in)[6].data<R>();
  const R* rv = (*in)[7].data<R>();
  T* dx = (*out)[0].data<T>();
  double* dG = (*out)[1].data<double>();
  R* dgamma = (*out)[3].data<R>();
  R* dbeta = (*out)[4].data<R>();
  zero(&(*out)[1]);  // the count's entry stays 0: n is not a function of x
  for (size_t k = 2; k < out->size(); ++k) if (k != 3 && k != 4) zero(&(*out)[k]);
  const double N = training ? G[0] : 1.0;
  if (N == 0) {  // an empty global batch: every gradient is 0 (dx has no elements)
    for (int64_t c = 0; c < d.c; ++c) dgamma[c] = dbeta[c] = R(0);
    return MX_SUCCESS;
  }
#pragma omp parallel for if (d.n * d.c * d.hw >= kParallelMin)
  for (int64_t c = 0; c < d.c; ++c) {
    const Channel s = channel_stats(G, d.c, c, training, rm, rv);
    const double invstd = 1.0 / std::sqrt(s.var + eps);
    const double g = fix_gamma ? 1.0 : gamma[c];
    const R m = static_cast<R>(s.mean);
    const auto [sdy, sdyx] = channel_sums(
        x, dy, d, c, [](R, R e) { return e; }, [m](R v, R e) { return e * (v - m); });
    dbeta[c] = static_cast<R>(sdy);
    dgamma[c] = fix_gamma ? R(0) : static_cast<R>(sdyx * invstd);
    const R k = static_cast<R>(g * invstd);
    if (training) {  // gradient with respect to the global sums in G
      const double dmean = -g * invstd * sdy;
      const double dvar = -0.5 * g * invstd * invstd * invstd * sdyx;
      dG[1 + c] = (dmean - 2 * s.mean * dvar) / N;
      dG[1 + d.c + c] = dvar / N;
    }
    for (int64_t i = 0; i < d.n; ++i) {  // the share through x; the rest comes through G
      const T* e = dy + (i * d.c + c) * d.hw;
      T* o = dx + (i * d.c + c) * d.hw;
#pragma omp simd
      for (int64_t j = 0; j < d.hw; ++j) o[j] = store<T>(k * widen(e[j]));
    }
  }
  return MX_SUCCESS;
}

MXReturnValue apply_backward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  return by_type((*in)[1].dtype, [&](auto v) { return apply_backward_t<decltype(v)>(attrs, in, out); });
}

MXReturnValue apply_parse(const Attrs&, int* n_in, int* n_out) {
  *n_in = 7;
  *n_out = 1;
  return MX_SUCCESS;
}

// y has x's type; probe, gamma, beta and the running statistics x's Real type (float64 for
// float64 data, float32 otherwise: real_code); G is float64. Fills in, checked when it runs.
MXReturnValue apply_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  const int t = (*in)[0];
  for (size_t i = 1; i < in->size(); ++i)
    if ((*in)[i] == -1 && (i == 1 || t != -1)) (*in)[i] = i == 1 ? kFloat64 : real_code(t);
  (*out)[0] = t;
  return MX_SUCCESS;
}

MXReturnValue apply_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  const auto& x = (*in)[0];
  if (x.size() < 2) { MX_ERROR_MSG << "distbn batch norm: input needs a channel axis 1"; return MX_FAIL; }
  const unsigned c = x[1];
  (*in)[1] = {1 + 2 * c};
  for (int i = 3; i < 7; ++i) {  // gamma, beta, running stats: (C,), filled in when deferred
    if (!known((*in)[i])) (*in)[i] = {c};
    if ((*in)[i] != std::vector<unsigned int>{c}) {
      MX_ERROR_MSG << "distbn batch norm: parameters must have shape (" << c << ",) for input with "
                   << c << " channels";
      return MX_FAIL;
    }
  }
  (*out)[0] = x;
  return MX_SUCCESS;
}

MXReturnValue apply_mutate(const Attrs&, std::vector<int>* idx) {
  idx->push_back(5);
  idx->push_back(6);
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(distbn_bn_stats)
.setParseAttrs(stats_parse)
.setInferType(stats_type)
.setInferShape(stats_shape)
.setForward(stats_forward, "cpu")
.setBackward(stats_backward, "cpu");

REGISTER_OP(distbn_bn_apply)
.setParseAttrs(apply_parse)
.setInferType(apply_type)
.setInferShape(apply_shape)
.setMutateInputs(apply_mutate)
.setForward(apply_forward, "cpu")
.setBackward(apply_backward, "cpu");

MXReturnValue initialize(int version) {
  return version >= 10900 ? MX_SUCCESS : MX_FAIL;
}
