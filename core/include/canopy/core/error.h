// canopy's error types and the one check macro.
//
// Everything a user can cause (a bad config value, a missing file, a stale cache) is
// reported by throwing one of these, with a message shaped "what should be, what it
// was, where": `task 'group': label_map has 9 entries, the cache has 10 classes`.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace canopy {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};
// A configuration value or command-line argument is wrong.
class ConfigError : public Error {
 public:
  using Error::Error;
};
// Input data, a cache or a model file is missing, malformed or does not match.
class DataError : public Error {
 public:
  using Error::Error;
};
// A file system or library call failed.
class IoError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

// Runs `fn` and returns what it returns; a ConfigError, DataError or IoError it throws is thrown
// again as the same kind with `context` before its message (any other exception as it was).
template <class F>
decltype(auto) adding_context(const std::string& context, F&& fn) {
  try {
    return fn();
  } catch (const ConfigError& e) {
    throw ConfigError(context + e.what());
  } catch (const DataError& e) {
    throw DataError(context + e.what());
  } catch (const IoError& e) {
    throw IoError(context + e.what());
  }
}

}  // namespace canopy

// CANOPY_CHECK(cond, ErrorType, message parts...): throw ErrorType(message) unless cond.
#define CANOPY_CHECK(cond, ErrorType, ...)                     \
  do {                                                         \
    if (!(cond)) {                                             \
      throw ErrorType(::canopy::detail::str_cat(__VA_ARGS__)); \
    }                                                          \
  } while (false)
