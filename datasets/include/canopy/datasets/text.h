// Text inputs: a WordPiece tokenizer for BERT-like trunks and a reader for ARFF files whose
// instances are a text and nominal labels (the Reuters-21578 subsets in Weka's examples).
//
// The tokenizer follows BERT's reference (Hugging Face `tokenizers`' BertNormalizer,
// BertPreTokenizer and WordPiece): remove control characters, map whitespace to spaces,
// put spaces around CJK ideographs, strip accents and lowercase (uncased models), split on
// whitespace and around every punctuation character, then greedy longest-match-first
// WordPiece with "##" continuations, [UNK] for a word that cannot be covered or is longer
// than 100 characters, and [CLS] ... [SEP] around the whole, truncated to max_length.
// From a Hugging Face tokenizer.json it reads the WordPiece family (BERT, MiniLM, MPNet, bge,
// e5), byte-level BPE (GPT-2's and RoBERTa's: GPT-2's pre-tokenizing pattern with Unicode's
// letters and numbers from unicode_classes.h, bytes as GPT-2's stand-in characters, merges by
// rank) and SentencePiece's Unigram (XLM-R, multilingual-e5, T5: sentencepiece.h), taking every
// setting the file gives: the normalizer's switches, the continuation prefix, the
// unknown token, the special tokens its post-processor puts around a text (MPNet's <s> ...
// </s>), the padding token, and its added tokens, which are matched in the text first, as
// `tokenizers` matches them ("[MASK]" in a text is one token).
// Unicode without an ICU dependency, every script, from tables generated into
// unicode_classes.h: controls, punctuation and nonspacing marks as tokenizers' BERT rules have
// them (Unicode 8.0's categories), lowercase and canonical decompositions (Unicode 14.0).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "canopy/datasets/csv.h"

namespace canopy::datasets {

struct TokenizerConfig {
  std::string vocab;              // vocab.txt: one token per line, the line number is its id
  std::string tokenizer;          // or a Hugging Face tokenizer.json (WordPiece, byte-level BPE, Unigram)
  bool lowercase = true;          // vocab.txt: uncased models (and strip accents with it)
  bool lowercase_given = false;   // set in the config: a tokenizer.json must agree with it
  std::int64_t max_length = 256;  // tokens per text including the special tokens around it
  std::string prompt;             // put before every text (e5's "query: "), as sentence-transformers does
};

void validate_tokenizer_config(const TokenizerConfig& config);
// A canonical one-line description for the cache fingerprint (includes the vocabulary's hash).
std::string describe(const TokenizerConfig& config);

class TextTokenizer {
 public:
  explicit TextTokenizer(const TokenizerConfig& config);

  // Token ids of one text: [CLS] pieces... [SEP] (a tokenizer.json's special tokens), at most
  // max_length of them.
  std::vector<std::int64_t> encode(const std::string& utf8_text) const;
  // The normalised, pre-tokenised words (before WordPiece), for inspection and tests.
  std::vector<std::string> words(const std::string& utf8_text) const;

  std::int64_t pad_id() const { return pad_; }
  std::int64_t vocab_size() const { return vocab_size_; }
  const TokenizerConfig& config() const { return config_; }

  // BertNormalizer's switches (vocab.txt: strip_accents and lowercase are text.lowercase).
  struct Normalizer {
    bool clean_text = true, chinese_chars = true, strip_accents = true, lowercase = true;
  };
  // A token matched in the text before the model runs (tokenizers' AddedToken).
  struct AddedToken {
    std::u32string content;  // normalized first where `normalized`
    std::int64_t id = 0;
    bool single_word = false, lstrip = false, rstrip = false, normalized = false;
  };

 private:
  void load_vocab_txt();
  void load_tokenizer_json();
  void read_normalizer(const nlohmann::json& normalizer);
  void read_added_tokens(const nlohmann::json& tokens, std::int64_t model_size);
  void read_padding(const nlohmann::json& padding);
  void load_byte_level_bpe(const nlohmann::json& j, const nlohmann::json& model);
  void load_unigram(const nlohmann::json& j, const nlohmann::json& model);
  void byte_level_bpe(const std::string& utf8, std::vector<std::int64_t>& out) const;
  std::u32string normalize(const std::u32string& text) const;
  std::vector<std::string> pre_tokenize(const std::u32string& normalized) const;
  // Appends the ids of `text` (a stretch between added tokens; `starts_text`: the text's first),
  // stopping past `limit` ids.
  void encode_stretch(const std::u32string& text, bool starts_text, std::size_t limit,
                      std::vector<std::int64_t>& ids) const;
  void wordpiece(const std::string& word, std::vector<std::int64_t>& out) const;
  TokenizerConfig config_;
  std::unordered_map<std::string, std::int64_t> vocab_;
  Normalizer normalizer_;
  bool normalizes_ = true;                                // false: the file has no normalizer
  std::vector<AddedToken> raw_added_, normalized_added_;  // matched in the text, in the normalized text
  std::vector<std::int64_t> before_, after_;              // the special tokens around a text
  std::string prefix_ = "##";
  std::size_t max_chars_ = 100;
  std::int64_t unk_ = 0, pad_ = 0, vocab_size_ = 0;
  // Byte-level BPE: its merges (left id << 32 | right id -> rank, merged id), each byte's id
  // (-1: not in the vocabulary) and its pre-tokenizer's switches.
  bool bpe_ = false, has_unk_ = true, fuse_unk_ = false, add_prefix_space_ = false, use_regex_ = true,
       ignore_merges_ = false;
  std::unordered_map<std::uint64_t, std::pair<std::int64_t, std::int64_t>> merges_;
  std::vector<std::int64_t> byte_ids_;
  // A Unigram tokenizer.json: its normalizer steps, pre-tokenizer and model (sentencepiece.h).
  struct SentencePiece;
  std::shared_ptr<const SentencePiece> spm_;
};

// An ARFF file read whole: string attributes as text, nominal attributes as the index of
// the value in the declared list. Numeric attributes are not supported (DataError).
struct ArffData {
  std::string relation;
  std::vector<std::string> attributes;                   // in declaration order
  std::vector<std::vector<std::string>> nominal_values;  // empty for a string attribute
  std::vector<std::vector<std::string>> strings;         // per attribute (string ones), per row
  std::vector<std::vector<std::int64_t>> nominals;       // per attribute (nominal ones), per row
  std::int64_t rows = 0;
  std::int64_t attribute(const std::string& name) const;         // index; DataError when absent
  std::int64_t string_attribute(const std::string& name) const;  // also DataError when nominal
  std::string path;
};
// With `header_only`, reads up to @data: the relation, attributes and nominal values, no rows.
ArffData read_arff(const std::string& path, bool header_only = false);

// The texts of an ARFF file's string attribute `attribute` (DataError if it is nominal).
std::vector<std::string> read_arff_texts(const std::string& path, const std::string& attribute);
// A table of texts: a CSV or JSON table (csv.h: a quoted CSV text may hold commas and line
// breaks) whose header names its columns, one text per row in the column `column` (named
// exactly, else the one column whose name matches it ignoring case), every other column a
// label read as read_label_columns says, class names numbered from `names` (the training
// table, so train and test agree; empty or `file`: this one). A text that is not UTF-8 is a
// DataError naming its row.
struct TextTable : LabelColumns {
  std::vector<std::string> texts;
  std::string text_column;  // as the header spells it
};
TextTable read_text_table(const TableFile& file, const std::string& column, const TableFile& names = {});
// Only the texts of such a table (predict, tokenize): its other columns are not read as labels.
std::vector<std::string> read_table_texts(const TableFile& file, const std::string& column);
inline TextTable read_text_csv(const std::string& path, const std::string& column,
                               const std::string& name_source = "") {
  return read_text_table({path, TableFormat::csv}, column, {name_source, TableFormat::csv});
}

// One text per line of a plain file (a trailing \r is dropped).
std::vector<std::string> read_text_lines(const std::string& path);
// The same from a stream (`name` says where in errors: "standard input").
std::vector<std::string> read_text_lines(std::istream& in, const std::string& name);

// Lines of a file descriptor as they come (standard input, a pipe): next() waits for one
// line, then takes the further lines already there without waiting, up to `max`; so a reader
// answers each burst as it arrives, and a stream that stays open is answered as it goes.
// As read_text_lines: a trailing \r dropped, a byte-order mark at the very start dropped,
// a line that is not UTF-8 refused naming it.
// Where the descriptor can seek (a file redirected to standard input), what was read past the
// last line taken is given back when the stream goes: the next reader of the descriptor (the
// shell's next command) starts at the line after it, as after `head -n`. The descriptor is the
// caller's, open while the stream is.
class LineStream {
 public:
  LineStream(int fd, std::string name);
  ~LineStream();
  LineStream(const LineStream&) = delete;
  LineStream& operator=(const LineStream&) = delete;
  // The next lines (at most `max`, at least one); empty at the end of the stream.
  std::vector<std::string> next(std::size_t max);

 private:
  bool read_some();  // one read(2) into the buffer; false at the end of the stream
  int fd_;
  std::string name_;
  std::string buffer_;
  std::size_t complete_ = 0;  // whole lines in buffer_ (its '\n's)
  bool ended_ = false;
  std::int64_t line_no_ = 0;
};

}  // namespace canopy::datasets
