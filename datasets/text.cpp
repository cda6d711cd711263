#include "canopy/datasets/text.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <queue>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "canopy/core/error.h"
#include "canopy/core/progress.h"
#include "canopy/core/sha256.h"
#include "canopy/core/strings.h"
#include "gz_file.h"
#include "sentencepiece.h"
#include "unicode_classes.h"
#include "utf8.h"

namespace canopy::datasets {

struct TextTokenizer::SentencePiece {
  std::vector<spm::NormalizeStep> steps;
  bool pre_tokenizes = false;  // false: the file has no pre-tokenizer
  spm::Metaspace metaspace;
  spm::Unigram model;
};

namespace {

// --- character classes: tokenizers' BERT rules (unicode_classes.h) -----------------------------
bool in(char32_t c, char32_t lo, char32_t hi) { return c >= lo && c <= hi; }

bool in_ranges(char32_t c, const unicode::CodeRange* begin, const unicode::CodeRange* end) {
  const auto* it =
      std::upper_bound(begin, end, c, [](char32_t v, const unicode::CodeRange& r) { return v < r.lo; });
  return it != begin && c <= (it - 1)->hi;
}

// BertNormalizer's control characters, removed by clean_text: unicode_categories' "other" (Cc Cf
// Co Cs, as Unicode 8.0 has them) except \t \n \r.
bool is_control(char32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  if (c < 0x80) return c < 0x20 || c == 0x7F;
  return in_ranges(c, std::begin(unicode::kOther8), std::end(unicode::kOther8));
}

// BertPreTokenizer's punctuation: ASCII's, and Unicode's P* (Unicode 8.0).
bool is_punctuation(char32_t c) {
  if (c < 0x80) return in(c, 33, 47) || in(c, 58, 64) || in(c, 91, 96) || in(c, 123, 126);
  return in_ranges(c, std::begin(unicode::kPunctuation8), std::end(unicode::kPunctuation8));
}

// BertNormalizer's Chinese characters (tokenizers' ranges: its CJK Extension E starts at U+2B920).
bool is_cjk(char32_t c) {
  return in(c, 0x4E00, 0x9FFF) || in(c, 0x3400, 0x4DBF) || in(c, 0x20000, 0x2A6DF) ||
         in(c, 0x2A700, 0x2B73F) || in(c, 0x2B740, 0x2B81F) || in(c, 0x2B920, 0x2CEAF) ||
         in(c, 0xF900, 0xFAFF) || in(c, 0x2F800, 0x2FA1F);
}

// Nonspacing marks (Mn, Unicode 8.0): what strip_accents removes after NFD.
bool is_nonspacing_mark(char32_t c) {
  return c >= 0x300 &&
         in_ranges(c, std::begin(unicode::kNonspacingMarks8), std::end(unicode::kNonspacingMarks8));
}

// Rust's char::to_lowercase where it is one character (U+0130, the one of two, is the caller's).
char32_t to_lower(char32_t c) {
  if (c < 0x80) return in(c, 'A', 'Z') ? c + 32 : c;
  const auto* begin = std::begin(unicode::kLowercase);
  const auto* end = std::end(unicode::kLowercase);
  const auto* it =
      std::lower_bound(begin, end, c, [](const unicode::CasePair& p, char32_t v) { return p.upper < v; });
  return it != end && it->upper == c ? it->lower : c;
}

// strip_accents on one character: its NFD (Hangul syllables into their jamo), nonspacing marks
// removed, appended to `out`. Canonical reordering of marks is not done: the marks it would
// reorder are removed.
void append_stripped(char32_t c, std::u32string& out) {
  if (c < 0xC0) {  // nothing below À decomposes or is a mark
    out += c;
    return;
  }
  if (in(c, 0xAC00, 0xD7A3)) {
    const char32_t k = c - 0xAC00;
    out += static_cast<char32_t>(0x1100 + k / 588);
    out += static_cast<char32_t>(0x1161 + k % 588 / 28);
    if (k % 28 != 0) out += static_cast<char32_t>(0x11A7 + k % 28);
    return;
  }
  const auto* begin = std::begin(unicode::kDecompositions);
  const auto* end = std::end(unicode::kDecompositions);
  const auto* it =
      std::lower_bound(begin, end, c, [](const unicode::Decomposition& d, char32_t v) { return d.cp < v; });
  if (it == end || it->cp != c) {
    if (!is_nonspacing_mark(c)) out += c;
    return;
  }
  for (const char32_t part : it->nfd) {
    if (part == 0) break;
    if (!is_nonspacing_mark(part)) out += part;
  }
}

// The regular expressions' \w, as tokenizers' added-token matching reads it (approximated
// outside ASCII: any character that is neither space, punctuation nor control, so symbols too).
bool is_word_char(char32_t c) {
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) != 0 || c == '_';
  return !is_white_space(c) && !is_punctuation(c) && !is_control(c);
}

// --- byte-level BPE (GPT-2, RoBERTa) --------------------------------------------------------
bool is_letter(char32_t c) {
  return in_ranges(c, std::begin(unicode::kLetters), std::end(unicode::kLetters));
}
bool is_number(char32_t c) {
  return in_ranges(c, std::begin(unicode::kNumbers), std::end(unicode::kNumbers));
}

// Where the match of GPT-2's pre-tokenizing pattern that starts at `i` ends:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (every character is a letter, a number, a space or another, so a match starts at every i).
std::size_t gpt2_match(const std::u32string& t, std::size_t i) {
  const std::size_t n = t.size();
  if (t[i] == '\'' && i + 1 < n) {
    const char32_t a = t[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      const char32_t b = t[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  const std::size_t s = t[i] == ' ' && i + 1 < n ? i + 1 : i;
  auto other = [](char32_t c) { return !is_white_space(c) && !is_letter(c) && !is_number(c); };
  for (bool (*cls)(char32_t) : {&is_letter, &is_number, +other}) {
    if (!cls(t[s])) continue;
    std::size_t j = s;
    while (j < n && cls(t[j])) ++j;
    return j;
  }
  std::size_t j = i;  // a space run: all of it at the end, else all but the blank before the next word
  while (j < n && is_white_space(t[j])) ++j;
  return j < n && j - i >= 2 ? j - 1 : j;
}

std::uint64_t merge_key(std::int64_t left, std::int64_t right) {
  return static_cast<std::uint64_t>(left) << 32 | static_cast<std::uint32_t>(right);
}

// GPT-2's stand-ins for bytes: printable Latin-1 bytes are themselves, the others (controls,
// space, soft hyphen...) U+0100 onwards in byte order; each as UTF-8.
const std::array<std::string, 256>& byte_stand_ins() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> out;
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = in(b, '!', '~') || in(b, 0xA1, 0xAC) || in(b, 0xAE, 0xFF);
      append_utf8(out[b], printable ? static_cast<char32_t>(b) : next++);
    }
    return out;
  }();
  return table;
}

// A stretch of text, or an added token's id.
struct Piece {
  std::u32string text;
  std::int64_t id = -1;
};

// Splits `text` around the added tokens it holds, as tokenizers' AddedVocabulary::find_matches
// does: leftmost-longest matches, not overlapping; a single_word token only between non-word
// characters; lstrip and rstrip take the blanks beside a token into it.
std::vector<Piece> split_added(const std::u32string& text,
                               const std::vector<TextTokenizer::AddedToken>& tokens) {
  std::vector<Piece> out;
  std::size_t done = 0;  // text before this is in `out`
  std::size_t at = 0;    // where the next match may start
  while (at < text.size() && !tokens.empty()) {
    const TextTokenizer::AddedToken* found = nullptr;
    std::size_t start = at;
    for (; start < text.size() && found == nullptr; ++start) {
      for (const auto& t : tokens) {  // the longest first
        if (!t.content.empty() && text.compare(start, t.content.size(), t.content) == 0) {
          found = &t;
          break;
        }
      }
    }
    if (found == nullptr) break;
    --start;
    std::size_t stop = start + found->content.size();
    at = stop;
    if (found->single_word &&
        ((start > 0 && is_word_char(text[start - 1])) || (stop < text.size() && is_word_char(text[stop])))) {
      continue;
    }
    if (found->lstrip) {
      while (start > done && is_white_space(text[start - 1])) --start;
    }
    if (found->rstrip) {
      while (stop < text.size() && is_white_space(text[stop])) ++stop;
    }
    if (done < start) out.push_back({text.substr(done, start - done)});
    out.push_back({{}, found->id});
    done = stop;
    at = std::max(at, stop);
  }
  if (done < text.size()) out.push_back({text.substr(done)});
  return out;
}

// The ids of a post-processor's special tokens before and after the text (a single sequence).
void special_tokens(const nlohmann::json& p, const std::string& path, std::vector<std::int64_t>& before,
                    std::vector<std::int64_t>& after) {
  if (p.is_null()) return;
  const std::string type = p.value("type", "");
  if (type == "ByteLevel") return;  // offsets only (GPT-2's: nothing around a text)
  if (type == "Sequence") {
    for (const auto& q : member(p, "processors", "the Sequence post-processor", path)) {
      special_tokens(q, path, before, after);
    }
    return;
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    before.push_back(member(p, "cls", type, path).at(1).get<std::int64_t>());
    after.push_back(member(p, "sep", type, path).at(1).get<std::int64_t>());
    return;
  }
  CANOPY_CHECK(type == "TemplateProcessing", DataError, "tokenizer '", path, "': post-processor '", type,
               "' is not read (BertProcessing, RobertaProcessing and TemplateProcessing are)");
  const nlohmann::json& specials = member(p, "special_tokens", type, path);
  bool seen_text = false;
  for (const auto& item : member(p, "single", type, path)) {
    if (item.contains("Sequence")) {
      CANOPY_CHECK(!seen_text, DataError, "tokenizer '", path, "': its template names the text twice");
      seen_text = true;
      continue;
    }
    const std::string name =
        member(item, "SpecialToken", "a template item", path).at("id").get<std::string>();
    CANOPY_CHECK(specials.contains(name), DataError, "tokenizer '", path, "': its template names '", name,
                 "', which its special_tokens do not list");
    for (const auto& id : specials.at(name).at("ids"))
      (seen_text ? after : before).push_back(id.get<std::int64_t>());
  }
}

}  // namespace

void validate_tokenizer_config(const TokenizerConfig& c) {
  CANOPY_CHECK(!c.vocab.empty() || !c.tokenizer.empty(), ConfigError,
               "texts need a tokenizer: give text.tokenizer (the trunk's tokenizer.json) or text.vocab (its "
               "vocab.txt)");
  CANOPY_CHECK(c.vocab.empty() || c.tokenizer.empty(), ConfigError, "text.vocab ('", c.vocab,
               "') and text.tokenizer ('", c.tokenizer,
               "') are both given: give one (tokenizer.json says everything vocab.txt does, and more)");
  for (const auto& [key, path, file] : {std::tuple{"text.tokenizer", &c.tokenizer, "tokenizer.json"},
                                        std::tuple{"text.vocab", &c.vocab, "vocab.txt"}}) {
    std::error_code ec;
    if (path->empty() || !std::filesystem::is_directory(*path, ec)) continue;
    const std::filesystem::path inside = std::filesystem::path(*path) / file;
    throw ConfigError(detail::str_cat(key, " = '", *path, "' is a folder: give the file, ",
                                      std::filesystem::exists(inside, ec)
                                          ? detail::str_cat("'", inside.string(), "'")
                                          : detail::str_cat("its ", file, " (the folder holds none)")));
  }
  CANOPY_CHECK(c.max_length >= 3 && c.max_length <= 4096, ConfigError,
               "text.max_length must be in [3, 4096] (it counts the special tokens around a text, [CLS] and "
               "[SEP]), got ",
               c.max_length);
}

std::string describe(const TokenizerConfig& c) {
  // The prompt as a JSON string (one line, its blanks visible), only when there is one: caches
  // built before text.prompt keep their fingerprint.
  const std::string prompt = c.prompt.empty() ? "" : ";prompt=" + nlohmann::json(c.prompt).dump();
  // unicode=all: BERT's rules (controls, punctuation, accents, case) know every script since
  // 2026-12-08, where they knew Latin, Greek and Cyrillic: a cache built before is rebuilt.
  if (!c.tokenizer.empty()) {
    return detail::str_cat("tokenizer.json;sha256=", sha256_file(c.tokenizer), ";max_length=", c.max_length,
                           ";unicode=all", prompt);
  }
  // hangul=jamo: accent stripping splits Hangul syllables as NFD does (since 2026-12-07).
  return detail::str_cat("wordpiece;vocab_sha256=", sha256_file(c.vocab), ";lowercase=", c.lowercase ? 1 : 0,
                         ";max_length=", c.max_length, ";strip_accents=", c.lowercase ? 1 : 0,
                         c.lowercase ? ";hangul=jamo" : "", ";unicode=all", prompt);
}

TextTokenizer::TextTokenizer(const TokenizerConfig& config) : config_(config) {
  validate_tokenizer_config(config);
  if (config.tokenizer.empty()) {
    load_vocab_txt();
  } else {
    load_tokenizer_json();
  }
  const std::size_t specials = before_.size() + after_.size();
  CANOPY_CHECK(config.max_length > static_cast<std::int64_t>(specials), ConfigError,
               "text.max_length = ", config.max_length, " leaves no room for text: the tokenizer puts ",
               specials, " special tokens around each one");
  if (!config.prompt.empty()) {
    const std::size_t prompt_tokens = encode("").size() - specials;  // the prompt alone, cut to max_length
    CANOPY_CHECK(prompt_tokens + specials < static_cast<std::size_t>(config.max_length), ConfigError,
                 "text.prompt '", config.prompt, "' fills text.max_length = ", config.max_length,
                 ": its tokens (", prompt_tokens, " or more) and the ", specials,
                 " special tokens leave no room for the text");
  }
  std::int64_t largest = -1;
  for (const auto& [token, id] : vocab_) largest = std::max(largest, id);
  vocab_size_ = largest + 1;
}

void TextTokenizer::load_vocab_txt() {
  const std::string& path = config_.vocab;
  std::ifstream in(path);
  CANOPY_CHECK(in, DataError, "cannot open vocabulary '", path, "': ", std::strerror(errno));
  std::string line;
  std::int64_t id = 0;
  // Not read_text_line: the reference (transformers' load_vocab) keeps a byte-order mark.
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    vocab_.emplace(line, id++);  // a duplicate keeps its first id, as the reference does
  }
  CANOPY_CHECK(id > 0, DataError, "vocabulary '", path, "' is empty");
  auto required = [&](const std::string& t) {
    const auto it = vocab_.find(t);
    CANOPY_CHECK(it != vocab_.end(), DataError, "vocabulary '", path, "' has no ", t, " token");
    return it->second;
  };
  before_ = {required("[CLS]")};
  after_ = {required("[SEP]")};
  unk_ = required("[UNK]");
  pad_ = required("[PAD]");
  normalizer_.strip_accents = normalizer_.lowercase = config_.lowercase;
  static std::atomic<bool> said{false};
  if (vocab_.count("<s>") && vocab_.count("</s>") && !said.exchange(true)) {
    const std::string beside = (std::filesystem::path(path).parent_path() / "tokenizer.json").string();
    log_info(
        detail::str_cat("vocabulary '", path,
                        "' also holds <s> and </s>: models such as MPNet wrap a text in those, where a "
                        "vocab.txt gives [CLS] ... [SEP]; text.tokenizer = the model's tokenizer.json says "
                        "which",
                        std::filesystem::exists(beside) ? " ('" + beside + "' is beside it)" : ""));
  }
}

// BertNormalizer's switches (none: the file has no normalizer); text.lowercase must agree.
void TextTokenizer::read_normalizer(const nlohmann::json& n) {
  const std::string& path = config_.tokenizer;
  normalizes_ = !n.is_null();
  if (normalizes_) {
    CANOPY_CHECK(n.value("type", "") == "BertNormalizer", DataError, "tokenizer '", path, "': normalizer '",
                 n.value("type", ""), "' is not read (BertNormalizer is)");
    normalizer_.clean_text = n.value("clean_text", true);
    normalizer_.chinese_chars = n.value("handle_chinese_chars", true);
    normalizer_.lowercase = n.value("lowercase", true);
    const nlohmann::json& strip = n.value("strip_accents", nlohmann::json());
    normalizer_.strip_accents = strip.is_null() ? normalizer_.lowercase : strip.get<bool>();
  }
  const bool lowercases = normalizes_ && normalizer_.lowercase;
  CANOPY_CHECK(!config_.lowercase_given || config_.lowercase == lowercases, ConfigError,
               "text.lowercase = ", config_.lowercase ? "true" : "false", ", but tokenizer '", path, "' ",
               lowercases ? "lowercases" : "keeps case",
               ": leave text.lowercase out (a tokenizer.json says it itself)");
}

void TextTokenizer::read_added_tokens(const nlohmann::json& tokens, std::int64_t model_size) {
  const std::string& path = config_.tokenizer;
  // Each added token's id as tokenizers gives it when it loads the file (the file's own "id"
  // only warns there): the vocabulary's id of a token it holds, else the next after them
  // (`model_size`: the model's own vocabulary).
  std::int64_t largest_added = -1;
  for (const auto& t : tokens) {
    AddedToken a;
    const std::string content = member(t, "content", "an added token", path).get<std::string>();
    const auto known = vocab_.find(content);
    a.id = known != vocab_.end() ? known->second
           : largest_added < 0   ? model_size
                                 : std::max(largest_added + 1, model_size);
    largest_added = std::max(largest_added, a.id);
    a.single_word = t.value("single_word", false);
    a.lstrip = t.value("lstrip", false);
    a.rstrip = t.value("rstrip", false);
    a.normalized = t.value("normalized", false);
    vocab_.emplace(content, a.id);
    a.content = decode_utf8(content);
    if (a.normalized && normalizes_) a.content = normalize(a.content);
    (a.normalized ? normalized_added_ : raw_added_).push_back(std::move(a));
  }
  for (auto* list : {&raw_added_, &normalized_added_}) {
    std::stable_sort(list->begin(), list->end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
  }
}

// The padding id: the file's "padding", else its [PAD] or <pad> token.
void TextTokenizer::read_padding(const nlohmann::json& padding) {
  const std::string& path = config_.tokenizer;
  if (padding.is_object() && padding.contains("pad_id")) {
    pad_ = padding.at("pad_id").get<std::int64_t>();
  } else {
    const auto it = vocab_.count("[PAD]") ? vocab_.find("[PAD]") : vocab_.find("<pad>");
    CANOPY_CHECK(it != vocab_.end(), DataError, "tokenizer '", path,
                 "' names no padding token (no \"padding\", no [PAD] or <pad> token)");
    pad_ = it->second;
  }
}

void TextTokenizer::load_tokenizer_json() {
  const std::string& path = config_.tokenizer;
  std::ifstream in(path);
  CANOPY_CHECK(in, DataError, "cannot open tokenizer '", path, "': ", std::strerror(errno));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw DataError(detail::str_cat("tokenizer '", path, "' is not JSON: ", e.what()));
  }
  try {
    const nlohmann::json& model = member(j, "model", "the file", path);
    const std::string type = model.value("type", "");
    CANOPY_CHECK(type == "WordPiece" || type == "BPE" || type == "Unigram", DataError, "tokenizer '", path,
                 "' is a ", type.empty() ? "?" : type,
                 " model: canopy reads WordPiece tokenizers (BERT, MiniLM, MPNet, bge, e5 and their kin), "
                 "byte-level BPE ones (GPT-2, RoBERTa) and SentencePiece Unigram ones (XLM-R, "
                 "multilingual-e5, T5), not WordLevel ones");
    bpe_ = type == "BPE";
    std::int64_t model_size = 0;
    if (type == "Unigram") {
      load_unigram(j, model);
      model_size = static_cast<std::int64_t>(spm_->model.size());
    } else if (bpe_) {
      load_byte_level_bpe(j, model);
    } else {
      for (const auto& [token, id] : member(model, "vocab", "its model", path).items()) {
        vocab_.emplace(token, id.get<std::int64_t>());
      }
      CANOPY_CHECK(!vocab_.empty(), DataError, "tokenizer '", path, "' has an empty vocabulary");
      prefix_ = model.value("continuing_subword_prefix", std::string("##"));
      max_chars_ = model.value("max_input_chars_per_word", std::size_t{100});
      const nlohmann::json& pre = j.value("pre_tokenizer", nlohmann::json());
      CANOPY_CHECK(pre.value("type", "") == "BertPreTokenizer", DataError, "tokenizer '", path,
                   "': pre-tokenizer '", pre.is_null() ? "none" : pre.value("type", ""),
                   "' is not read (BertPreTokenizer is)");
    }

    if (!spm_) {
      model_size = static_cast<std::int64_t>(vocab_.size());
      read_normalizer(j.value("normalizer", nlohmann::json()));
    }

    read_added_tokens(j.value("added_tokens", nlohmann::json::array()), model_size);
    if (!bpe_ && !spm_) {
      const std::string unk = model.value("unk_token", std::string("[UNK]"));
      const auto unk_it = vocab_.find(unk);
      CANOPY_CHECK(unk_it != vocab_.end(), DataError, "tokenizer '", path, "': its unknown token '", unk,
                   "' is not in its vocabulary");
      unk_ = unk_it->second;
    }

    special_tokens(j.value("post_processor", nlohmann::json()), path, before_, after_);

    read_padding(j.value("padding", nlohmann::json()));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(
        detail::str_cat("tokenizer '", path, "' is not a tokenizers file as canopy reads it: ", e.what()));
  }
}

void TextTokenizer::load_byte_level_bpe(const nlohmann::json& j, const nlohmann::json& model) {
  const std::string& path = config_.tokenizer;
  CANOPY_CHECK(
      model.value("dropout", nlohmann::json()).is_null() && !model.value("byte_fallback", false) &&
          model.value("continuing_subword_prefix", nlohmann::json()).is_null() &&
          model.value("end_of_word_suffix", nlohmann::json()).is_null(),
      DataError, "tokenizer '", path,
      "': a BPE model with dropout, byte_fallback, continuing_subword_prefix or end_of_word_suffix is "
      "not read (byte-level BPE as GPT-2's and RoBERTa's is)");
  const nlohmann::json& pre = j.value("pre_tokenizer", nlohmann::json());
  const nlohmann::json* byte_level = &pre;
  if (pre.value("type", "") == "Sequence" && pre.value("pretokenizers", nlohmann::json()).size() == 1) {
    byte_level = &pre.at("pretokenizers").at(0);
  }
  CANOPY_CHECK(byte_level->value("type", "") == "ByteLevel", DataError, "tokenizer '", path,
               "': a BPE model under pre-tokenizer '", pre.is_null() ? "none" : pre.value("type", ""),
               "' is not read (ByteLevel is: GPT-2's, RoBERTa's)");
  add_prefix_space_ = byte_level->value("add_prefix_space", true);
  use_regex_ = byte_level->value("use_regex", true);
  ignore_merges_ = model.value("ignore_merges", false);
  fuse_unk_ = model.value("fuse_unk", false);
  for (const auto& [token, id] : member(model, "vocab", "its model", path).items()) {
    vocab_.emplace(token, id.get<std::int64_t>());
  }
  CANOPY_CHECK(!vocab_.empty(), DataError, "tokenizer '", path, "' has an empty vocabulary");
  std::int64_t rank = 0;
  for (const auto& m : member(model, "merges", "its model", path)) {
    std::string left, right;
    if (m.is_string()) {  // "a b", as older files write a merge
      const std::string s = m.get<std::string>();
      const std::size_t space = s.find(' ');
      CANOPY_CHECK(space != std::string::npos && s.find(' ', space + 1) == std::string::npos, DataError,
                   "tokenizer '", path, "': merge ", rank, " '", s, "' is not two tokens");
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else {
      left = m.at(0).get<std::string>();
      right = m.at(1).get<std::string>();
    }
    for (const std::string& t : {left, right, left + right}) {
      CANOPY_CHECK(vocab_.count(t), DataError, "tokenizer '", path, "': merge ", rank, " ('", left, "' '",
                   right, "') names '", t, "', which its vocabulary does not hold");
    }
    merges_[merge_key(vocab_.at(left), vocab_.at(right))] = {rank++, vocab_.at(left + right)};
  }
  const std::array<std::string, 256>& stand_ins = byte_stand_ins();
  byte_ids_.assign(256, -1);
  for (std::size_t b = 0; b < 256; ++b) {
    const auto it = vocab_.find(stand_ins[b]);
    if (it != vocab_.end()) byte_ids_[b] = it->second;
  }
  const nlohmann::json& unk = model.value("unk_token", nlohmann::json());
  has_unk_ = !unk.is_null();
  if (has_unk_) {
    const auto it = vocab_.find(unk.get<std::string>());
    CANOPY_CHECK(it != vocab_.end(), DataError, "tokenizer '", path, "': its unknown token '",
                 unk.get<std::string>(), "' is not in its vocabulary");
    unk_ = it->second;
  }
}

void TextTokenizer::load_unigram(const nlohmann::json& j, const nlohmann::json& model) {
  const std::string& path = config_.tokenizer;
  CANOPY_CHECK(
      !config_.lowercase_given, ConfigError, "text.lowercase = ", config_.lowercase ? "true" : "false",
      " does not apply to tokenizer '", path,
      "' (a SentencePiece Unigram model: its normalizer says what it folds): leave text.lowercase out");
  const nlohmann::json& pre = j.value("pre_tokenizer", nlohmann::json());
  auto parts = std::make_shared<SentencePiece>(SentencePiece{
      spm::read_normalizer(j.value("normalizer", nlohmann::json()), path), !pre.is_null(),
      pre.is_null() ? spm::Metaspace{} : spm::read_metaspace(pre, path), spm::Unigram(model, path)});
  normalizes_ = !parts->steps.empty();
  vocab_ = parts->model.ids();
  unk_ = parts->model.unk_id();
  spm_ = std::move(parts);
}

void TextTokenizer::byte_level_bpe(const std::string& utf8, std::vector<std::int64_t>& out) const {
  if (ignore_merges_) {
    const std::array<std::string, 256>& stand_ins = byte_stand_ins();
    std::string whole;
    for (const char b : utf8) whole += stand_ins[static_cast<unsigned char>(b)];
    const auto it = vocab_.find(whole);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // tokenizers' Word::merge_all: the merge of lowest rank first (the leftmost of equal ones),
  // symbols linked in a list, a heap of candidate merges; O(n log n) for a long word.
  struct Symbol {
    std::int64_t id;
    std::ptrdiff_t prev, next;
    bool gone = false;
  };
  // A byte the vocabulary lacks is the unknown token (one for a run of them with fuse_unk), or
  // without one is dropped before merging, as tokenizers' BPE::merge_word does.
  std::vector<Symbol> symbols;
  symbols.reserve(utf8.size());
  bool unknown_before = false;
  for (const char byte : utf8) {
    std::int64_t id = byte_ids_[static_cast<unsigned char>(byte)];
    const bool unknown = id < 0;
    if (unknown && (!has_unk_ || (fuse_unk_ && unknown_before))) continue;
    unknown_before = unknown;
    if (unknown) id = unk_;
    const auto k = static_cast<std::ptrdiff_t>(symbols.size());
    symbols.push_back({id, k - 1, -1});
    if (k > 0) symbols[k - 1].next = k;
  }
  const auto n = static_cast<std::ptrdiff_t>(symbols.size());
  using Candidate = std::tuple<std::int64_t, std::ptrdiff_t, std::int64_t>;  // rank, left symbol, merged id
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto offer = [&](std::ptrdiff_t left) {
    if (left < 0 || symbols[left].next < 0) return;
    const Symbol& a = symbols[left];
    const Symbol& b = symbols[a.next];
    const auto it = merges_.find(merge_key(a.id, b.id));
    if (it != merges_.end()) heap.emplace(it->second.first, left, it->second.second);
  };
  for (std::ptrdiff_t k = 0; k + 1 < n; ++k) offer(k);
  while (!heap.empty()) {
    const auto [rank, left, merged] = heap.top();
    heap.pop();
    Symbol& a = symbols[left];
    if (a.gone || a.next < 0) continue;
    const auto it = merges_.find(merge_key(a.id, symbols[a.next].id));
    if (it == merges_.end() || it->second.second != merged) continue;
    Symbol& b = symbols[a.next];
    a.id = merged;
    b.gone = true;
    a.next = b.next;
    if (b.next >= 0) symbols[b.next].prev = left;
    offer(a.prev);
    offer(left);
  }
  for (std::ptrdiff_t k = n > 0 ? 0 : -1; k >= 0; k = symbols[k].next) out.push_back(symbols[k].id);
}

std::u32string TextTokenizer::normalize(const std::u32string& text) const {
  if (!normalizes_) return text;
  if (spm_) return spm::normalize(spm_->steps, text);
  // BertNormalizer, its steps character by character: clean_text, Chinese characters spaced,
  // strip_accents, lowercase.
  const Normalizer& n = normalizer_;
  std::u32string out, stripped;
  out.reserve(text.size());
  for (char32_t c : text) {
    if (n.clean_text) {
      if (c == 0 || c == 0xFFFD || is_control(c)) continue;
      if (is_white_space(c)) c = ' ';
    }
    const bool spaced = n.chinese_chars && is_cjk(c);
    if (spaced) out += U' ';
    stripped.clear();
    if (n.strip_accents) {
      append_stripped(c, stripped);
    } else {
      stripped += c;
    }
    for (const char32_t s : stripped) {
      if (!n.lowercase) {
        out += s;
      } else if (s == 0x130) {  // İ lowercases to i + combining dot above (kept: no strip_accents here)
        out += U'i';
        out += static_cast<char32_t>(0x307);
      } else {
        out += to_lower(s);
      }
    }
    if (spaced) out += U' ';
  }
  return out;
}

std::vector<std::string> TextTokenizer::pre_tokenize(const std::u32string& normalized) const {
  std::vector<std::string> out;
  std::string cur;
  auto flush = [&] {
    if (!cur.empty()) out.push_back(std::move(cur));
    cur.clear();
  };
  for (const char32_t c : normalized) {
    if (is_white_space(c)) {  // Rust's char::is_whitespace, as BertPreTokenizer splits
      flush();
    } else if (is_punctuation(c)) {
      flush();
      append_utf8(cur, c);
      flush();
    } else {
      append_utf8(cur, c);
    }
  }
  flush();
  return out;
}

std::vector<std::string> TextTokenizer::words(const std::string& text) const {
  const std::u32string normalized = normalize(decode_utf8(text));
  if (!spm_) return pre_tokenize(normalized);
  if (spm_->pre_tokenizes) return spm_->metaspace.pieces(normalized, true);
  return {to_utf8(normalized)};
}

void TextTokenizer::wordpiece(const std::string& word, std::vector<std::int64_t>& out) const {
  // Boundaries of code points: pieces never split a character.
  std::vector<std::size_t> starts;
  for (std::size_t i = 0; i < word.size(); ++i) {
    if ((static_cast<unsigned char>(word[i]) & 0xC0) != 0x80) starts.push_back(i);
  }
  if (starts.size() > max_chars_) {
    out.push_back(unk_);
    return;
  }
  starts.push_back(word.size());
  const std::size_t first = out.size();
  std::size_t s = 0;
  std::string piece;
  while (s + 1 < starts.size()) {
    std::int64_t found = -1;
    std::size_t e = starts.size() - 1;
    for (; e > s; --e) {
      piece.assign(s > 0 ? prefix_ : "");
      piece.append(word, starts[s], starts[e] - starts[s]);
      const auto it = vocab_.find(piece);
      if (it != vocab_.end()) {
        found = it->second;
        break;
      }
    }
    if (found < 0) {
      out.resize(first);
      out.push_back(unk_);
      return;
    }
    out.push_back(found);
    s = e;
  }
}

void TextTokenizer::encode_stretch(const std::u32string& normalized, bool starts_text, std::size_t limit,
                                   std::vector<std::int64_t>& ids) const {
  if (spm_) {
    if (!spm_->pre_tokenizes) {
      spm_->model.encode(to_utf8(normalized), ids);
      return;
    }
    for (const std::string& piece : spm_->metaspace.pieces(normalized, starts_text)) {
      spm_->model.encode(piece, ids);
      if (ids.size() >= limit) break;
    }
    return;
  }
  if (bpe_) {
    std::u32string t = normalized;
    if (t.empty()) return;
    if (add_prefix_space_ && t[0] != ' ') t.insert(t.begin(), U' ');
    for (std::size_t i = 0; i < t.size() && ids.size() < limit;) {
      const std::size_t j = use_regex_ ? gpt2_match(t, i) : t.size();
      std::string word;
      for (std::size_t k = i; k < j; ++k) append_utf8(word, t[k]);
      byte_level_bpe(word, ids);
      i = j;
    }
    return;
  }

  for (const auto& w : pre_tokenize(normalized)) {
    wordpiece(w, ids);
    if (ids.size() >= limit) break;
  }
}

std::vector<std::int64_t> TextTokenizer::encode(const std::string& utf8_text) const {
  std::string prompted;
  if (!config_.prompt.empty()) prompted = config_.prompt + utf8_text;
  const std::string& text = config_.prompt.empty() ? utf8_text : prompted;
  std::vector<std::int64_t> ids(before_);
  const std::size_t limit = static_cast<std::size_t>(config_.max_length) - after_.size();
  // The stretch that starts the text (tokenizers' Metaspace with prepend_scheme "first" marks
  // only that one): the first piece, unless an added token comes first.
  bool first = true;
  for (const Piece& p : split_added(decode_utf8(text), raw_added_)) {
    if (ids.size() >= limit) break;
    if (p.id >= 0) {
      ids.push_back(p.id);
      first = false;
      continue;
    }
    for (const Piece& q : split_added(normalize(p.text), normalized_added_)) {
      if (ids.size() >= limit) break;
      if (q.id >= 0) {
        ids.push_back(q.id);
      } else {
        encode_stretch(q.text, first, limit, ids);
      }
      first = false;
    }
    first = false;
  }
  if (ids.size() > limit) ids.resize(limit);
  ids.insert(ids.end(), after_.begin(), after_.end());
  return ids;
}

// --- ARFF ------------------------------------------------------------------------------
namespace {

// Text files are read as UTF-8: a line that is not is refused, naming it (tokenizing would
// silently drop the bytes, and JSON writers refuse them).
void check_utf8_line(const std::string& line, const std::string& path, std::int64_t line_no) {
  const std::string bad = utf8_problem(line);
  CANOPY_CHECK(bad.empty(), DataError, path, ":", line_no, ": ", bad,
               "; canopy reads text files as UTF-8 (convert it, e.g. iconv -f latin1 -t utf-8)");
}

// The character a backslash escape inside a quoted ARFF value stands for, as Weka's reader
// and liac-arff decode them: \n \t \r \b \f \a \v, octal \ooo (1 to 3 digits), \uXXXX
// (as UTF-8), and any other character for itself (\\ \' \" \%). `i` is just past the
// backslash and ends past the escape.
std::string arff_escape(const std::string& line, std::size_t& i) {
  const char e = line[i++];
  switch (e) {
    case 'n':
      return "\n";
    case 't':
      return "\t";
    case 'r':
      return "\r";
    case 'b':
      return "\b";
    case 'f':
      return "\f";
    case 'a':
      return "\a";
    case 'v':
      return "\v";
    default:
      break;
  }
  std::string out;
  if (e >= '0' && e <= '7') {  // the character of that code, \351 = U+00E9, as Java's char
    int code = e - '0';
    for (int k = 0; k < 2 && i < line.size() && line[i] >= '0' && line[i] <= '7'; ++k)
      code = code * 8 + (line[i++] - '0');
    append_utf8(out, static_cast<char32_t>(code));
    return out;
  }
  const auto hex4 = [&](std::size_t at) -> std::optional<char32_t> {
    if (at + 4 > line.size() || !std::all_of(line.begin() + static_cast<std::ptrdiff_t>(at),
                                             line.begin() + static_cast<std::ptrdiff_t>(at + 4), [](char c) {
                                               return std::isxdigit(static_cast<unsigned char>(c)) != 0;
                                             }))
      return std::nullopt;
    return static_cast<char32_t>(std::stoul(line.substr(at, 4), nullptr, 16));
  };
  if (const auto cp = e == 'u' ? hex4(i) : std::nullopt) {
    i += 4;
    char32_t c = *cp;
    if (c >= 0xD800 && c <= 0xDBFF && i + 1 < line.size() && line[i] == '\\' && line[i + 1] == 'u') {
      // A UTF-16 surrogate pair (\ud83c\udf32), as Java writes a character past U+FFFF.
      if (const auto low = hex4(i + 2); low && *low >= 0xDC00 && *low <= 0xDFFF) {
        c = 0x10000 + ((c - 0xD800) << 10) + (*low - 0xDC00);
        i += 6;
      }
    }
    append_utf8(out, c >= 0xD800 && c <= 0xDFFF ? char32_t{0xFFFD} : c);  // a lone surrogate is no character
    return out;
  }
  return std::string(1, e);
}

// Splits one ARFF line into values: quoted ('...' or "...", with backslash escapes) or bare,
// separated by commas. Stops at an unquoted '%' (a comment, also right after a bare value).
// An unquoted ? (ARFF's missing value) comes back as std::nullopt.
std::vector<std::optional<std::string>> split_arff_values(const std::string& line, const std::string& where) {
  std::vector<std::optional<std::string>> out;
  std::size_t i = 0;
  const std::size_t n = line.size();
  while (i < n) {
    while (i < n && (line[i] == ' ' || line[i] == '\t')) ++i;
    if (i >= n || line[i] == '%') break;
    std::optional<std::string> v;
    if (line[i] == '\'' || line[i] == '"') {
      const char q = line[i++];
      bool closed = false;
      std::string text;
      while (i < n) {
        const char c = line[i++];
        if (c == '\\' && i < n) {
          text += arff_escape(line, i);
        } else if (c == q) {
          closed = true;
          break;
        } else {
          text += c;
        }
      }
      CANOPY_CHECK(closed, DataError, where, ": unterminated quoted value");
      v = std::move(text);
      while (i < n && (line[i] == ' ' || line[i] == '\t')) ++i;
    } else {
      const std::size_t start = i;
      while (i < n && line[i] != ',' && line[i] != '%') ++i;
      const std::string bare = trim(line.substr(start, i - start));
      if (bare != "?") v = bare;
    }
    out.push_back(std::move(v));
    if (i < n && line[i] == '%') break;
    if (i < n) {
      CANOPY_CHECK(line[i] == ',', DataError, where, ": expected ',' after a value, found '", line[i], "'");
      ++i;
    }
  }
  return out;
}

// The values of a header line, where ? has no special meaning.
std::vector<std::string> header_values(const std::string& line, const std::string& where) {
  std::vector<std::string> out;
  for (auto& v : split_arff_values(line, where)) out.push_back(v ? std::move(*v) : "?");
  return out;
}

}  // namespace

std::int64_t ArffData::attribute(const std::string& name) const {
  for (std::size_t i = 0; i < attributes.size(); ++i) {
    if (attributes[i] == name) return static_cast<std::int64_t>(i);
  }
  throw DataError(detail::str_cat("ARFF relation '", relation, "' has no attribute '", name,
                                  "' (it has: ", join(attributes, ", "), ")"));
}

std::int64_t ArffData::string_attribute(const std::string& name) const {
  const auto col = attribute(name);
  CANOPY_CHECK(nominal_values[col].empty(), DataError, "attribute '", name, "' of '", path,
               "' is nominal, not a string");
  return col;
}

ArffData read_arff(const std::string& path, bool header_only) {
  GzStream in(path, "ARFF file");  // FILE.arff.gz too
  ArffData d;
  d.path = path;
  std::string line;
  std::int64_t line_no = 0;
  bool data = false;
  while (read_text_line(in, line, line_no)) {
    check_utf8_line(line, path, line_no);
    const std::string where = detail::str_cat(path, ":", line_no);
    const std::string t = trim(line);
    if (t.empty() || t[0] == '%') continue;
    if (!data) {
      const std::string head = lower_ascii(t.substr(0, t.find_first_of(" \t")));
      if (head == "@relation") {
        const auto v = header_values(trim(t.substr(9)), where);
        d.relation = v.empty() ? "" : v[0];
      } else if (head == "@attribute") {
        std::string rest = trim(t.substr(10));
        std::string name;
        if (!rest.empty() && (rest[0] == '\'' || rest[0] == '"')) {
          const auto close = rest.find(rest[0], 1);
          CANOPY_CHECK(close != std::string::npos, DataError, where, ": unterminated attribute name");
          name = rest.substr(1, close - 1);
          rest = trim(rest.substr(close + 1));
        } else {
          const auto sp = rest.find_first_of(" \t");
          CANOPY_CHECK(sp != std::string::npos, DataError, where, ": @attribute needs a name and a type");
          name = rest.substr(0, sp);
          rest = trim(rest.substr(sp));
        }
        d.attributes.push_back(name);
        if (!rest.empty() && rest[0] == '{') {
          const auto close = rest.rfind('}');
          CANOPY_CHECK(close != std::string::npos, DataError, where, ": unterminated nominal value list");
          d.nominal_values.push_back(header_values(rest.substr(1, close - 1), where));
        } else {
          CANOPY_CHECK(lower_ascii(rest) == "string", DataError, where, ": attribute '", name, "' has type '",
                       rest, "'; only string and nominal ({a,b,...}) attributes are supported");
          d.nominal_values.emplace_back();
        }
      } else if (head == "@data") {
        CANOPY_CHECK(!d.attributes.empty(), DataError, where, ": @data before any @attribute");
        data = true;
        d.strings.resize(d.attributes.size());
        d.nominals.resize(d.attributes.size());
        if (header_only) return d;
      } else {
        throw DataError(detail::str_cat(where, ": expected @relation, @attribute or @data, found '",
                                        t.substr(0, 40), "'"));
      }
      continue;
    }
    CANOPY_CHECK(t[0] != '{', DataError, where, ": sparse ARFF instances are not supported");
    const auto values = split_arff_values(line, where);
    CANOPY_CHECK(values.size() == d.attributes.size(), DataError, where, ": ", values.size(), " values for ",
                 d.attributes.size(), " attributes");
    for (std::size_t a = 0; a < values.size(); ++a) {
      CANOPY_CHECK(
          values[a].has_value(), DataError, where, ": attribute '", d.attributes[a],
          "' is missing (an unquoted ?); canopy needs every text and label (quote it, '?', for a text "
          "that is a question mark)");
      if (d.nominal_values[a].empty()) {
        d.strings[a].push_back(*values[a]);
        continue;
      }
      const auto& allowed = d.nominal_values[a];
      std::int64_t index = -1;
      for (std::size_t k = 0; k < allowed.size(); ++k) {
        if (allowed[k] == *values[a]) index = static_cast<std::int64_t>(k);
      }
      CANOPY_CHECK(index >= 0, DataError, where, ": value '", *values[a], "' of attribute '", d.attributes[a],
                   "' is not one of {", join(allowed, ","), "}");
      d.nominals[a].push_back(index);
    }
    ++d.rows;
  }
  CANOPY_CHECK(data, DataError, "ARFF file '", path, "' has no @data section");
  return d;
}

std::vector<std::string> read_arff_texts(const std::string& path, const std::string& attribute) {
  ArffData arff = read_arff(path);
  return std::move(arff.strings[arff.string_attribute(attribute)]);
}

namespace {

// The index of the column holding the texts: named `column` exactly, else the one column whose
// name is `column` ignoring case (a pandas frame's "text" for the default "Text").
std::size_t text_column_of(const std::vector<std::string>& header, const std::string& column,
                           const std::string& where, const std::string& line) {
  const auto exact = std::find(header.begin(), header.end(), column);
  if (exact != header.end()) return static_cast<std::size_t>(exact - header.begin());
  std::vector<std::size_t> alike;
  for (std::size_t i = 0; i < header.size(); ++i)
    if (lower_ascii(header[i]) == lower_ascii(column)) alike.push_back(i);
  const std::string t = trim(line);
  const bool json = !t.empty() && (t[0] == '{' || t[0] == '[');  // a JSON table read as CSV
  const std::string other = json ? " (JSON records, not CSV)" : separator_hint(header, line);
  CANOPY_CHECK(alike.size() == 1, DataError, where, ": the header should name the text column '", column,
               "' (data.text_attribute), got '",
               printable(line.size() > 200 ? line.substr(0, 200) + "..." : line), "'", other,
               json ? "; data.source = text-json reads JSON tables (a file named .json, .jsonl or "
                      ".ndjson is read as JSON wherever canopy takes --input)"
               : !other.empty()   ? "; canopy reads comma-separated tables: save it with commas"
               : alike.size() > 1 ? "; several columns match it ignoring case: name one exactly"
                                  : "; set data.text_attribute to the column holding the texts");
  return alike[0];
}

}  // namespace

namespace {

// A table of texts as read_text_table and read_table_texts read it: `col` is its text column.
Csv read_texts_csv(const TableFile& file, const std::string& column, std::size_t& col) {
  std::string name;
  const CsvHeaderCheck header = [&](const std::vector<std::string>& fields, const std::string& where,
                                    const std::string& line) {
    col = text_column_of(fields, column, where, line);
    name = fields[col];
  };
  Csv csv = read_table(file, "table of texts", header, &col);  // the texts as written: blanks count for BPE
  col = column_after_lists(csv, name, "text");
  CANOPY_CHECK(!csv.rows.empty(), DataError, "table of texts '", file.path, "' has ",
               file.format == TableFormat::json ? "no records" : "a header but no rows");
  return csv;
}

std::vector<std::string> column_texts(const Csv& csv, std::size_t col) {
  std::vector<std::string> texts;
  texts.reserve(csv.rows.size());
  for (std::size_t i = 0; i < csv.rows.size(); ++i) {
    const std::string bad = utf8_problem(csv.rows[i][col]);
    CANOPY_CHECK(bad.empty(), DataError, csv.path, ":", csv.lines[i], ": the text of row ", i + 1, " ", bad,
                 " (", kConvertCsv, ")");
    texts.push_back(csv.rows[i][col]);
  }
  return texts;
}

}  // namespace

std::vector<std::string> read_table_texts(const TableFile& file, const std::string& column) {
  std::size_t col = 0;
  const Csv csv = read_texts_csv(file, column, col);  // sets col: read before column_texts' arguments
  return column_texts(csv, col);
}

TextTable read_text_table(const TableFile& file, const std::string& column, const TableFile& names) {
  std::size_t col = 0;
  const Csv csv = read_texts_csv(file, column, col);
  TextTable out;
  static_cast<LabelColumns&>(out) = read_label_columns(csv, names, col, [&column](const TableFile& t) {
    std::size_t names_col = 0;
    return read_texts_csv(t, column, names_col);
  });
  out.text_column = csv.header[col];
  out.texts = column_texts(csv, col);
  return out;
}

std::vector<std::string> read_text_lines(const std::string& path) {
  GzStream in(path, "file of texts (one per line)");  // FILE.txt.gz too
  return read_text_lines(in, path);
}

LineStream::LineStream(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}

LineStream::~LineStream() {
  // A pipe cannot seek (ESPIPE): what it held past the last line taken is gone, as with any reader.
  if (!buffer_.empty()) (void)::lseek(fd_, -static_cast<off_t>(buffer_.size()), SEEK_CUR);
}

bool LineStream::read_some() {
  char chunk[65536];
  for (;;) {
    const ssize_t got = ::read(fd_, chunk, sizeof chunk);
    if (got > 0) {
      buffer_.append(chunk, static_cast<std::size_t>(got));
      complete_ += static_cast<std::size_t>(std::count(chunk, chunk + got, '\n'));
      return true;
    }
    if (got == 0) return false;
    CANOPY_CHECK(errno == EINTR, DataError, "cannot read ", name_, ": ", std::strerror(errno));
  }
}

std::vector<std::string> LineStream::next(std::size_t max) {
  std::vector<std::string> out;
  if (max == 0) return out;
  while (!ended_ && complete_ == 0) ended_ = !read_some();
  // More lines already there: taken now, not waited for.
  while (!ended_ && complete_ < max) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) break;
    ended_ = !read_some();
  }
  std::size_t start = 0;
  const auto take = [&](std::string line) {
    tidy_text_line(line, line_no_);
    check_utf8_line(line, name_, line_no_);
    out.push_back(std::move(line));
  };
  for (; out.size() < max && complete_ > 0; --complete_) {
    const std::size_t end = buffer_.find('\n', start);
    take(buffer_.substr(start, end - start));
    start = end + 1;
  }
  if (out.size() < max && ended_ && start < buffer_.size()) {  // a last line without '\n'
    take(buffer_.substr(start));
    start = buffer_.size();
  }
  buffer_.erase(0, start);
  return out;
}

std::vector<std::string> read_text_lines(std::istream& in, const std::string& name) {
  std::vector<std::string> out;
  std::int64_t line_no = 0;
  for (std::string line; read_text_line(in, line, line_no);) {
    check_utf8_line(line, name, line_no);
    out.push_back(std::move(line));
  }
  return out;
}

}  // namespace canopy::datasets
