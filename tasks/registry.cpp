#include "canopy/tasks/registry.h"

#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "canopy/heads/linear.h"
#include "canopy/heads/mlp.h"

namespace canopy::tasks {

std::string HeadParams::what(const std::string& key) const { return "task." + task_ + ".head." + key; }

bool HeadParams::has(const std::string& key) const { return values_.count(key) > 0; }

std::string HeadParams::get_string(const std::string& key, const std::string& fallback) const {
  used_.insert(key);
  const auto it = values_.find(key);
  return it == values_.end() ? fallback : it->second;
}

std::int64_t HeadParams::get_int(const std::string& key, std::int64_t fallback) const {
  used_.insert(key);
  const auto it = values_.find(key);
  return it == values_.end() ? fallback : parse_int(it->second, what(key));
}

double HeadParams::get_double(const std::string& key, double fallback) const {
  used_.insert(key);
  const auto it = values_.find(key);
  return it == values_.end() ? fallback : parse_double(it->second, what(key));
}

bool HeadParams::get_bool(const std::string& key, bool fallback) const {
  used_.insert(key);
  const auto it = values_.find(key);
  return it == values_.end() ? fallback : parse_bool(it->second, what(key));
}

std::vector<std::int64_t> HeadParams::get_int_list(const std::string& key,
                                                   const std::vector<std::int64_t>& fallback) const {
  used_.insert(key);
  const auto it = values_.find(key);
  return it == values_.end() ? fallback : parse_int_list(it->second, what(key));
}

void HeadParams::check_all_used(const std::string& head) const {
  std::vector<std::string> unused;
  unused_.clear();
  const std::vector<std::string> read(used_.begin(), used_.end());  // every option the head asked for
  for (const auto& kv : values_) {
    if (used_.count(kv.first)) continue;
    unused.push_back(what(kv.first) + did_you_mean(kv.first, read));
    unused_.push_back(kv.first);
  }
  if (leave_out_unused_) return;
  CANOPY_CHECK(unused.empty(), ConfigError, "unknown option(s) for head '", head, "': ", join(unused, ", "));
}

void HeadRegistry::add(const std::string& name, HeadFactory factory, std::string description) {
  CANOPY_CHECK(!name.empty(), ConfigError, "a head type needs a non-empty name");
  CANOPY_CHECK(!entries_.count(name), ConfigError, "head type '", name, "' is already registered");
  CANOPY_CHECK(static_cast<bool>(factory), ConfigError, "head type '", name, "' has no factory");
  entries_[name] = Entry{std::move(factory), std::move(description)};
}

bool HeadRegistry::contains(const std::string& name) const { return entries_.count(name) > 0; }

void HeadRegistry::check_known(const std::string& name, const std::string& task) const {
  if (contains(name)) return;
  std::vector<std::string> known;
  for (const auto& kv : entries_) known.push_back(kv.first);
  throw ConfigError(detail::str_cat("task '", task, "': unknown head '", name, "'", did_you_mean(name, known),
                                    " (registered heads: ", join(known, ", "), "; see `canopy heads`)"));
}

heads::HeadPtr HeadRegistry::create(const std::string& name, const HeadSpec& spec) const {
  check_known(name, spec.params.task());
  const auto it = entries_.find(name);
  heads::HeadPtr head = it->second.factory(spec);
  CANOPY_CHECK(head != nullptr, ConfigError, "head factory '", name, "' returned no head");
  spec.params.check_all_used(name);
  return head;
}

std::vector<std::pair<std::string, std::string>> HeadRegistry::list() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& kv : entries_) out.emplace_back(kv.first, kv.second.description);
  return out;
}

void register_builtin_heads(HeadRegistry& registry) {
  registry.add(
      "linear",
      [](const HeadSpec& s) {
        return std::make_shared<heads::LinearHead>(
            heads::LinearHeadOptions(s.in_features, s.out_features).bias(s.params.get_bool("bias", true)));
      },
      "one linear layer (a linear probe); options: head.bias = true");
  registry.add(
      "mlp",
      [](const HeadSpec& s) {
        heads::MlpHeadOptions o(s.in_features, s.out_features);
        o.hidden(s.params.get_int_list("hidden", o.hidden()))
            .activation(s.params.get_string("activation", o.activation()))
            .dropout(s.params.get_double("dropout", o.dropout()));
        return std::make_shared<heads::MlpHead>(o);
      },
      "multi-layer perceptron; options: head.hidden = 256 (comma-separated sizes), "
      "head.activation = relu|gelu|tanh|silu, head.dropout = 0");
}

}  // namespace canopy::tasks
