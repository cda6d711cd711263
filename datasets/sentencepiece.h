// SentencePiece tokenizers as Hugging Face `tokenizers` reads them from a tokenizer.json (XLM-R,
// multilingual-e5, paraphrase-multilingual, T5, LaBSE's successors): the Precompiled normalizer
// (the SentencePiece model's charsmap, applied per grapheme cluster as tokenizers applies it),
// the Replace and Strip normalizers the converters put after it, the Metaspace pre-tokenizer
// and the Unigram model (Viterbi over the pieces' log probabilities, unknown characters fused,
// byte fallback). Internal to the datasets module; TextTokenizer (text.h) calls it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace canopy::datasets {

// The member `key` of a tokenizer.json object `j`; a DataError naming `where` in the file `path`
// when it has none.
const nlohmann::json& member(const nlohmann::json& j, const char* key, const std::string& where,
                             const std::string& path);

namespace spm {

// Grapheme_Cluster_Break with Extended_Pictographic (UAX #29), numbered as
// scripts/unicode_classes.py writes them into unicode_classes.h.
enum class GraphemeBreak : unsigned char {
  other,
  cr,
  lf,
  control,
  extend,
  zwj,
  regional_indicator,
  prepend,
  spacing_mark,
  l,
  v,
  t,
  lv,
  lvt,
  pictographic
};
GraphemeBreak grapheme_break(char32_t c);
// Where the extended grapheme cluster that starts at `i` ends (UAX #29's rules of Unicode 15.0:
// Unicode 15.1's rule for Indic conjuncts is not applied; it joins clusters of 6 bytes or more,
// which the charsmap reads character by character either way).
std::size_t grapheme_end(const std::u32string& s, std::size_t i);

// A SentencePiece precompiled charsmap: a double-array trie over UTF-8 whose values index a
// blob of NUL-terminated replacements.
class Charsmap {
 public:
  // `blob` is the decoded charsmap; `where` names it in errors.
  Charsmap(std::string blob, const std::string& where);
  // tokenizers' Precompiled::normalize: a grapheme cluster of fewer than 6 bytes is replaced
  // whole by the replacement of its shortest prefix the trie holds; otherwise each character
  // by its own, if it has one.
  std::u32string normalize(const std::u32string& text) const;

 private:
  // The replacement of the shortest prefix of `utf8` the trie holds; false: none.
  bool transform(const std::string& utf8, std::u32string& out) const;
  std::vector<std::uint32_t> units_;
  std::string replacements_;
  std::string where_;
};

// One normalizer of a tokenizer.json's Sequence.
struct NormalizeStep {
  enum class Kind { precompiled, replace_text, replace_run, strip } kind = Kind::strip;
  std::shared_ptr<const Charsmap> charsmap;  // precompiled
  std::u32string pattern;                    // replace_text: the text replaced
  char32_t run_char = 0;                     // replace_run: a run of run_char ...
  std::size_t run_min = 1;                   // ... at least run_min long (the regex "c{n,}" or "c+")
  std::u32string content;                    // what either Replace puts instead
  bool left = false, right = false;          // strip
};
// A tokenizer.json's normalizer of those kinds (one, or a Sequence of them); a DataError names
// any other (`path` is the file).
std::vector<NormalizeStep> read_normalizer(const nlohmann::json& normalizer, const std::string& path);
std::u32string normalize(const std::vector<NormalizeStep>& steps, std::u32string text);

// The Metaspace pre-tokenizer: spaces become the replacement ("▁"), one is put before the text
// (prepend_scheme always; first: only before the stretch that starts the text), and the text is
// cut before each replacement character (split).
struct Metaspace {
  enum class Prepend { always, first, never };
  char32_t replacement = U'\u2581';
  Prepend prepend = Prepend::always;
  bool split = true;
  std::vector<std::string> pieces(std::u32string text, bool starts_text) const;
};
Metaspace read_metaspace(const nlohmann::json& pre_tokenizer, const std::string& path);

// The Unigram model: the pieces' log probabilities, the best-scoring segmentation of each
// pre-tokenized piece (tokenizers' encode_optimized: ties keep the first found), a character no
// piece covers is the unknown token at its score less 10, adjacent unknown characters fused into
// one; with byte_fallback an unknown stretch is its bytes' <0xXX> tokens where all exist.
class Unigram {
 public:
  Unigram(const nlohmann::json& model, const std::string& path);
  void encode(const std::string& piece, std::vector<std::int64_t>& ids) const;
  // Each token's id (a token listed twice: its last id, as tokenizers keeps it).
  const std::unordered_map<std::string, std::int64_t>& ids() const { return ids_; }
  std::int64_t unk_id() const { return unk_; }
  std::size_t size() const { return scores_.size(); }

 private:
  struct Node {
    std::uint32_t first_edge = 0, edges = 0;
    std::int64_t id = -1;  // the token ending here
  };
  struct Edge {
    unsigned char label;
    std::uint32_t child;
  };
  void build_trie(std::vector<std::pair<std::string, std::int64_t>>& tokens);
  std::vector<double> scores_;
  std::unordered_map<std::string, std::int64_t> ids_;
  std::vector<Node> nodes_;
  std::vector<Edge> edges_;
  std::int64_t unk_ = 0;
  double unk_score_ = 0;
  bool byte_fallback_ = false;
};

}  // namespace spm
}  // namespace canopy::datasets
