// distbn's all-reduce for the sync layer: the workers' packed statistics (1 + 2C float64 values
// per layer) summed with Gloo (Horovod's own CPU collective library), inside MXNet's engine, as
// an extension operator usable in hybridized graphs.
//
//   distbn_allreduce(data, probe) -> sum of data over the workers of `ranks` (all when "")
//       attrs: key (the layer's name, identical on every worker), ranks ("0,2" or "")
//       training (the probe, mode.h): one all-reduce in forward, one in backward (the gradient
//       of a sum over workers is the sum of their gradients); prediction: the data pass
//       through, no exchange.
//
// The algorithm is Gloo's halving-doubling all-reduce (gloo::AllreduceHalvingDoubling): log2(N)
// latency steps, and about twice the vector's bytes sent per worker whatever N (an all-to-all
// sends N - 1 copies). Every element is reduced on one worker and then copied to the others, so
// all workers get bitwise the same sums (their running statistics stay identical). In groups of
// two it is Gloo's ring (gloo::AllreduceRing), which there is one exchange of the whole vector
// plus a one-int notification, against halving-doubling's two half-vector exchanges with a
// notification between them: the same bytes, one wait for the peer instead of three. Measured
// at 2 workers on 2 cores (bench/step_time.py, docs/results.md), it halved the time a ResNet-18
// step spends in the exchange. Each worker adds the other's vector to its own, and a + b == b + a
// in floating point, so the two workers' sums are still bitwise the same (tests/mp/engine.py).
// Only up to kRingBytes: in Gloo's synchronous mode a send blocks until the socket has taken
// it, and both workers send the whole vector at once, so it must fit in the send buffer Gloo
// asks for (Linux grants at least twice the default wmem_max of 212,992 bytes) or both block
// for ever. Longer vectors (no BN layer's statistics are) take halving-doubling, whose
// simultaneous sends are halves; tests/mp/engine.py sums 8 MB that way.
//
// Communicators: one Gloo context over all workers, and one per process set (`ranks`), all on
// one TCP device. Gloo's own rendezvous needs a key-value store; here the pairs' addresses are
// all-gathered through Horovod instead (distbn/engine.py): each worker makes a pair for every
// peer (distbn_group_listen), hands the addresses out, then connects (distbn_group_connect).
// The pairs run in Gloo's synchronous mode: the engine thread that runs the operator reads the
// socket itself, with no hand-off to Gloo's event-loop thread, and any error (a lost peer, a
// message of the wrong size) is thrown in that thread and becomes the operator's error. A
// waiting read sleeps rather than spins (Gloo's busy-poll): measured at 2 workers on 2 cores,
// spinning took one all-reduce from 136 to 30 us, but a ResNet-18 step from 1.3x to 2.3-3.0x
// Gluon's, as the spinning thread takes the core from Horovod's gradient all-reduce.
//
// Out-of-step workers: every exchange carries one more value in front, a tag hashed from the
// collective's name and length; after the sum it must be exactly size * tag (integers below
// 2^53 are exact in float64), else the exchange fails naming both collectives instead of
// returning statistics mixed from different layers.
//
// The engine runs one operator at a time on its CPU thread (MXNet's default), in the graph's
// order, which is the same on every worker; the mutex makes concurrent engine threads safe.
//
// Several devices in one process (distbn_devices_allreduce, called by the graph operator
// distbn.engine defines for that case): each device's statistics wait in a meeting of that
// layer's round (its k-th call on each device meets the k-th on the others); the device that
// arrives last sums them in device order, runs the one cross-process all-reduce above on that
// sum, and every device copies the same result. With several workers, a process may hold more than
// one round that all its devices reached (a forward-only pass, as update_bn_stats runs, lets the
// next batch's first layer meet while the last batch's deeper layers still wait; the graph lets
// a BN layer on the raw input meet while the previous step's backward runs), and which is first
// differs between workers: run as they came, two workers would each wait in a different round's
// all-reduce for ever (seen at 2 workers x 2 devices). So the workers first agree on the round:
// each offers the ids of its oldest ready rounds (one allgather of kOffers values), and all run
// the first of rank 0's offers that every worker offered; with none in common, each waits up to
// 1 ms for a new round and offers again. Why not in this file's MXNet operator: MXNet
// gives every library operator a temporary-space and a parallel-random resource, and on the
// CPU all devices share one copy of the latter (MXNET_CPU_PARALLEL_RAND_COPY=1), so a library
// operator that waited for another CPU device's operator would wait for ever (seen here, at
// any count of temporary-space copies). The meeting is therefore called from an asynchronous
// operator that holds no resource, on a thread of its own (see distbn/engine.py).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <gloo/allgather_ring.h>
#include <gloo/allreduce_halving_doubling.h>
#include <gloo/allreduce_ring.h>
#include <gloo/common/error.h>
#include <gloo/context.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>

#include "mxnet/lib_api.h"
#include "mode.h"

#ifdef DISTBN_CUDA
#include <cuda_runtime_api.h>
#endif

using namespace mxnet::ext;

namespace {

// A Gloo context whose pairs are connected from addresses handed out by the caller (Gloo's
// rendezvous::Context does the same through a Store).
class Context : public gloo::Context {
 public:
  Context(int rank, int size, const std::shared_ptr<gloo::transport::Device>& device,
          std::chrono::milliseconds timeout)
      : gloo::Context(rank, size) {
    setTimeout(timeout);
    device_ = device;
    transportContext_ = device->createContext(rank, size);
    transportContext_->setTimeout(timeout);
  }
  std::vector<char> listen(int peer) {
    return transportContext_->createPair(peer)->address().bytes();
  }
  void connect(int peer, const std::vector<char>& address) {
    auto& pair = transportContext_->getPair(peer);
    pair->connect(address);
    pair->setSync(true, false);
  }

  // Whether the pair with `peer` still stands: Gloo closes a pair whose connection failed, and
  // asking a closed pair for synchronous mode (which the others already have) throws.
  bool alive(int peer) {
    try {
      transportContext_->getPair(peer)->setSync(true, false);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }
};

constexpr size_t kRingBytes = 212992;  // see the top of the file: 26,624 doubles, C <= 13,311

struct Plan {  // one all-reduce of a given length in a group, run as often as needed
  std::vector<double> buf;  // [tag, data...]
  std::unique_ptr<gloo::Algorithm> algorithm;
};

constexpr int kOffers = 64;  // ready rounds a worker offers at once (see the top of the file)

struct Group {
  std::shared_ptr<Context> context;
  std::string broken;  // the error after which its connections were closed
  std::vector<int> ranks;                      // world ranks, by rank in the group
  std::map<int64_t, Plan> plans;               // by length
  std::vector<double> offer, offers;           // (kOffers,), (kOffers * size,): round ids
  std::unique_ptr<gloo::Algorithm> agree;      // the allgather of the offers
};

struct Engine {
  std::mutex mu;
  int rank = 0, size = 1;
  std::shared_ptr<gloo::transport::Device> device;
  std::chrono::milliseconds timeout{0};
  std::map<std::string, Group> groups;  // by ranks attr ("" = all workers)
  std::unordered_map<uint32_t, std::string> names;  // tag -> "key (n values)", for errors
  std::atomic<long long> count{0};
  std::atomic<long long> ns_inside{0};  // time spent in collectives (the benchmarks' account)
  std::mutex last_mu;  // apart from mu, which a waiting collective holds
  std::string last;
  // The exchange trace (bench/exchange_wait.py): per all-reduce of a layer, its tag, when the
  // operator asked for it and when it returned (steady clock, ns: one clock for every process
  // of a host, so the workers' records line up), while fewer than trace_cap are held.
  std::mutex trace_mu;
  std::vector<int64_t> trace;  // 3 per record
  size_t trace_cap = 0;
};

Engine& engine() {
  static Engine e;
  return e;
}

uint32_t tag_of(const std::string& key, int64_t n) {  // FNV-1a of "key:n", never 0
  uint32_t h = 2166136261u;
  for (char c : key + ":" + std::to_string(n)) h = (h ^ static_cast<unsigned char>(c)) * 16777619u;
  return h ? h : 1;
}

std::string name_of(const std::string& key, int64_t n) {
  return key + " (" + std::to_string(n) + " values)";
}

uint32_t remember(Engine& e, const std::string& key, int64_t n) {
  const uint32_t tag = tag_of(key, n);
  e.names.emplace(tag, name_of(key, n));
  return tag;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Gloo names a failed pair by its peer's address ("[127.0.0.1]:40123"), which on the side that
// accepted the connection is the peer's outgoing port; the group's pairs say whose it was.
std::string lost(Group& g, const std::string& what) {
  std::string who;
  for (int i = 0; i < g.context->size; ++i)
    if (i != g.context->rank && !g.context->alive(i))
      who += (who.empty() ? "" : ", ") + std::to_string(g.ranks[i]);
  return who.empty() ? what : "lost the connection to rank " + who + " (" + what + ")";
}

// out = sum over the group `ranks` of each worker's `n` doubles at `data`; returns "" or an
// error. The caller holds e.mu.
std::string allreduce_locked(Engine& e, const double* data, double* out, int64_t n,
                             const std::string& key, const std::string& ranks) {
  auto it = e.groups.find(ranks);
  if (it == e.groups.end() && ranks.empty() && !e.device) {  // one process: a sum over one worker
    if (out != data) std::memcpy(out, data, n * sizeof(double));
    return "";
  }
  if (it == e.groups.end())
    return "distbn all-reduce: no communicator for " +
           (ranks.empty() ? std::string("all workers") : "ranks " + ranks) +
           " (distbn.engine.start / add_group was not called on this worker)";
  Group& g = it->second;
  if (!g.broken.empty())
    return "distbn all-reduce: the connections of this group were closed after an earlier "
           "error (" + g.broken + ")";
  const int64_t t0 = now_ns();
  e.count++;
  {
    std::lock_guard<std::mutex> last_lock(e.last_mu);
    e.last = key;
  }
  const uint32_t tag = remember(e, key, n);
  std::string err;
  try {
    Plan& p = g.plans[n];
    if (!p.algorithm) {
      p.buf.resize(n + 1);
      std::vector<double*> ptrs{p.buf.data()};
      const int count = static_cast<int>(n + 1);
      if (g.ranks.size() == 2 && count * sizeof(double) <= kRingBytes)  // see the top of the file
        p.algorithm.reset(new gloo::AllreduceRing<double>(g.context, ptrs, count));
      else
        p.algorithm.reset(new gloo::AllreduceHalvingDoubling<double>(g.context, ptrs, count));
    }
    p.buf[0] = tag;
    std::memcpy(p.buf.data() + 1, data, n * sizeof(double));
    p.algorithm->run();
    const double expected = static_cast<double>(tag) * g.ranks.size();
    if (p.buf[0] != expected) {
      // The others' tags sum to buf[0] - tag; when they all agree, that names their collective.
      const double others = (p.buf[0] - tag) / (g.ranks.size() - 1);
      auto found = others == std::floor(others) && others > 0 && others < 4294967296.0
                       ? e.names.find(static_cast<uint32_t>(others)) : e.names.end();
      std::ostringstream s;
      s << "distbn all-reduce: workers out of step: this worker (rank " << e.rank << ") is in "
        << name_of(key, n) << ", "
        << (found != e.names.end() ? "the others in " + found->second
                                   : std::string("another worker in a different collective"));
      err = s.str();
    } else {
      std::memcpy(out, p.buf.data() + 1, n * sizeof(double));
    }
  } catch (const std::exception& ex) {
    // Gloo's transport is in an unknown state after any exception (docs/errors.md): close the
    // group's connections, so that its peers fail at once too rather than wait.
    const bool size_mismatch = dynamic_cast<const gloo::IoException*>(&ex) == nullptr;
    err = size_mismatch  // EnforceNotMet: a message longer than this worker's
              ? "distbn all-reduce: workers out of step: this worker (rank " +
                    std::to_string(e.rank) + ") is in " + name_of(key, n) +
                    ", another sent a message of another length (" + ex.what() + ")"
              : "distbn all-reduce: " + lost(g, ex.what()) + " in " + key;
    g.broken = err;
    g.context->closeConnections();
  }
  e.ns_inside += now_ns() - t0;
  return err;
}

std::string allreduce(const double* data, double* out, int64_t n, const std::string& key,
                      const std::string& ranks) {
  Engine& e = engine();
  const int64_t asked = now_ns();
  std::string err;
  {
    std::lock_guard<std::mutex> lock(e.mu);
    err = allreduce_locked(e, data, out, n, key, ranks);
  }
  std::lock_guard<std::mutex> lock(e.trace_mu);
  if (e.trace.size() < 3 * e.trace_cap)
    e.trace.insert(e.trace.end(), {static_cast<int64_t>(tag_of(key, n)), asked, now_ns()});
  return err;
}

// Every worker's offer (kOffers round ids, 0 = none) into g.offers, in group order; "" or an error.
std::string gather_offers(Engine& e, Group& g) {
  if (!g.broken.empty())
    return "distbn all-reduce: the connections of this group were closed after an earlier "
           "error (" + g.broken + ")";
  try {
    if (!g.agree) {
      g.offers.resize(kOffers * g.ranks.size());
      g.agree.reset(new gloo::AllgatherRing<double>(
          g.context, std::vector<const double*>{g.offer.data()}, g.offers.data(), kOffers));
    }
    g.agree->run();
    return "";
  } catch (const std::exception& ex) {
    const std::string err = "distbn all-reduce: " + lost(g, ex.what()) + " agreeing on the next "
                            "exchange of several devices";
    g.broken = err;
    g.context->closeConnections();
    return err;
  }
}

// The first of rank 0's offers that every worker offered, or 0.
double agreed(const Group& g) {
  const size_t size = g.ranks.size();
  for (int i = 0; i < kOffers && g.offers[i] != 0; ++i) {
    bool everywhere = true;
    for (size_t w = 1; w < size && everywhere; ++w) {
      const double* begin = g.offers.data() + w * kOffers;
      everywhere = std::find(begin, begin + kOffers, g.offers[i]) != begin + kOffers;
    }
    if (everywhere) return g.offers[i];
  }
  return 0;
}

// --- several devices of one process -------------------------------------------------------

struct Round {  // one call of a layer's exchange on every device of this process
  std::vector<std::vector<double>> parts;  // by device
  int arrived = 0, left = 0;
  bool done = false;
  std::string key;
  double id = 0;            // (key, call number) hashed: the same on every worker, never 0
  std::vector<double> sum;  // over the devices, once all arrived
  std::vector<double> result;
  std::string error;
};

struct Meetings {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, std::vector<int64_t>> calls;         // key -> calls so far, by device
  std::map<std::pair<std::string, int64_t>, Round> rounds;  // (key, call number)
  std::map<std::string, std::vector<Round*>> ready;         // by group: summed, in arrival order
};

double round_id(const std::string& key, int64_t call) {  // FNV-1a, 52 bits: exact in a double
  uint64_t h = 14695981039346656037ull;
  for (char c : key + "#" + std::to_string(call))
    h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  h &= (1ull << 52) - 1;
  return static_cast<double>(h ? h : 1);
}

Meetings& meetings() {
  static Meetings m;
  return m;
}

std::string missing(const Round& r) {
  std::string who;
  for (size_t d = 0; d < r.parts.size(); ++d)
    if (r.parts[d].empty()) who += (who.empty() ? "" : ", ") + std::to_string(d);
  return who;
}

// Runs this process's ready rounds of group `ranks`, in the order the workers agree on (see
// the top of the file), until `mine` is done (by this thread or another).
void serve(const std::string& ranks, Round& mine) {
  Engine& e = engine();
  Meetings& m = meetings();
  std::unique_lock<std::mutex> elock(e.mu);
  const auto finish = [&](Round& r, const std::string& err) {
    std::lock_guard<std::mutex> lock(m.mu);
    r.error = err;
    r.done = true;
    m.cv.notify_all();
  };
  auto it = e.groups.find(ranks);
  if (it == e.groups.end()) {  // one worker (or no communicator: allreduce says so)
    {
      std::lock_guard<std::mutex> lock(m.mu);
      auto& queue = m.ready[ranks];
      queue.erase(std::find(queue.begin(), queue.end(), &mine));
    }
    finish(mine, allreduce_locked(e, mine.sum.data(), mine.result.data(),
                                  static_cast<int64_t>(mine.sum.size()), mine.key, ranks));
    return;
  }
  Group& g = it->second;
  g.offer.resize(kOffers);
  while (true) {
    {
      std::lock_guard<std::mutex> lock(m.mu);
      if (mine.done) return;
      const auto& queue = m.ready[ranks];
      std::fill(g.offer.begin(), g.offer.end(), 0.0);
      for (size_t i = 0; i < queue.size() && i < static_cast<size_t>(kOffers); ++i)
        g.offer[i] = queue[i]->id;
    }
    std::string err = gather_offers(e, g);
    if (!err.empty()) {  // every round waiting in this group fails with it
      std::vector<Round*> waiting;
      {
        std::lock_guard<std::mutex> lock(m.mu);
        waiting.swap(m.ready[ranks]);
      }
      for (Round* r : waiting) finish(*r, err);
      return;
    }
    const double pick = agreed(g);
    if (pick == 0) {  // nothing ready everywhere yet: let a new round arrive, then offer again
      elock.unlock();
      {
        std::unique_lock<std::mutex> lock(m.mu);
        m.cv.wait_for(lock, std::chrono::milliseconds(1));
      }
      elock.lock();
      continue;
    }
    Round* r = nullptr;
    {
      std::lock_guard<std::mutex> lock(m.mu);
      auto& queue = m.ready[ranks];
      auto at = std::find_if(queue.begin(), queue.end(), [&](Round* q) { return q->id == pick; });
      r = *at;  // offered by this worker too, and only this thread takes rounds out meanwhile
      queue.erase(at);
    }
    finish(*r, allreduce_locked(e, r->sum.data(), r->result.data(),
                                static_cast<int64_t>(r->sum.size()), r->key, ranks));
  }
}

// out = sum of `data` (n doubles) over the n_devices devices of this process and over the
// workers of `ranks`; `device` in [0, n_devices). Waits up to timeout_s for the other devices
// to reach the same call; returns "" or an error.
std::string devices_allreduce(const double* data, double* out, int64_t n, const std::string& key,
                              const std::string& ranks, int device, int n_devices,
                              double timeout_s) {
  Meetings& m = meetings();
  std::unique_lock<std::mutex> lock(m.mu);
  std::vector<int64_t>& calls = m.calls[key];
  calls.resize(n_devices, 0);
  const auto id = std::make_pair(key, calls[device]++);
  Round& r = m.rounds[id];
  r.parts.resize(n_devices);
  r.parts[device].assign(data, data + n);
  if (++r.arrived == n_devices) {
    r.sum.assign(n, 0.0);
    for (const auto& part : r.parts) {  // device order: every device gets the same bits
      if (static_cast<int64_t>(part.size()) != n) {
        r.error = "distbn all-reduce: " + key + ": the devices of this process hold statistics "
                  "of different lengths";
        break;
      }
      for (int64_t i = 0; i < n; ++i) r.sum[i] += part[i];
    }
    if (r.error.empty()) {
      r.key = key;
      r.id = round_id(key, id.second);
      r.result.resize(n);
      m.ready[ranks].push_back(&r);
      lock.unlock();  // the cross-process exchange may wait for other workers
      serve(ranks, r);
      lock.lock();
    } else {
      r.done = true;
      m.cv.notify_all();
    }
  } else {
    const auto all_here = [&] { return r.arrived == n_devices || !r.error.empty(); };
    if (!m.cv.wait_for(lock, std::chrono::duration<double>(timeout_s), all_here)) {
      std::ostringstream s;
      s << "distbn all-reduce: " << key << ": device " << device << " of this process waited "
        << timeout_s << " s for device(s) " << missing(r) << " to run the same layer (a device "
        << "whose batch skipped it, or a value read before every device was given its batch)";
      r.error = s.str();
      r.done = true;
      m.cv.notify_all();
    }
    m.cv.wait(lock, [&] { return r.done; });
  }
  const std::string err = r.error;
  if (err.empty()) std::memcpy(out, r.result.data(), n * sizeof(double));
  if (++r.left == n_devices) m.rounds.erase(id);  // a timed-out round stays for late devices
  return err;
}

// --- the operator ------------------------------------------------------------------------

size_t dtype_bytes(const MXTensor& t) { return t.dtype == kFloat64 ? 8 : 4; }  // the probe's

MXReturnValue fail(const std::string& err);

// data float64; probe of the running statistics' type, float32 or float64 (mode.h).
bool types_ok(const std::vector<MXTensor>& in) {
  if (in[0].dtype == kFloat64 && (in[1].dtype == kFloat32 || in[1].dtype == kFloat64)) return true;
  fail("distbn_allreduce: data must be float64 and probe float32 or float64, got type codes " +
       std::to_string(in[0].dtype) + " and " + std::to_string(in[1].dtype));
  return false;
}

using Attrs = std::unordered_map<std::string, std::string>;

std::string attr_str(const Attrs& a, const char* k) {
  auto it = a.find(k);
  return it == a.end() ? "" : it->second;
}

MXReturnValue fail(const std::string& err) {
  MX_ERROR_MSG << err;
  return MX_FAIL;
}

// dst = sum of src over the workers (training) or src (prediction); host memory.
MXReturnValue reduce_or_copy(const Attrs& attrs, const double* src, double* dst, int64_t n,
                             bool training, const char* phase) {
  if (!training) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(double));
    return MX_SUCCESS;
  }
  const std::string err = allreduce(src, dst, n, attr_str(attrs, "key") + phase,
                                    attr_str(attrs, "ranks"));
  return err.empty() ? MX_SUCCESS : fail(err);
}

// in: data, probe   out: sum
MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                      const OpResource&) {
  MXTensor& src = (*in)[0];
  if (!types_ok(*in)) return MX_FAIL;
  return reduce_or_copy(attrs, src.data<double>(), (*out)[0].data<double>(), src.size(),
                        is_training((*in)[1]), "fwd");
}

// in: d sum, data, probe, sum   out: d data, d probe
MXReturnValue backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                       const OpResource&) {
  MXTensor& dprobe = (*out)[1];
  std::memset(dprobe.data_ptr, 0, dprobe.size() * dtype_bytes(dprobe));
  MXTensor& dsum = (*in)[0];
  return reduce_or_copy(attrs, dsum.data<double>(), (*out)[0].data<double>(), dsum.size(),
                        is_training((*in)[2]), "bwd");
}

#ifdef DISTBN_CUDA
// GPU workers (never executed here: no GPU): the statistics and the probe's first value are
// copied to host memory on MXNet's stream, summed as on a CPU worker, and copied back.
MXReturnValue reduce_on_host(const Attrs& attrs, MXTensor& src, MXTensor& probe, MXTensor& dst,
                             const OpResource& res, const char* phase) {
  auto stream = static_cast<cudaStream_t>(res.get_cuda_stream());
  std::vector<double> host(src.size());
  double first[1] = {0};  // the probe's first value, float32 or float64 (mode.h)
  MXTensor head(first, {1}, probe.dtype, 0, MXContext::CPU(0), probe.stype);
  const size_t bytes = host.size() * sizeof(double);
  if (cudaMemcpyAsync(first, probe.data_ptr, dtype_bytes(probe), cudaMemcpyDeviceToHost, stream) ||
      cudaMemcpyAsync(host.data(), src.data<double>(), bytes, cudaMemcpyDeviceToHost, stream) ||
      cudaStreamSynchronize(stream))
    return fail("distbn all-reduce: copy to host failed");
  if (reduce_or_copy(attrs, host.data(), host.data(), src.size(), is_training(head), phase) != MX_SUCCESS)
    return MX_FAIL;
  if (cudaMemcpyAsync(dst.data<double>(), host.data(), bytes, cudaMemcpyHostToDevice, stream) ||
      cudaStreamSynchronize(stream))  // `host` is freed on return
    return fail("distbn all-reduce: copy to device failed");
  return MX_SUCCESS;
}

MXReturnValue forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                          std::vector<MXTensor>* out, const OpResource& res) {
  if (!types_ok(*in)) return MX_FAIL;
  return reduce_on_host(attrs, (*in)[0], (*in)[1], (*out)[0], res, "fwd");
}

MXReturnValue backward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out, const OpResource& res) {
  MXTensor& dprobe = (*out)[1];
  if (cudaMemsetAsync(dprobe.data_ptr, 0, dprobe.size() * dtype_bytes(dprobe),
                      static_cast<cudaStream_t>(res.get_cuda_stream())))
    return fail("distbn all-reduce: memset failed");
  return reduce_on_host(attrs, (*in)[0], (*in)[2], (*out)[0], res, "bwd");
}
#endif

MXReturnValue parse(const Attrs& attrs, int* n_in, int* n_out) {
  if (attr_str(attrs, "key").empty()) return fail("distbn_allreduce needs a key");
  *n_in = 2;
  *n_out = 1;
  return MX_SUCCESS;
}

// Fills in, never fails: MXNet's AMP calls type functions with trial types while it converts a
// graph and stops on a failure (batch_norm.cc); forward checks the types it gets.
MXReturnValue infer_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] == -1) (*in)[0] = kFloat64;
  (*out)[0] = kFloat64;
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = (*in)[0];
  // Names for out-of-step messages: every layer of the graph is known before any exchange.
  int64_t n = 1;
  for (unsigned int d : (*in)[0]) n *= d;
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  for (const char* phase : {"fwd", "bwd"}) remember(e, attr_str(attrs, "key") + phase, n);
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(distbn_allreduce)
.setParseAttrs(parse)
.setInferType(infer_type)
.setInferShape(infer_shape)
#ifdef DISTBN_CUDA
.setForward(forward_gpu, "gpu")
.setBackward(backward_gpu, "gpu")
#endif
.setForward(forward, "cpu")
.setBackward(backward, "cpu");

// --- set up and read from Python (distbn/engine.py, ctypes) ---------------------------------
extern "C" {

// Functions that can fail return 0, or 1 with the message in err.
static int report(const std::string& msg, char* err, int err_len) {
  std::snprintf(err, err_len, "%s", msg.c_str());
  return msg.empty() ? 0 : 1;
}

// The TCP device on `host` (an address of this machine); timeout_s <= 0: none.
int distbn_engine_init(int rank, int size, const char* host, double timeout_s, char* err, int err_len) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  try {
    gloo::transport::tcp::attr attr(host);
    e.device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& ex) {
    return report(std::string("cannot open a Gloo TCP device on ") + host + ": " + ex.what(), err, err_len);
  }
  e.rank = rank;
  e.size = size;
  e.timeout = timeout_s > 0 ? std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000))
                            : gloo::kNoTimeout;
  return 0;
}

// Makes the group `ranks` ("" = all workers; this worker must be a member) and a pair for every
// other member; writes their addresses, `address_len` bytes per member in group order (this
// worker's own left zero), to `out` (room for `out_len` bytes).
int distbn_group_listen(const char* ranks, const int* members, int n_members, char* out,
                        int out_len, int* address_len, char* err, int err_len) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  if (!e.device) return report("distbn_engine_init was not called", err, err_len);
  Group g;
  g.ranks.assign(members, members + n_members);
  int me = -1;
  for (int i = 0; i < n_members; ++i) if (g.ranks[i] == e.rank) me = i;
  if (me < 0) return report("this worker is not in the group " + std::string(ranks), err, err_len);
  try {
    g.context = std::make_shared<Context>(me, n_members, e.device, e.timeout);
    *address_len = 0;
    std::memset(out, 0, out_len);
    for (int i = 0; i < n_members; ++i) {
      if (i == me) continue;
      const std::vector<char> a = g.context->listen(i);
      if (static_cast<int64_t>(a.size()) * n_members > out_len)
        return report("address buffer too small", err, err_len);
      *address_len = static_cast<int>(a.size());
      std::memcpy(out + static_cast<int64_t>(i) * a.size(), a.data(), a.size());
    }
  } catch (const std::exception& ex) {
    return report(std::string("cannot listen for the group's peers: ") + ex.what(), err, err_len);
  }
  e.groups[ranks] = std::move(g);
  return 0;
}

// `peers`: for every member in group order, the address it made for its pair with this worker
// (`address_len` bytes each; this worker's own slot ignored).
int distbn_group_connect(const char* ranks, const char* peers, int address_len, char* err, int err_len) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  Group& g = e.groups.at(ranks);
  const int me = g.context->rank;
  for (int i = 0; i < g.context->size; ++i) {
    if (i == me) continue;
    std::vector<char> a(peers + static_cast<int64_t>(i) * address_len,
                        peers + static_cast<int64_t>(i + 1) * address_len);
    try {
      g.context->connect(i, a);
    } catch (const std::exception& ex) {
      return report("rank " + std::to_string(e.rank) + " cannot connect to rank " +
                    std::to_string(g.ranks[i]) + ": " + ex.what(), err, err_len);
    }
  }
  return 0;
}

long long distbn_engine_count() { return engine().count.load(); }

double distbn_engine_seconds() { return engine().ns_inside.load() * 1e-9; }

// The newest collective's name into buf (for the stall guard's report).
void distbn_engine_last(char* buf, int len) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.last_mu);
  std::snprintf(buf, len, "%s", e.last.c_str());
}

// Starts the exchange trace afresh, holding up to `capacity` records (0: off).
void distbn_engine_trace(long long capacity) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.trace_mu);
  e.trace.clear();
  e.trace_cap = capacity > 0 ? static_cast<size_t>(capacity) : 0;
  e.trace.reserve(3 * e.trace_cap);
}

// Copies up to `max_records` trace records (tag, asked ns, returned ns) to `out`; their count.
long long distbn_engine_trace_read(long long* out, long long max_records) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.trace_mu);
  const long long n = std::min<long long>(max_records, e.trace.size() / 3);
  std::copy(e.trace.begin(), e.trace.begin() + 3 * n, out);
  return n;
}

// The collective a tag stands for, "key (n values)", into buf; 0, or 1 when unknown.
int distbn_engine_tag_name(long long tag, char* buf, int len) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  auto it = e.names.find(static_cast<uint32_t>(tag));
  std::snprintf(buf, len, "%s", it == e.names.end() ? "" : it->second.c_str());
  return it == e.names.end();
}

// The same exchange on plain arrays (tests, benchmarks).
int distbn_engine_allreduce(const double* data, double* out, long long n, const char* key,
                            const char* ranks, char* err, int err_len) {
  return report(allreduce(data, out, n, key, ranks), err, err_len);
}

// The exchange of a layer whose parameters live on several devices of this process.
int distbn_devices_allreduce(const double* data, double* out, long long n, const char* key,
                             const char* ranks, int device, int n_devices, double timeout_s,
                             char* err, int err_len) {
  return report(devices_allreduce(data, out, n, key, ranks, device, n_devices, timeout_s), err,
                err_len);
}

// Makes `key` of `n` values known by name to out-of-step messages before it is first used.
void distbn_engine_name(const char* key, long long n) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mu);
  remember(e, key, n);
}

}  // extern "C"
