#include "canopy/runners/fusion_choice.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <sstream>

#include <nlohmann/json.hpp>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/randn.h>
#include <torch/version.h>

#include "canopy/core/device.h"
#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/core/progress.h"
#include "canopy/core/strings.h"
#include "canopy/heads/fused.h"
#include "canopy/tasks/linear_step.h"

namespace canopy::runners {

namespace {
using Clock = std::chrono::steady_clock;

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// An exclusive flock on `path`, waited for; released when the object goes (or the process).
class FileLock {
 public:
  explicit FileLock(const std::string& path) : fd_(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644)) {
    if (fd_ >= 0 && ::flock(fd_, LOCK_EX) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_;
};

// The calibration file's "v1 <tab> signature <tab> fused|alone <tab> fused_us <tab> alone_us"
// lines (others are ignored); `kept` receives the lines read, to be written back with a new one.
std::map<std::string, FusionDecision> parse_records(const std::string& text, std::string* kept) {
  std::map<std::string, FusionDecision> out;
  for (const std::string& line : split(text, '\n')) {
    const auto f = split(line, '\t');
    if (f.size() != 5 || f[0] != "v1" || (f[2] != "fused" && f[2] != "alone")) continue;
    FusionDecision d;
    d.fuse = f[2] == "fused";
    try {
      d.fused_seconds = std::stod(f[3]) * 1e-6;
      d.alone_seconds = std::stod(f[4]) * 1e-6;
    } catch (const std::exception&) {
      continue;
    }
    out.emplace(f[1], d);  // the first line for a shape wins
    *kept += line + "\n";
  }
  return out;
}
}  // namespace

std::string FusionChooser::default_file() {
  const char* explicit_file = std::getenv("CANOPY_FUSION_CALIBRATION");
  if (explicit_file && *explicit_file) return explicit_file;
  const char* home = std::getenv("CANOPY_HOME");
  std::string dir;
  if (home && *home) {
    dir = home;
  } else {
    const char* user = std::getenv("HOME");
    dir = std::string(user && *user ? user : "/tmp") + "/.cache/canopy";
  }
  return dir + "/calibration/fusion.tsv";
}

std::size_t FusionChooser::recorded_shapes(const std::string& file) {
  std::string lines;
  return is_regular_file(file) ? parse_records(read_file(file), &lines).size() : 0;
}

FusionChooser::FusionChooser(std::vector<tasks::Task*> tasks, std::vector<at::Tensor> eval_targets,
                             std::int64_t feature_dim, std::int64_t batch_size, std::int64_t intra_op_threads,
                             std::string file, bool shared_top, FusionDecisions kept)
    : tasks_(std::move(tasks)),
      eval_targets_(std::move(eval_targets)),
      feature_dim_(feature_dim),
      batch_size_(batch_size),
      threads_(intra_op_threads),
      file_(std::move(file)),
      shared_top_(shared_top),
      kept_(std::move(kept)) {
  CANOPY_CHECK(tasks_.size() == eval_targets_.size(), Error, tasks_.size(), " tasks but ",
               eval_targets_.size(), " target sets");
}

std::string FusionChooser::signature(const WorkUnit& unit) const {
  static const std::string cpu = cpu_model();
  std::ostringstream s;
  s << "cpu=" << cpu << " torch=" << TORCH_VERSION << " threads=" << threads_ << " batch=" << batch_size_
    << " " << heads::fusion_key(tasks_.at(unit.front())->head()) << " widths=";
  for (std::size_t k = 0; k < unit.size(); ++k)
    s << (k ? "," : "") << heads::fused_width(tasks_.at(unit[k])->head());
  if (direct_step(group_of(unit))) s << " step=direct";
  return s.str();
}

std::vector<tasks::Task*> FusionChooser::group_of(const WorkUnit& unit) const {
  std::vector<tasks::Task*> group;
  for (std::size_t i : unit) group.push_back(tasks_.at(i));
  return group;
}

bool FusionChooser::direct_step(const std::vector<tasks::Task*>& group) const {
  return tasks::takes_linear_softmax_step(group, at::empty({1, feature_dim_}).requires_grad_(shared_top_));
}

bool FusionChooser::operator()(const WorkUnit& unit) {
  if (unit.size() < 2) return true;
  std::string group;
  for (std::size_t i : unit) group += (group.empty() ? "" : " + ") + tasks_.at(i)->config().name;
  const std::string sig = signature(unit);
  if (const auto it = kept_.find(group); it != kept_.end()) {
    // The resumed checkpoint's decision, whatever the calibration file says now; a group of
    // the same shape not decided yet follows it too, as it would have in the run's first part.
    by_signature_.emplace(sig, it->second);
    decisions_[group] = it->second;
    return it->second.fuse;
  }
  auto known = by_signature_.find(sig);
  if (known == by_signature_.end() && agreed_) {
    FusionDecision d;  // fused, as on every other rank: no file, no timing
    d.fuse = true;
    known = by_signature_.emplace(sig, d).first;
  }
  if (known == by_signature_.end()) {
    FusionDecision d;
    if (file_.empty()) {
      d = measure(unit);
    } else {
      make_dirs(file_.substr(0, file_.find_last_of('/')));
      FileLock lock(file_ + ".lock");
      std::string contents;
      const auto recorded = parse_records(path_exists(file_) ? read_file(file_) : std::string(), &contents);
      const auto it = recorded.find(sig);
      if (it != recorded.end()) {
        d = it->second;
      } else {
        d = measure(unit);
        std::ostringstream line;
        line << "v1\t" << sig << "\t" << (d.fuse ? "fused" : "alone") << "\t" << std::fixed
             << std::setprecision(1) << d.fused_seconds * 1e6 << "\t" << d.alone_seconds * 1e6 << "\n";
        try {
          write_file_atomic(file_, contents + line.str());
        } catch (const std::exception& e) {
          log_info(detail::str_cat("fusion: cannot record the measurement in ", file_, " (", e.what(),
                                   "): later runs measure again and may decide differently"));
        }
      }
      if (!lock.held())
        log_info("fusion: cannot lock " + file_ + ".lock; measuring without waiting for other runs");
    }
    known = by_signature_.emplace(sig, d).first;
  }
  decisions_[group] = known->second;
  return known->second.fuse;
}

FusionDecision FusionChooser::measure(const WorkUnit& unit) {
  // A batch of the run's size: random features (a multiply's time does not depend on the
  // values) and the eval split's first targets, repeated if the split is smaller.
  at::Generator gen = at::detail::createCPUGenerator(20261130);
  const at::Tensor x = at::randn({batch_size_, feature_dim_}, gen, at::TensorOptions().dtype(at::kFloat))
                           .requires_grad_(shared_top_);
  const std::vector<tasks::Task*> group = group_of(unit);
  const bool direct = direct_step(group);
  std::vector<heads::Head*> heads_of;
  std::vector<at::Tensor> targets, rng_states;
  for (std::size_t i : unit) {
    tasks::Task* t = tasks_.at(i);
    heads_of.push_back(&t->head());
    const at::Tensor& y = eval_targets_.at(i);
    CANOPY_CHECK(y.size(0) > 0, Error, "fusion: task '", t->config().name, "' has no eval rows to time on");
    targets.push_back(y.index_select(0, at::arange(batch_size_) % y.size(0)));
    rng_states.push_back(t->head().rng().get_state());  // dropout draws; put back below
  }
  const int saved_threads = at::get_num_threads();
  at::set_num_threads(static_cast<int>(threads_));
  const auto fused_pass = [&] {
    if (direct) {
      tasks::linear_softmax_gradients(group, x, targets);
      return;
    }
    for (auto* t : group) t->begin_step();
    const auto outputs = heads::fused_forward(heads_of, x);
    at::Tensor total;
    for (std::size_t k = 0; k < group.size(); ++k) {
      const at::Tensor l = group[k]->loss(outputs[k], targets[k]);
      total = total.defined() ? total + l : l;
    }
    total.backward();
  };
  const auto alone_pass = [&] {
    for (std::size_t k = 0; k < group.size(); ++k) {
      if (direct) {
        tasks::linear_softmax_gradients({group[k]}, x, {targets[k]});
        continue;
      }
      group[k]->begin_step();
      group[k]->loss(heads_of[k]->forward(x), targets[k]).backward();
    }
  };
  const auto seconds = [](const auto& pass) {
    const auto t0 = Clock::now();
    pass();
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  FusionDecision d;
  d.source = FusionDecision::Source::kMeasuredNow;
  try {
    fused_pass();  // warm-up: first-touch allocations, kernel selection
    alone_pass();
    std::vector<double> fused, alone;
    for (int round = 0; round < 9; ++round) {  // interleaved, so drifts hit both alike
      if (round % 2) {
        alone.push_back(seconds(alone_pass));
        fused.push_back(seconds(fused_pass));
      } else {
        fused.push_back(seconds(fused_pass));
        alone.push_back(seconds(alone_pass));
      }
    }
    d.fused_seconds = median(fused);
    d.alone_seconds = median(alone);
    d.fuse = d.fused_seconds <= d.alone_seconds;
  } catch (const std::exception& e) {
    // A head that cannot even run a pass fails in training with its own message; here the
    // group simply stays fused, as train.fuse = always would have it.
    log_info(detail::str_cat("fusion: timing failed (", first_line(e.what()), "); fusing"));
    d.fuse = true;
  }
  at::set_num_threads(saved_threads);
  for (std::size_t k = 0; k < group.size(); ++k) {
    group[k]->begin_step();  // gradients cleared: the run starts as if nothing had run
    group[k]->head().rng().set_state(rng_states[k]);
  }
  return d;
}

std::string describe_decision(const std::string& group, const std::string& key, const FusionDecision& d) {
  std::ostringstream s;
  s << group;
  if (!key.empty()) s << " (" << key << ")";
  if (d.fused_seconds > 0 || d.alone_seconds > 0) {
    s << std::fixed << std::setprecision(2) << ": fused " << d.fused_seconds * 1e3 << " ms, alone "
      << d.alone_seconds * 1e3 << " ms per forward+backward -> " << (d.fuse ? "fused" : "alone")
      << (d.source == FusionDecision::Source::kMeasuredNow  ? " (measured now)"
          : d.source == FusionDecision::Source::kCheckpoint ? " (kept from the checkpoint)"
                                                            : " (measured before on this machine)");
  }
  return s.str();
}

void FusionChooser::agree(const FusionDecisions& agreed) {
  for (const auto& [group, d] : agreed) kept_[group] = d;  // rank 0's, over any of this rank's own
  by_signature_.clear();  // shapes this rank decided alone before: decided as the kept groups say
  agreed_ = true;
}

FusionDecisions FusionChooser::recorded() const {
  // The kept groups this run has not met (insert leaves the ones it has as they are).
  FusionDecisions all = decisions_;
  all.insert(kept_.begin(), kept_.end());
  return all;
}

std::string fusion_decisions_json(const FusionDecisions& decisions) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [group, d] : decisions) {
    j[group] = {{"fuse", d.fuse}, {"fused_ms", d.fused_seconds * 1e3}, {"alone_ms", d.alone_seconds * 1e3}};
  }
  return j.dump();
}

FusionDecisions read_fusion_decisions(const std::string& json) {
  FusionDecisions out;
  if (json.empty()) return out;
  try {
    const nlohmann::json parsed = nlohmann::json::parse(json);
    for (const auto& [group, d] : parsed.items()) {
      FusionDecision decision;
      decision.fuse = d.at("fuse").get<bool>();
      decision.fused_seconds = d.value("fused_ms", 0.0) * 1e-3;
      decision.alone_seconds = d.value("alone_ms", 0.0) * 1e-3;
      decision.source = FusionDecision::Source::kCheckpoint;
      out.emplace(group, decision);
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("the checkpoint's fusion decisions are malformed: ", e.what()));
  }
  return out;
}

}  // namespace canopy::runners
