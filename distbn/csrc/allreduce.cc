// distbn's all-reduce for the sync layer on the CPU: the workers' packed statistics (a few
// hundred float64 values per layer) summed over a mesh of TCP connections, inside MXNet's
// engine thread, as an extension operator usable in hybridized graphs.
//
//   distbn_allreduce(data, probe) -> sum of data over the workers of `ranks` (all when "")
//       attrs: key (the layer's name, identical on every worker), ranks ("0,2" or "")
//       training (the probe, mode.h): one exchange in forward, one in backward
//       (the gradient of a sum over workers is the sum of their gradients); prediction: the
//       data pass through, no exchange.
//
// Why not Horovod for these: each Horovod all-reduce of a small tensor took ~0.9 ms here
// (engine op -> Horovod's background thread and its cycle -> negotiation -> Gloo -> callback),
// and a sync layer needs two per step on the critical path. A direct exchange over sockets that
// already exist is one send and one receive per peer. Horovod still does everything else
// (gradients, broadcasts) and sets the mesh up (distbn/mesh.py makes the connections; this file
// only uses them: distbn_mesh_attach).
//
// The exchange: every worker sends its whole vector to every other worker of the group and
// sums all of them in rank order, so all workers get bitwise the same result (their running
// statistics stay identical). Messages carry the collective's name; a worker that receives
// another name than it expects fails with both names (out-of-step workers) instead of mixing
// layers. Non-blocking sockets and poll(): sends and receives progress together, so large
// vectors cannot deadlock on full socket buffers. A peer that closes its connection (a dead
// worker) fails the collective at once, naming its rank; one that stays silent is left to the
// trainer's stall guard (or to DISTBN_MESH_TIMEOUT seconds, when set).
//
// The engine runs one operator at a time on its CPU thread (MXNet's default), in the graph's
// order, which is the same on every worker; the mutex makes concurrent engine threads safe, and
// the name check turns a different order into an error rather than wrong numbers.
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>
#include "mxnet/lib_api.h"
#include "mode.h"

using namespace mxnet::ext;

namespace {

constexpr uint32_t kMagic = 0x44424e31;  // "DBN1"

struct Header {
  uint32_t magic;
  uint32_t key_len;
  uint64_t payload_len;
};

struct Peer {  // one exchange's progress with one other worker
  int rank, fd;
  size_t sent = 0;
  size_t got = 0;
  std::vector<char> in;  // header + key + payload as received
};

struct Mesh {
  std::mutex mu;
  int rank = 0, size = 1;
  std::vector<int> fds;  // by world rank; -1 for this worker
  int timeout_ms = -1;
  std::atomic<long long> count{0};
  std::atomic<long long> ns_inside{0};   // time spent in collectives (the benchmarks' account)
  std::atomic<long long> ns_waiting{0};  // of which blocked in poll(), waiting for peers
  std::mutex last_mu;  // apart from mu, which a waiting collective holds
  std::string last;
  std::vector<char> out;  // the message this worker sends, reused
};

Mesh& mesh() {
  static Mesh m;
  return m;
}

std::string peer_error(int rank, const char* what) {
  std::ostringstream s;
  s << "distbn all-reduce: " << what << " rank " << rank;
  return s.str();
}

// Advances the send of `msg` to `p`; false with `err` set when the connection is gone.
bool send_some(Peer& p, const std::vector<char>& msg, std::string* err) {
  while (p.sent < msg.size()) {
    ssize_t k = ::send(p.fd, msg.data() + p.sent, msg.size() - p.sent, MSG_NOSIGNAL);
    if (k > 0) { p.sent += k; continue; }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    *err = peer_error(p.rank, "lost the connection to");
    return false;
  }
  return true;
}

// Advances the receive from `p`: the header first, which says how much follows. Reads no
// byte past this message (the peer may already have sent its next one).
bool recv_some(Peer& p, std::string* err) {
  for (;;) {
    size_t want = sizeof(Header);
    if (p.got >= sizeof(Header)) {
      Header h;
      std::memcpy(&h, p.in.data(), sizeof h);
      if (h.magic != kMagic) { *err = peer_error(p.rank, "garbled message from"); return false; }
      want += h.key_len + h.payload_len;
    }
    if (p.got == want && p.got > sizeof(Header)) return true;
    if (p.in.size() < want) p.in.resize(want);
    ssize_t k = ::recv(p.fd, p.in.data() + p.got, want - p.got, 0);
    if (k > 0) { p.got += k; continue; }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    *err = peer_error(p.rank, k == 0 ? "connection closed (worker ended?) by" : "lost the connection to");
    return false;
  }
}

bool received(const Peer& p) {
  if (p.got < sizeof(Header)) return false;
  Header h;
  std::memcpy(&h, p.in.data(), sizeof h);
  return p.got == sizeof(Header) + h.key_len + h.payload_len;
}

std::vector<int> group_of(const std::string& ranks, int size) {
  std::vector<int> g;
  if (ranks.empty()) {
    for (int r = 0; r < size; ++r) g.push_back(r);
    return g;
  }
  std::stringstream s(ranks);
  std::string item;
  while (std::getline(s, item, ',')) g.push_back(std::stoi(item));
  return g;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string exchange(const double* data, double* out, int64_t n, const std::string& key,
                     const std::string& ranks);

// out = sum over the group of each worker's `n` doubles at `data`; returns "" or an error.
std::string allreduce(const double* data, double* out, int64_t n, const std::string& key,
                      const std::string& ranks) {
  const int64_t t0 = now_ns();
  std::string err = exchange(data, out, n, key, ranks);
  mesh().ns_inside += now_ns() - t0;
  return err;
}

std::string exchange(const double* data, double* out, int64_t n, const std::string& key,
                      const std::string& ranks) {
  Mesh& m = mesh();
  std::lock_guard<std::mutex> lock(m.mu);
  const std::vector<int> group = group_of(ranks, m.size);
  std::vector<Peer> peers;
  bool member = false;
  for (int r : group) {
    if (r < 0 || r >= m.size) return "distbn all-reduce: rank " + std::to_string(r) + " outside the mesh";
    if (r == m.rank) { member = true; continue; }
    if (m.fds.empty() || m.fds[r] < 0) return "distbn all-reduce: no mesh (distbn.mesh.connect was not called)";
    peers.push_back(Peer{r, m.fds[r]});
  }
  if (!member) return "distbn all-reduce: this worker is not in the group " + ranks;
  m.count++;
  {
    std::lock_guard<std::mutex> last_lock(m.last_mu);
    m.last = key;
  }
  const size_t bytes = static_cast<size_t>(n) * sizeof(double);
  const Header h{kMagic, static_cast<uint32_t>(key.size()), bytes};
  m.out.resize(sizeof h + key.size() + bytes);
  std::memcpy(m.out.data(), &h, sizeof h);
  std::memcpy(m.out.data() + sizeof h, key.data(), key.size());
  std::memcpy(m.out.data() + sizeof h + key.size(), data, bytes);

  std::string err;
  std::vector<pollfd> pfds;
  for (;;) {
    pfds.clear();
    for (Peer& p : peers) {
      if (!send_some(p, m.out, &err) || !recv_some(p, &err)) return err;
      short ev = (p.sent < m.out.size() ? POLLOUT : 0) | (received(p) ? 0 : POLLIN);
      if (ev) pfds.push_back(pollfd{p.fd, ev, 0});
    }
    if (pfds.empty()) break;
    const int64_t t0 = now_ns();
    int k = ::poll(pfds.data(), pfds.size(), m.timeout_ms);
    m.ns_waiting += now_ns() - t0;
    if (k < 0 && errno != EINTR) return std::string("distbn all-reduce: poll: ") + std::strerror(errno);
    if (k == 0) {
      std::string who;
      for (const pollfd& f : pfds)
        for (const Peer& p : peers) if (p.fd == f.fd) who += " " + std::to_string(p.rank);
      return "distbn all-reduce: no answer within " + std::to_string(m.timeout_ms / 1000) +
             " s from rank(s)" + who + " in " + key;
    }
  }
  // Every message is in: check names and sizes, then sum in rank order.
  for (const Peer& p : peers) {
    Header ph;
    std::memcpy(&ph, p.in.data(), sizeof ph);
    std::string pkey(p.in.data() + sizeof ph, ph.key_len);
    if (pkey != key || ph.payload_len != bytes) {
      std::ostringstream s;
      s << "distbn all-reduce: workers out of step: this worker (rank " << m.rank << ") is in "
        << key << " (" << n << " values), rank " << p.rank << " in " << pkey << " ("
        << ph.payload_len / sizeof(double) << " values)";
      return s.str();
    }
  }
  bool first = true;
  for (int r : group) {
    const double* src = data;
    if (r != m.rank)
      for (const Peer& p : peers)
        if (p.rank == r) src = reinterpret_cast<const double*>(p.in.data() + sizeof(Header) + key.size());
    if (first) std::memcpy(out, src, bytes);
    else for (int64_t i = 0; i < n; ++i) out[i] += src[i];
    first = false;
  }
  return "";
}

// --- the operator ------------------------------------------------------------------------

using Attrs = std::unordered_map<std::string, std::string>;

std::string attr_str(const Attrs& a, const char* k) {
  auto it = a.find(k);
  return it == a.end() ? "" : it->second;
}

MXReturnValue reduce_or_copy(const Attrs& attrs, MXTensor& src, MXTensor& dst, bool training,
                             const char* phase) {
  const int64_t n = src.size();
  if (!training) {
    std::memcpy(dst.data<double>(), src.data<double>(), n * sizeof(double));
    return MX_SUCCESS;
  }
  const std::string err = allreduce(src.data<double>(), dst.data<double>(), n,
                                    attr_str(attrs, "key") + phase, attr_str(attrs, "ranks"));
  if (err.empty()) return MX_SUCCESS;
  MX_ERROR_MSG << err;
  return MX_FAIL;
}

// in: data, probe   out: sum
MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                      const OpResource&) {
  return reduce_or_copy(attrs, (*in)[0], (*out)[0], is_training((*in)[1]), "fwd");
}

// in: d sum, data, probe, sum   out: d data, d probe
MXReturnValue backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                       const OpResource&) {
  float* dprobe = (*out)[1].data<float>();
  for (int64_t i = 0; i < (*out)[1].size(); ++i) dprobe[i] = 0.f;
  return reduce_or_copy(attrs, (*in)[0], (*out)[0], is_training((*in)[2]), "bwd");
}

MXReturnValue parse(const Attrs& attrs, int* n_in, int* n_out) {
  if (attr_str(attrs, "key").empty()) { MX_ERROR_MSG << "distbn_allreduce needs a key"; return MX_FAIL; }
  *n_in = 2;
  *n_out = 1;
  return MX_SUCCESS;
}

MXReturnValue infer_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] != kFloat64 || (*in)[1] != kFloat32) {
    MX_ERROR_MSG << "distbn_allreduce: data must be float64 and probe float32";
    return MX_FAIL;
  }
  (*out)[0] = kFloat64;
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = (*in)[0];
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(distbn_allreduce)
.setParseAttrs(parse)
.setInferType(infer_type)
.setInferShape(infer_shape)
.setForward(forward, "cpu")
.setBackward(backward, "cpu");

// --- the mesh, set up and read from Python (distbn/mesh.py, ctypes) ------------------------
extern "C" {

// fds[r]: a connected stream socket to rank r (-1 for `rank` itself); made non-blocking here.
// timeout_s <= 0: wait for peers without limit.
int distbn_mesh_attach(int rank, int size, const int* fds, double timeout_s) {
  Mesh& m = mesh();
  std::lock_guard<std::mutex> lock(m.mu);
  m.rank = rank;
  m.size = size;
  m.fds.assign(fds, fds + size);
  m.timeout_ms = timeout_s > 0 ? static_cast<int>(timeout_s * 1000) : -1;
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    int flags = fcntl(m.fds[r], F_GETFL, 0);
    if (flags < 0 || fcntl(m.fds[r], F_SETFL, flags | O_NONBLOCK) < 0) return errno;
  }
  return 0;
}

void distbn_mesh_detach() {
  Mesh& m = mesh();
  std::lock_guard<std::mutex> lock(m.mu);
  m.fds.clear();
  m.size = 1;
  m.rank = 0;
}

long long distbn_mesh_count() { return mesh().count.load(); }

// Nanoseconds spent inside collectives, and of those blocked waiting for peers.
void distbn_mesh_times(long long* inside, long long* waiting) {
  *inside = mesh().ns_inside.load();
  *waiting = mesh().ns_waiting.load();
}

// The newest collective's name into buf (for the stall guard's report).
void distbn_mesh_last(char* buf, int len) {
  Mesh& m = mesh();
  std::lock_guard<std::mutex> lock(m.last_mu);
  std::snprintf(buf, len, "%s", m.last.c_str());
}

// The same exchange on plain arrays (tests); returns 0, or 1 with the error in err.
int distbn_mesh_allreduce(const double* data, double* out, long long n, const char* key,
                          const char* ranks, char* err, int err_len) {
  const std::string e = allreduce(data, out, n, key, ranks);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}

}  // extern "C"
