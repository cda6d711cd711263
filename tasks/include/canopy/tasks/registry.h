// The head registry: every head type that can be built by name. Built-ins are listed in
// one function, register_builtin_heads(); a program adds its own with registry.add().
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "canopy/heads/head.h"

namespace canopy::tasks {

// The `task.<name>.*` config values a head factory may read. Every value must be read by
// the factory: check_all_used() turns a misspelt key into an error naming it.
class HeadParams {
 public:
  HeadParams() = default;
  HeadParams(std::string task, std::map<std::string, std::string> values)
      : task_(std::move(task)), values_(std::move(values)) {}

  bool has(const std::string& key) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;
  std::int64_t get_int(const std::string& key, std::int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::vector<std::int64_t> get_int_list(const std::string& key,
                                         const std::vector<std::int64_t>& fallback) const;
  // ConfigError naming the options the head did not read; with leave_out_unused() (a grid
  // whose members are of several head types) they are only recorded, in unused().
  void check_all_used(const std::string& head) const;
  void leave_out_unused() { leave_out_unused_ = true; }
  const std::vector<std::string>& unused() const { return unused_; }
  const std::string& task() const { return task_; }

 private:
  std::string what(const std::string& key) const;
  std::string task_;
  std::map<std::string, std::string> values_;
  mutable std::set<std::string> used_;
  bool leave_out_unused_ = false;
  mutable std::vector<std::string> unused_;  // option names
};

struct HeadSpec {
  std::int64_t in_features = 0;   // feature dimension of the cache
  std::int64_t out_features = 0;  // the task's number of outputs
  HeadParams params;
};

using HeadFactory = std::function<heads::HeadPtr(const HeadSpec&)>;

class HeadRegistry {
 public:
  // Adds a head type; a duplicate name is a ConfigError.
  void add(const std::string& name, HeadFactory factory, std::string description);
  bool contains(const std::string& name) const;
  // ConfigError naming task `task`'s unknown head type `name`, the likely one meant and the
  // registered ones; nothing when it is registered.
  void check_known(const std::string& name, const std::string& task) const;
  // Builds a head; an unknown name or unused parameter is a ConfigError naming it.
  heads::HeadPtr create(const std::string& name, const HeadSpec& spec) const;
  // (name, description) for every registered head, by name.
  std::vector<std::pair<std::string, std::string>> list() const;

 private:
  struct Entry {
    HeadFactory factory;
    std::string description;
  };
  std::map<std::string, Entry> entries_;
};

// Registers canopy's built-in heads: linear, mlp.
void register_builtin_heads(HeadRegistry& registry);

}  // namespace canopy::tasks
