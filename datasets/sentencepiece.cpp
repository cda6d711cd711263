#include "sentencepiece.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <iterator>
#include <limits>
#include <string_view>

#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/strings.h"
#include "unicode_classes.h"
#include "utf8.h"

namespace canopy::datasets {

const nlohmann::json& member(const nlohmann::json& j, const char* key, const std::string& where,
                             const std::string& path) {
  CANOPY_CHECK(j.is_object() && j.contains(key), DataError, "tokenizer '", path, "': ", where, " has no '",
               key, "'");
  return j.at(key);
}

namespace spm {

namespace {

std::string base64_decode(const std::string& text, const std::string& where) {
  auto value = [&](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  out.reserve(text.size() / 4 * 3);
  std::uint32_t bits = 0;
  int held = 0;
  std::size_t i = 0;
  for (; i < text.size() && text[i] != '='; ++i) {
    const int v = value(text[i]);
    CANOPY_CHECK(v >= 0, DataError, where, " is not base64 (character ", i, ")");
    bits = (bits << 6) | static_cast<std::uint32_t>(v);
    held += 6;
    if (held >= 8) {
      held -= 8;
      out += static_cast<char>((bits >> held) & 0xFF);
    }
  }
  for (; i < text.size(); ++i)
    CANOPY_CHECK(text[i] == '=', DataError, where, " is not base64 (character ", i, ")");
  return out;
}

// A regular expression that is one character repeated: "c{n,}" or "c+" (c may be escaped).
// Returns false for any other.
bool read_run(const std::string& regex, char32_t& c, std::size_t& min) {
  const std::u32string r = decode_utf8(regex);
  std::size_t i = 0;
  if (r.empty()) return false;
  if (r[0] == U'\\') {
    if (r.size() < 2 || std::isalnum(static_cast<int>(r[1] < 0x80 ? r[1] : 'a'))) return false;
    c = r[1];
    i = 2;
  } else {
    if (std::u32string_view(U".^$|?*+()[]{}").find(r[0]) != std::u32string_view::npos) return false;
    c = r[0];
    i = 1;
  }
  const std::u32string rest = r.substr(i);
  if (rest == U"+") {
    min = 1;
    return true;
  }
  if (rest.size() < 4 || rest.front() != U'{' || rest.substr(rest.size() - 2) != U",}") return false;
  min = 0;
  for (std::size_t k = 1; k + 2 < rest.size(); ++k) {
    if (rest[k] < U'0' || rest[k] > U'9') return false;
    min = min * 10 + (rest[k] - U'0');
  }
  return min >= 1;
}

void add_steps(const nlohmann::json& n, const std::string& path, std::vector<NormalizeStep>& steps) {
  const std::string type = n.value("type", "");
  NormalizeStep s;
  if (type == "Sequence") {
    for (const auto& m : member(n, "normalizers", "the Sequence normalizer", path)) add_steps(m, path, steps);
    return;
  }
  if (type == "Precompiled") {
    const nlohmann::json& map = member(n, "precompiled_charsmap", "the Precompiled normalizer", path);
    CANOPY_CHECK(map.is_string() && !map.get<std::string>().empty(), DataError, "tokenizer '", path,
                 "': the Precompiled normalizer's charsmap is empty");
    const std::string where =
        detail::str_cat("tokenizer '", path, "': the Precompiled normalizer's charsmap");
    s.kind = NormalizeStep::Kind::precompiled;
    s.charsmap = std::make_shared<const Charsmap>(base64_decode(map.get<std::string>(), where), where);
  } else if (type == "Replace") {
    const nlohmann::json& pattern = member(n, "pattern", "the Replace normalizer", path);
    s.content = decode_utf8(member(n, "content", "the Replace normalizer", path).get<std::string>());
    if (pattern.contains("String")) {
      s.kind = NormalizeStep::Kind::replace_text;
      s.pattern = decode_utf8(pattern.at("String").get<std::string>());
      CANOPY_CHECK(!s.pattern.empty(), DataError, "tokenizer '", path, "': a Replace normalizer replaces ''");
    } else {
      const std::string regex =
          member(pattern, "Regex", "the Replace normalizer's pattern", path).get<std::string>();
      s.kind = NormalizeStep::Kind::replace_run;
      CANOPY_CHECK(read_run(regex, s.run_char, s.run_min), DataError, "tokenizer '", path,
                   "': a Replace normalizer with the regular expression '", regex,
                   "' is not read (a run of one character, as ' {2,}' or ' +', is)");
    }
  } else if (type == "Strip") {
    s.kind = NormalizeStep::Kind::strip;
    s.left = n.value("strip_left", false);
    s.right = n.value("strip_right", false);
  } else {
    throw DataError(detail::str_cat("tokenizer '", path, "': normalizer '", type.empty() ? "?" : type,
                                    "' is not read with a Unigram model (Precompiled, Replace, Strip and a "
                                    "Sequence of them are: the SentencePiece conversions' own)"));
  }
  steps.push_back(std::move(s));
}

}  // namespace

// --- grapheme clusters -------------------------------------------------------------------
GraphemeBreak grapheme_break(char32_t c) {
  const auto* begin = std::begin(unicode::kGraphemeBreaks);
  const auto* end = std::end(unicode::kGraphemeBreaks);
  const auto* it =
      std::upper_bound(begin, end, c, [](char32_t v, const unicode::BreakRange& r) { return v < r.lo; });
  if (it == begin || c > (it - 1)->hi) return GraphemeBreak::other;
  return static_cast<GraphemeBreak>((it - 1)->value);
}

std::size_t grapheme_end(const std::u32string& s, std::size_t i) {
  using B = GraphemeBreak;
  auto control = [](B b) { return b == B::control || b == B::cr || b == B::lf; };
  B prev = grapheme_break(s[i]);
  std::size_t regional = prev == B::regional_indicator ? 1 : 0;  // regional indicators just before
  bool pictograph = prev == B::pictographic;                     // a pictograph, then only Extend
  bool pictograph_zwj = false;                                   // ... then a ZWJ
  std::size_t j = i + 1;
  for (; j < s.size(); ++j) {
    const B cur = grapheme_break(s[j]);
    bool join = false;
    if (prev == B::cr && cur == B::lf) {  // GB3
      join = true;
    } else if (control(prev) || control(cur)) {  // GB4, GB5
      join = false;
    } else if (prev == B::l) {  // GB6
      join = cur == B::l || cur == B::v || cur == B::lv || cur == B::lvt || cur == B::extend ||
             cur == B::zwj || cur == B::spacing_mark;
    } else if ((prev == B::lv || prev == B::v) && (cur == B::v || cur == B::t)) {  // GB7
      join = true;
    } else if ((prev == B::lvt || prev == B::t) && cur == B::t) {  // GB8
      join = true;
    } else if (cur == B::extend || cur == B::zwj || cur == B::spacing_mark) {  // GB9, GB9a
      join = true;
    } else if (prev == B::prepend) {  // GB9b
      join = true;
    } else if (prev == B::zwj && cur == B::pictographic) {  // GB11
      join = pictograph_zwj;
    } else if (prev == B::regional_indicator && cur == B::regional_indicator) {  // GB12, GB13
      join = regional % 2 == 1;
    }
    if (!join) break;
    pictograph_zwj = pictograph && cur == B::zwj;
    pictograph = cur == B::pictographic || (pictograph && cur == B::extend);
    regional = cur == B::regional_indicator ? regional + 1 : 0;
    prev = cur;
  }
  return j;
}

// --- the Precompiled normalizer ----------------------------------------------------------
Charsmap::Charsmap(std::string blob, const std::string& where) : where_(where) {
  CANOPY_CHECK(blob.size() >= 4, DataError, where, " is cut short (", blob.size(), " bytes)");
  const auto* p = reinterpret_cast<const unsigned char*>(blob.data());
  auto u32 = [&](std::size_t at) {
    return static_cast<std::uint32_t>(p[at]) | static_cast<std::uint32_t>(p[at + 1]) << 8 |
           static_cast<std::uint32_t>(p[at + 2]) << 16 | static_cast<std::uint32_t>(p[at + 3]) << 24;
  };
  const std::uint32_t trie_bytes = u32(0);
  CANOPY_CHECK(trie_bytes % 4 == 0 && trie_bytes >= 4 && 4 + std::size_t{trie_bytes} <= blob.size(),
               DataError, where, " is damaged: its trie of ", trie_bytes, " bytes does not fit its ",
               blob.size() - 4);
  units_.resize(trie_bytes / 4);
  for (std::size_t k = 0; k < units_.size(); ++k) units_[k] = u32(4 + 4 * k);
  replacements_ = blob.substr(4 + trie_bytes);
  CANOPY_CHECK(!first_invalid_utf8(replacements_), DataError, where,
               " is damaged: its replacements are not UTF-8");
}

bool Charsmap::transform(const std::string& utf8, std::u32string& out) const {
  // Darts' double array, as SentencePiece writes it: a unit holds a label (its low byte, with
  // bit 31), a leaf flag (bit 8) and the offset to its children (bits 10-31, scaled by bit 9).
  auto offset = [](std::uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); };
  std::size_t node = offset(units_[0]);
  for (const char ch : utf8) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == 0) break;
    node ^= c;
    if (node >= units_.size()) return false;
    const std::uint32_t unit = units_[node];
    if ((unit & ((1u << 31) | 0xFFu)) != c) return false;
    node ^= offset(unit);
    if ((unit >> 8) & 1u) {
      CANOPY_CHECK(node < units_.size(), DataError, where_, " is damaged: a leaf at ", node, " past its ",
                   units_.size(), " units");
      const std::size_t at = units_[node] & 0x7FFFFFFFu;
      CANOPY_CHECK(at <= replacements_.size(), DataError, where_, " is damaged: a replacement at ", at,
                   " past its ", replacements_.size(), " bytes");
      const std::size_t stop = replacements_.find('\0', at);
      out += decode_utf8(replacements_.substr(at, stop == std::string::npos ? std::string::npos : stop - at));
      return true;
    }
  }
  return false;
}

std::u32string Charsmap::normalize(const std::u32string& text) const {
  std::u32string out;
  out.reserve(text.size());
  std::string utf8;
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t j = grapheme_end(text, i);
    utf8.clear();
    for (std::size_t k = i; k < j; ++k) append_utf8(utf8, text[k]);
    const bool whole = utf8.size() < 6 && transform(utf8, out);
    for (std::size_t k = i; k < j && !whole; ++k) {
      if (j - i > 1 || utf8.size() >= 6) {
        utf8.clear();
        append_utf8(utf8, text[k]);
        if (transform(utf8, out)) continue;
      }
      out += text[k];
    }
    i = j;
  }
  return out;
}

// --- the normalizer's other steps ----------------------------------------------------------
std::vector<NormalizeStep> read_normalizer(const nlohmann::json& n, const std::string& path) {
  std::vector<NormalizeStep> steps;
  if (!n.is_null()) add_steps(n, path, steps);
  return steps;
}

std::u32string normalize(const std::vector<NormalizeStep>& steps, std::u32string text) {
  using Kind = NormalizeStep::Kind;
  for (const NormalizeStep& s : steps) {
    if (s.kind == Kind::precompiled) {
      text = s.charsmap->normalize(text);
    } else if (s.kind == Kind::strip) {
      std::size_t a = 0, b = text.size();
      while (s.left && a < b && is_white_space(text[a])) ++a;
      while (s.right && b > a && is_white_space(text[b - 1])) --b;
      text = text.substr(a, b - a);
    } else {
      std::u32string out;
      out.reserve(text.size());
      for (std::size_t i = 0; i < text.size();) {
        if (s.kind == Kind::replace_text) {
          if (text.compare(i, s.pattern.size(), s.pattern) == 0) {
            out += s.content;
            i += s.pattern.size();
          } else {
            out += text[i++];
          }
          continue;
        }
        std::size_t j = i;
        while (j < text.size() && text[j] == s.run_char) ++j;
        if (j == i) {
          out += text[i++];
          continue;
        }
        if (j - i >= s.run_min) {
          out += s.content;
        } else {
          out.append(text, i, j - i);
        }
        i = j;
      }
      text = std::move(out);
    }
  }
  return text;
}

// --- Metaspace -----------------------------------------------------------------------------
Metaspace read_metaspace(const nlohmann::json& pre, const std::string& path) {
  const nlohmann::json* m = &pre;
  if (pre.value("type", "") == "Sequence" && pre.value("pretokenizers", nlohmann::json()).size() == 1) {
    m = &pre.at("pretokenizers").at(0);
  }
  CANOPY_CHECK(m->value("type", "") == "Metaspace", DataError, "tokenizer '", path,
               "': a Unigram model under pre-tokenizer '", pre.value("type", "?"),
               "' is not read (Metaspace is, or none)");
  Metaspace out;
  const std::u32string r =
      decode_utf8(member(*m, "replacement", "the Metaspace pre-tokenizer", path).get<std::string>());
  CANOPY_CHECK(r.size() == 1, DataError, "tokenizer '", path,
               "': the Metaspace replacement is not one character");
  out.replacement = r[0];
  const std::string scheme = m->value("prepend_scheme", std::string("always"));
  CANOPY_CHECK(scheme == "always" || scheme == "first" || scheme == "never", DataError, "tokenizer '", path,
               "': Metaspace prepend_scheme '", scheme, "' is not one of always, first, never");
  out.prepend = scheme == "first"   ? Metaspace::Prepend::first
                : scheme == "never" ? Metaspace::Prepend::never
                                    : Metaspace::Prepend::always;
  const nlohmann::json& add = m->value("add_prefix_space", nlohmann::json());
  if (add.is_boolean() && !add.get<bool>()) {  // as tokenizers reads an older file
    CANOPY_CHECK(out.prepend == Metaspace::Prepend::never, DataError, "tokenizer '", path,
                 "': Metaspace add_prefix_space = false does not match prepend_scheme '", scheme, "'");
  }
  out.split = m->value("split", true);
  return out;
}

std::vector<std::string> Metaspace::pieces(std::u32string text, bool starts_text) const {
  std::vector<std::string> out;
  if (text.empty()) return out;
  std::replace(text.begin(), text.end(), U' ', replacement);
  if ((prepend == Prepend::always || (prepend == Prepend::first && starts_text)) && text[0] != replacement) {
    text.insert(text.begin(), replacement);
  }
  if (!split) return {to_utf8(text)};
  std::size_t start = 0;
  for (std::size_t i = 1; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == replacement) {
      out.push_back(to_utf8(text.substr(start, i - start)));
      start = i;
    }
  }
  return out;
}

// --- the Unigram model -------------------------------------------------------------------
Unigram::Unigram(const nlohmann::json& model, const std::string& path) {
  const nlohmann::json& vocab = member(model, "vocab", "its model", path);
  CANOPY_CHECK(vocab.is_array() && !vocab.empty(), DataError, "tokenizer '", path,
               "' has an empty vocabulary");
  scores_.reserve(vocab.size());
  double min_score = std::numeric_limits<double>::infinity();
  for (const auto& item : vocab) {
    const auto id = static_cast<std::int64_t>(scores_.size());
    CANOPY_CHECK(item.is_array() && item.size() == 2, DataError, "tokenizer '", path, "': vocabulary entry ",
                 id, " is not [token, score]");
    scores_.push_back(item.at(1).get<double>());
    ids_[item.at(0).get<std::string>()] = id;
    min_score = std::min(min_score, scores_.back());
  }
  const nlohmann::json& unk = model.value("unk_id", nlohmann::json());
  CANOPY_CHECK(
      !unk.is_null(), DataError, "tokenizer '", path,
      "' has no unknown token (its Unigram model's unk_id is null): a character outside its vocabulary "
      "could not be encoded");
  unk_ = unk.get<std::int64_t>();
  CANOPY_CHECK(unk_ >= 0 && unk_ < static_cast<std::int64_t>(scores_.size()), DataError, "tokenizer '", path,
               "': its unk_id ", unk_, " is outside its vocabulary of ", scores_.size());
  unk_score_ = min_score - 10.0;  // tokenizers' kUnkPenalty
  byte_fallback_ = model.value("byte_fallback", false);
  std::vector<std::pair<std::string, std::int64_t>> tokens(ids_.begin(), ids_.end());
  build_trie(tokens);
}

void Unigram::build_trie(std::vector<std::pair<std::string, std::int64_t>>& tokens) {
  std::sort(tokens.begin(), tokens.end());
  nodes_.assign(1, Node{});
  // (node, tokens [lo, hi) that all begin with the node's `depth` bytes)
  struct Task {
    std::uint32_t node;
    std::size_t lo, hi, depth;
  };
  std::vector<Task> todo{{0, 0, tokens.size(), 0}};
  while (!todo.empty()) {
    Task t = todo.back();
    todo.pop_back();
    if (t.lo < t.hi && tokens[t.lo].first.size() == t.depth) {
      if (t.depth > 0) nodes_[t.node].id = tokens[t.lo].second;  // the empty token never matches
      ++t.lo;
    }
    nodes_[t.node].first_edge = static_cast<std::uint32_t>(edges_.size());
    for (std::size_t k = t.lo; k < t.hi;) {
      const char label = tokens[k].first[t.depth];
      std::size_t e = k;
      while (e < t.hi && tokens[e].first[t.depth] == label) ++e;
      const auto child = static_cast<std::uint32_t>(nodes_.size());
      nodes_.push_back(Node{});
      edges_.push_back({static_cast<unsigned char>(label), child});
      ++nodes_[t.node].edges;
      todo.push_back({child, k, e, t.depth + 1});
      k = e;
    }
  }
}

void Unigram::encode(const std::string& piece, std::vector<std::int64_t>& ids) const {
  const std::size_t n = piece.size();
  if (n == 0) return;
  struct Best {
    double score = 0;
    std::int64_t id = 0;
    std::ptrdiff_t start = -1;
  };
  std::vector<Best> best(n + 1);
  auto offer = [&](std::size_t start, std::size_t end, std::int64_t id, double score) {
    Best& b = best[end];
    const double candidate = score + best[start].score;
    if (b.start < 0 || candidate > b.score) b = {candidate, id, static_cast<std::ptrdiff_t>(start)};
  };
  for (std::size_t start = 0; start < n;) {
    // A byte that begins no character (not in what to_utf8 writes) counts as one.
    const int lead = std::max(1, utf8_length(static_cast<unsigned char>(piece[start])));
    const std::size_t char_len = std::min(static_cast<std::size_t>(lead), n - start);
    bool single = false;
    std::uint32_t node = 0;
    for (std::size_t k = start; k < n; ++k) {
      const Node& at = nodes_[node];
      const auto* first = edges_.data() + at.first_edge;
      const auto* last = first + at.edges;
      const auto c = static_cast<unsigned char>(piece[k]);
      const auto* e =
          std::lower_bound(first, last, c, [](const Edge& x, unsigned char v) { return x.label < v; });
      if (e == last || e->label != c) break;
      node = e->child;
      const std::int64_t id = nodes_[node].id;
      if (id < 0) continue;
      offer(start, k + 1, id, scores_[static_cast<std::size_t>(id)]);
      if (k + 1 - start == char_len) single = true;
    }
    if (!single) offer(start, start + char_len, unk_, unk_score_);
    start += char_len;
  }
  // Back from the end; adjacent unknown pieces are one, looked up again (as tokenizers does).
  struct Span {
    std::size_t start, end;
    std::int64_t id;
  };
  std::vector<Span> spans;
  for (std::size_t end = n; end > 0;) {
    const Best& b = best[end];
    const auto start = static_cast<std::size_t>(b.start);
    if (b.id == unk_ && !spans.empty() && spans.back().id == unk_) {
      spans.back().start = start;
    } else {
      spans.push_back({start, end, b.id});
    }
    end = start;
  }
  for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
    if (it->id != unk_) {
      ids.push_back(it->id);
      continue;
    }
    const std::string text = piece.substr(it->start, it->end - it->start);
    const auto known = ids_.find(text);
    if (known != ids_.end()) {
      ids.push_back(known->second);
      continue;
    }
    if (byte_fallback_) {
      std::vector<std::int64_t> bytes;
      char name[8];
      for (const char b : text) {
        std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned>(static_cast<unsigned char>(b)));
        const auto byte_id = ids_.find(name);
        if (byte_id == ids_.end()) break;
        bytes.push_back(byte_id->second);
      }
      if (bytes.size() == text.size()) {
        ids.insert(ids.end(), bytes.begin(), bytes.end());
        continue;
      }
    }
    ids.push_back(unk_);
  }
}

}  // namespace spm
}  // namespace canopy::datasets
