// The WordPiece tokenizer and the readers of texts (ARFF, CSV tables) on small files made here.
// Agreement with the reference tokenizer on real text is checked by tests/python/test_text.py.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/datasets/text.h"
#include "sentencepiece.h"  // datasets/ (private to the module)
#include "support/test_support.h"

namespace canopy::datasets {
namespace {

std::string write(const std::string& path, const std::string& content) {
  std::ofstream(path) << content;
  return path;
}

// ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 then the words in order from 4.
const char* kVocab =
    "[PAD]\n[UNK]\n[CLS]\n[SEP]\nun\n##aff\n##able\nhello\n,\nworld\n!\ncafe\n##s\n\xe4\xb8\xad\n";

TokenizerConfig config(const testing::TempDir& dir, std::int64_t max_length = 16) {
  TokenizerConfig c;
  c.vocab = write(dir.file("vocab.txt"), kVocab);
  c.max_length = max_length;
  return c;
}

using Ids = std::vector<std::int64_t>;

TEST(WordPiece, GreedyLongestMatchWithContinuations) {
  testing::TempDir dir;
  const TextTokenizer t(config(dir));
  EXPECT_EQ(t.encode("UNaffable"), (Ids{2, 4, 5, 6, 3}));
  EXPECT_EQ(t.encode("Hello, world!"), (Ids{2, 7, 8, 9, 10, 3}));
  EXPECT_EQ(t.encode("cafes"), (Ids{2, 11, 12, 3}));
  EXPECT_EQ(t.encode("unxyz hello"), (Ids{2, 1, 7, 3})) << "a word that cannot be covered is one [UNK]";
  EXPECT_EQ(t.encode(""), (Ids{2, 3}));
  EXPECT_EQ(t.pad_id(), 0);
  EXPECT_EQ(t.vocab_size(), 14);
}

TEST(WordPiece, NormalisesLikeBert) {
  testing::TempDir dir;
  const TextTokenizer t(config(dir));
  EXPECT_EQ(t.encode("CAF\xc3\x89"), (Ids{2, 11, 3})) << "É lowercased and its accent stripped";
  EXPECT_EQ(t.encode("cafe\xcc\x81"), (Ids{2, 11, 3})) << "a combining accent is dropped";
  EXPECT_EQ(t.words("a\tb\nc\x01"
                    "d\xe2\x80\x8b"
                    "e\xc2\xa0"
                    "f"),
            (std::vector<std::string>{"a", "b", "cde", "f"}))
      << "whitespace splits, control and zero-width characters vanish";
  EXPECT_EQ(t.words("x\xe4\xb8\xad\xe4\xb8\xady"),
            (std::vector<std::string>{"x", "\xe4\xb8\xad", "\xe4\xb8\xad", "y"}))
      << "CJK ideographs are words of their own";
  EXPECT_EQ(t.words("\xc2\xbfqu\xc3\xa9?\xe2\x80\x94ok"),
            (std::vector<std::string>{"\xc2\xbf", "que", "?", "\xe2\x80\x94", "ok"}))
      << "Unicode punctuation splits like ASCII";
  EXPECT_EQ(t.words("\xc4\xb0stanbul"), (std::vector<std::string>{"istanbul"}));
  EXPECT_EQ(t.words("\xff\xfeok"), (std::vector<std::string>{"ok"})) << "invalid UTF-8 bytes are dropped";
  TokenizerConfig cased = config(dir);
  cased.lowercase = false;
  EXPECT_EQ(TextTokenizer(cased).encode("Hello hello"), (Ids{2, 1, 7, 3}));
}

TEST(WordPiece, TruncatesToMaxLengthKeepingSeparators) {
  testing::TempDir dir;
  EXPECT_EQ(TextTokenizer(config(dir, 4)).encode("hello world hello"), (Ids{2, 7, 9, 3}));
  EXPECT_EQ(TextTokenizer(config(dir, 4)).encode("unaffable"), (Ids{2, 4, 5, 3})) << "cut inside a word";
  EXPECT_EQ(TextTokenizer(config(dir, 3)).encode("hello world"), (Ids{2, 7, 3}));
  const std::string longword(101, 'a');
  EXPECT_EQ(TextTokenizer(config(dir)).encode(longword), (Ids{2, 1, 3})) << "over 100 characters: [UNK]";
}

TEST(WordPiece, BadVocabulariesAndSettingsAreClearErrors) {
  testing::TempDir dir;
  TokenizerConfig c = config(dir);
  c.vocab = write(dir.file("novocab.txt"), "[PAD]\n[UNK]\n[SEP]\nhello\n");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { TextTokenizer t(c); }, {"novocab.txt", "[CLS]"}));
  c.vocab = dir.file("missing.txt");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { TextTokenizer t(c); }, {"missing.txt"}));
  c = config(dir, 2);
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { TextTokenizer t(c); }, {"text.max_length", "got 2"}));
}

// A tokenizer.json as MPNet's is written: <s> ... </s> from its post-processor, <pad> from its
// padding, <mask> an added token taking the blanks before it, [UNK] its model's unknown token.
const char* kMpnetLike = R"({"version": "1.0", "truncation": null,
  "padding": {"strategy": "BatchLongest", "pad_id": 1, "pad_token": "<pad>"},
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 9, "content": "<mask>", "single_word": false, "lstrip": true, "rstrip": false, "normalized": false, "special": true}],
  "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
  "pre_tokenizer": {"type": "BertPreTokenizer"},
  "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0], "trim_offsets": true, "add_prefix_space": false},
  "decoder": null,
  "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
    "vocab": {"<s>": 0, "<pad>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5, "un": 6, "##aff": 7, "##able": 8}}})";

TEST(WordPiece, ReadsATokenizersFileWithItsSpecialTokens) {
  testing::TempDir dir;
  TokenizerConfig c;
  c.tokenizer = write(dir.file("tokenizer.json"), kMpnetLike);
  c.max_length = 16;
  const TextTokenizer t(c);
  EXPECT_EQ(t.encode("Hello   UNaffable world"), (Ids{0, 4, 6, 7, 8, 5, 2}))
      << "<s> ... </s> around the text";
  EXPECT_EQ(t.encode("hello <mask> world <s>"), (Ids{0, 4, 9, 5, 0, 2}))
      << "added tokens matched in the raw text";
  EXPECT_EQ(t.encode("hello<MASK>"), (Ids{0, 4, 3, 3, 3, 2})) << "not normalized: <MASK> is no <mask>";
  EXPECT_EQ(t.pad_id(), 1);
  EXPECT_EQ(t.vocab_size(), 10);
  c.max_length = 4;
  EXPECT_EQ(TextTokenizer(c).encode("hello world hello"), (Ids{0, 4, 5, 2}));

  c.max_length = 16;
  c.lowercase = false;
  c.lowercase_given = true;
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { TextTokenizer u(c); },
                                                {"text.lowercase = false", "lowercases"}));
  c.lowercase_given = false;
  std::string unigram = kMpnetLike;
  unigram.replace(unigram.find(R"("type": "WordPiece")"), 19, R"("type": "Unigram")");
  c.tokenizer = write(dir.file("unigram.json"), unigram);
  EXPECT_TRUE(
      testing::throws_with<DataError>([&] { TextTokenizer u(c); }, {"unigram.json", "Unigram model"}));
  c.tokenizer = write(dir.file("cut.json"), std::string(kMpnetLike).substr(0, 200));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { TextTokenizer u(c); }, {"cut.json", "is not JSON"}));
  c.vocab = "vocab.txt";
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_tokenizer_config(c); }, {"both given"}));
  c.vocab.clear();
  c.tokenizer = dir.path();  // the model's folder, holding tokenizer.json
  EXPECT_TRUE(testing::throws_with<ConfigError>([&] { validate_tokenizer_config(c); },
                                                {"text.tokenizer = '", "is a folder", "tokenizer.json'"}));
}

// Byte-level BPE as RoBERTa's file has it: "\u0120" (Ġ) stands for the space byte, merges by
// rank (the lowest first), <s> ... </s> around the text.
const char* kRobertaLike = R"({"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0], "trim_offsets": true, "add_prefix_space": false},
  "decoder": null,
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"<s>": 0, "<pad>": 1, "</s>": 2, "h": 3, "e": 4, "l": 5, "o": 6, "\u0120": 7, "w": 8, "r": 9, "d": 10,
      "'": 11, "s": 12, "he": 13, "ll": 14, "hell": 15, "hello": 16, "\u0120w": 17, "or": 18, "\u0120wor": 19, "'s": 20,
      "el": 21},
    "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"], ["\u0120", "w"], ["o", "r"], ["\u0120w", "or"],
      ["'", "s"], ["e", "l"]]}})";

TEST(ByteLevelBpe, ReadsARobertaLikeFile) {
  testing::TempDir dir;
  TokenizerConfig c;
  c.tokenizer = write(dir.file("tokenizer.json"), kRobertaLike);
  const TextTokenizer t(c);
  EXPECT_EQ(t.encode("hello world"), (Ids{0, 16, 19, 5, 10, 2})) << "the space goes with the word after it";
  EXPECT_EQ(t.encode("hell's"), (Ids{0, 15, 20, 2})) << "'s is a word of its own (GPT-2's pattern)";
  EXPECT_EQ(t.encode("helo"), (Ids{0, 13, 5, 6, 2})) << "he (rank 0) before el (rank 8)";
  EXPECT_EQ(t.encode("h\xc3\xa9"), (Ids{0, 3, 2}))
      << "bytes the vocabulary lacks, without an unknown token, go";
  EXPECT_EQ(t.pad_id(), 1) << "<pad>";
}

// BERT's rules know every script (tests/python/test_tokenizer_json.py holds them to tokenizers on
// random strings of many): here one case of each rule, uncased.
TEST(WordPiece, BertRulesKnowEveryScript) {
  testing::TempDir dir;
  const TextTokenizer t(config(dir));
  using Words = std::vector<std::string>;
  EXPECT_EQ(t.words("\xef\xbc\xa8\xef\xbc\xa5 Ti\xe1\xba\xbfng"),
            (Words{"\xef\xbd\x88\xef\xbd\x85", "tieng"}))
      << "fullwidth letters lowercased; Vietnamese accents stripped (NFD)";
  EXPECT_EQ(t.words("\xd9\x82\xd9\x8e\xd9\x85\xd9\x92\xd8\xad"), (Words{"\xd9\x82\xd9\x85\xd8\xad"}))
      << "Arabic vowel marks (nonspacing) removed";
  EXPECT_EQ(t.words("a\xd5\x9a"
                    "b"),
            (Words{"a", "\xd5\x9a", "b"}))
      << "Armenian apostrophe: punctuation";
  EXPECT_EQ(t.words("a\xe2\xb9\x92"
                    "b"),
            (Words{"a\xe2\xb9\x92"
                   "b"}))
      << "U+2E52 (Unicode 13) is not punctuation in tokenizers' Unicode 8.0 categories";
  EXPECT_EQ(t.words("\xef\xa4\x80"), (Words{"\xe8\xb1\x88"}))
      << "a compatibility ideograph: spaced, then NFD";
  EXPECT_EQ(t.words("a\xd8\x9c"
                    "b"),
            (Words{"ab"}))
      << "U+061C (a format character) removed";
}

TEST(WordPiece, PutsThePromptBeforeEveryText) {
  testing::TempDir dir;
  TokenizerConfig c = config(dir);
  const TextTokenizer plain(c);
  c.prompt = "hello , ";
  const TextTokenizer prompted(c);
  EXPECT_EQ(prompted.encode("world"), plain.encode("hello , world"));
  EXPECT_EQ(prompted.encode("world"), (Ids{2, 7, 8, 9, 3}));
  EXPECT_EQ(describe(plain.config()).find("prompt"), std::string::npos)
      << "caches without one keep their fingerprint";
  EXPECT_NE(describe(prompted.config()).find(";prompt=\"hello , \""), std::string::npos)
      << describe(prompted.config());
  c.max_length = 5;
  EXPECT_EQ(TextTokenizer(c).encode("world"), (Ids{2, 7, 8, 9, 3}));
  c.max_length = 4;
  EXPECT_THROW(TextTokenizer{c}, ConfigError) << "the prompt and [CLS] [SEP] fill max_length";
}

// A Unigram model worked by hand ("\xe2\x96\x81" is SentencePiece's space, U+2581): ids
// <unk>=0 <s>=1 </s>=2 <pad>=3 then the pieces; the normalizer strips the end's blanks and makes
// a run of spaces one U+2581, as transformers' conversion writes it.
const char* kUnigram = R"({
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Strip", "strip_left": false, "strip_right": true},
    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]},
  "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": true},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "</s>", "type_id": 0}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                       "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}},
  "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": true, "vocab": [
    ["<unk>", 0.0], ["<s>", 0.0], ["</s>", 0.0], ["<pad>", 0.0],
    ["\u2581", -2.0], ["a", -3.0], ["b", -3.0], ["ab", -4.0], ["\u2581ab", -5.0], ["c", -3.0],
    ["abc", -8.5], ["<0x78>", -1.0]]}
})";

TEST(Unigram, TakesTheBestScoringPiecesOfAHandWorkedModel) {
  testing::TempDir dir;
  TokenizerConfig c;
  c.tokenizer = write(dir.file("tokenizer.json"), kUnigram);
  const TextTokenizer t(c);
  EXPECT_EQ(t.encode("ab c"), (Ids{1, 8, 4, 9, 2})) << "\xe2\x96\x81"
                                                       "ab (-5) beats \xe2\x96\x81 + ab (-6)";
  EXPECT_EQ(t.encode("abc"), (Ids{1, 8, 9, 2})) << "\xe2\x96\x81"
                                                   "ab + c (-8) beats \xe2\x96\x81 + abc (-10.5)";
  EXPECT_EQ(t.encode("ab  c  "), (Ids{1, 8, 4, 9, 2})) << "the end stripped, a run of spaces one";
  EXPECT_EQ(t.encode("yz"), (Ids{1, 4, 0, 2})) << "unknown characters fused into one <unk>";
  EXPECT_EQ(t.encode("xx"), (Ids{1, 4, 11, 11, 2})) << "byte fallback: <0x78> twice";
  EXPECT_EQ(t.encode("xy"), (Ids{1, 4, 0, 2})) << "no <0x79>: the whole unknown stretch is <unk>";
  EXPECT_EQ(t.words("ab c"), (std::vector<std::string>{"\xe2\x96\x81"
                                                       "ab",
                                                       "\xe2\x96\x81"
                                                       "c"}));
  EXPECT_EQ(t.pad_id(), 3) << "<pad>";
  c.max_length = 4;
  EXPECT_EQ(TextTokenizer(c).encode("ab c ab"), (Ids{1, 8, 4, 2})) << "cut to max_length with </s> kept";
}

TEST(Unigram, RefusesWhatItDoesNotReadNamingIt) {
  testing::TempDir dir;
  TokenizerConfig c;
  auto refused = [&](const std::string& from, const std::string& to, const std::string& words) {
    std::string text = kUnigram;
    const std::size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    c.tokenizer = write(dir.file("changed.json"), text.replace(at, from.size(), to));
    try {
      TextTokenizer{c};
      ADD_FAILURE() << "not refused: " << to;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  refused(R"({"type": "Strip", "strip_left": false, "strip_right": true})", R"({"type": "Lowercase"})",
          "normalizer 'Lowercase' is not read");
  refused(R"({"Regex": " {2,}"})", R"({"Regex": "\\s+"})", "regular expression '\\s+' is not read");
  refused(R"("type": "Metaspace")", R"("type": "Whitespace")", "pre-tokenizer 'Whitespace' is not read");
  refused(R"("unk_id": 0)", R"("unk_id": null)", "has no unknown token");
  c.tokenizer = write(dir.file("tokenizer.json"), kUnigram);
  c.lowercase_given = true;
  EXPECT_THROW(TextTokenizer{c}, ConfigError) << "text.lowercase does not apply";
}

// UAX #29's own cases (Debian's unicode-data, which the set-up installs): "÷" marks a break,
// "×" none.
TEST(Grapheme, ClustersAsTheUnicodeTestFileSays) {
  const char* path = "/usr/share/unicode/auxiliary/GraphemeBreakTest.txt";
  std::ifstream in(path);
  ASSERT_TRUE(in) << path << " is missing: apt-get install unicode-data (scripts/setup does)";
  std::string line;
  int cases = 0, wrong = 0;
  while (std::getline(in, line)) {
    line = line.substr(0, line.find('#'));
    if (line.find("\xc3\xb7") == std::string::npos) continue;
    std::u32string text;
    std::vector<std::size_t> breaks;  // where each cluster ends
    std::istringstream words(line);
    for (std::string w; words >> w;) {
      if (w == "\xc3\xb7") {
        if (!text.empty()) breaks.push_back(text.size());
      } else if (w != "\xc3\x97") {
        text += static_cast<char32_t>(std::stoul(w, nullptr, 16));
      }
    }
    std::vector<std::size_t> found;
    for (std::size_t i = 0; i < text.size(); i = found.back()) found.push_back(spm::grapheme_end(text, i));
    ++cases;
    if (found != breaks && ++wrong <= 5) ADD_FAILURE() << "case " << cases << ": " << line;
  }
  EXPECT_GE(cases, 600);  // Unicode 15.0 has 602
  EXPECT_EQ(wrong, 0) << "of " << cases;
}

TEST(Arff, ReadsStringAndNominalAttributesWithEscapes) {
  testing::TempDir dir;
  const std::string path =
      write(dir.file("docs.arff"),
            "% a comment\n@relation 'two docs'\n\n@attribute Text string\n"
            "@attribute 'class-att' {0,1}\n@ATTRIBUTE topic {corn, 'wheat flour'}\n\n@data\n"
            "'first\\nline \\'quoted\\' and \\\"double\\\"',1,corn\n"
            "% between rows\n"
            "\"second, with comma\",0,'wheat flour'\n");
  const ArffData d = read_arff(path);
  EXPECT_EQ(d.relation, "two docs");
  EXPECT_EQ(d.attributes, (std::vector<std::string>{"Text", "class-att", "topic"}));
  ASSERT_EQ(d.rows, 2);
  EXPECT_EQ(d.strings[0],
            (std::vector<std::string>{"first\nline 'quoted' and \"double\"", "second, with comma"}));
  EXPECT_EQ(d.nominals[1], (std::vector<std::int64_t>{1, 0}));
  EXPECT_EQ(d.nominals[2], (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(d.nominal_values[2], (std::vector<std::string>{"corn", "wheat flour"}));
  EXPECT_EQ(d.attribute("topic"), 2);
  // The header alone: attributes and declared values, no rows (what evaluate reads of training's files).
  const ArffData header = read_arff(path, true);
  EXPECT_EQ(header.attributes, d.attributes);
  EXPECT_EQ(header.nominal_values, d.nominal_values);
  EXPECT_EQ(header.rows, 0);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { d.attribute("Body"); },
                                              {"no attribute 'Body'", "Text, class-att, topic"}));
  EXPECT_EQ(read_arff_texts(path, "Text"), d.strings[0]);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_arff_texts(path, "topic"); },
                                              {"attribute 'topic'", "docs.arff", "nominal, not a string"}));
  EXPECT_EQ(read_text_lines(write(dir.file("lines.txt"), "one\r\ntwo\n\nfour")),
            (std::vector<std::string>{"one", "two", "", "four"}));
  // A UTF-8 byte-order mark, as Windows editors write one, is not part of the first line.
  const std::string bom = "\xEF\xBB\xBF";
  EXPECT_EQ(read_text_lines(write(dir.file("bom.txt"), bom + "one\r\ntwo\n")),
            (std::vector<std::string>{"one", "two"}));
  const ArffData b = read_arff(write(dir.file("bom.arff"), bom + read_file(path)));
  EXPECT_EQ(b.relation, "two docs");
  EXPECT_EQ(b.strings[0], d.strings[0]);
}

TEST(Arff, EscapesCommentsAndQuestionMarksAsWekaReadsThem) {
  testing::TempDir dir;
  const std::string path = write(dir.file("esc.arff"),
                                 "@relation r\n@attribute t string\n@attribute c {no,yes}\n@data\n"
                                 "'\\a\\b\\f\\v|\\007\\12\\101|\\u00e9|\\%\\q',yes % note\n"
                                 "'?',no%x\n");
  const ArffData d = read_arff(path);
  ASSERT_EQ(d.rows, 2);
  EXPECT_EQ(d.strings[0][0], std::string("\a\b\f\v|\a\nA|\xC3\xA9|%q"));
  EXPECT_EQ(d.strings[0][1], "?");  // quoted: a text that is a question mark
  EXPECT_EQ(d.nominals[1], (std::vector<std::int64_t>{1, 0}));
}

TEST(Arff, BadFilesNameTheLine) {
  testing::TempDir dir;
  auto bad = [&](const std::string& body, std::initializer_list<std::string> fragments) {
    const std::string p = write(dir.file("bad.arff"), body);
    return testing::throws_with<DataError>([&] { read_arff(p); }, fragments);
  };
  EXPECT_TRUE(bad("@relation r\n@attribute x numeric\n@data\n1\n",
                  {"bad.arff:2", "numeric", "only string and nominal"}));
  EXPECT_TRUE(bad("@relation r\n@attribute t string\n@attribute c {0,1}\n@data\n'a',2\n",
                  {"bad.arff:5", "'2'", "{0,1}"}));
  EXPECT_TRUE(bad("@relation r\n@attribute t string\n@attribute c {0,1}\n@data\n'a'\n",
                  {"bad.arff:5", "1 values for 2 attributes"}));
  EXPECT_TRUE(bad("@relation r\n@attribute t string\n@data\n'open\n", {"bad.arff:4", "unterminated"}));
  EXPECT_TRUE(bad("@relation r\n@attribute t string\n", {"no @data"}));
  EXPECT_TRUE(bad("@relation r\n@attribute t string\n@attribute c {0,1}\n@data\n'a',?\n",
                  {"bad.arff:5", "attribute 'c' is missing"}));
  EXPECT_TRUE(
      bad("@relation r\n@attribute t string\n@data\n?\n", {"bad.arff:4", "attribute 't' is missing"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_arff(dir.file("none.arff")); },
                                              {"cannot open", "none.arff", "No such file or directory"}));
}

// A table of texts as Python's csv module writes it (CRLF rows, a text with commas, quotes and
// line breaks quoted), with a byte-order mark, the text column not first and named in another
// case than data.text_attribute's default, and labels of each kind.
TEST(TextCsv, ReadsQuotedMultiLineTextsAndEveryKindOfLabel) {
  testing::TempDir dir;
  const std::string train = write(dir.file("train.csv"),
                                  "\xEF\xBB\xBFtopic,text,score,flag\r\n"
                                  "wheat,\"first line, with a comma\r\nsecond \"\"quoted\"\" line\",0.5,1\r\n"
                                  "\r\n"
                                  "corn,plain text,2,0\r\n"
                                  "wheat,\"\",1.25,1\r\n");
  const TextTable t = read_text_csv(train, "Text");
  EXPECT_EQ(t.text_column, "text");
  EXPECT_EQ(t.texts,
            (std::vector<std::string>{"first line, with a comma\nsecond \"quoted\" line", "plain text", ""}));
  EXPECT_EQ(t.label_order, (std::vector<std::string>{"topic", "score", "flag"}));
  EXPECT_EQ(t.labels.at("topic"), (std::vector<std::int64_t>{1, 0, 1}));
  EXPECT_EQ(t.class_names.at("topic"), (std::vector<std::string>{"corn", "wheat"}));
  EXPECT_EQ(t.float_labels.at("score"), (std::vector<double>{0.5, 2.0, 1.25}));
  EXPECT_EQ(t.labels.at("flag"), (std::vector<std::int64_t>{1, 0, 1}));
  // The test table's classes are numbered by the training table's names.
  const std::string test = write(dir.file("test.csv"), "topic,text,score,flag\ncorn,x,1,0\n");
  EXPECT_EQ(read_text_csv(test, "text", train).labels.at("topic"), (std::vector<std::int64_t>{0}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_text_csv(write(dir.file("rye.csv"), "topic,text,score,flag\nrye,x,1,0\n"), "text", train); },
      {"'rye'", "corn, wheat"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_text_csv(write(dir.file("fewer.csv"), "topic,text\ncorn,x\n"), "text", train); },
      {"different columns", "topic,text,score,flag vs topic,text"}));
  // The same columns in another order: read by name, the labels listed in the training order.
  const TextTable moved =
      read_text_csv(write(dir.file("moved.csv"), "flag,score,text,topic\n1,3,y,wheat\n"), "text", train);
  EXPECT_EQ(moved.label_order, (std::vector<std::string>{"topic", "score", "flag"}));
  EXPECT_EQ(moved.labels.at("topic"), (std::vector<std::int64_t>{1}));
  EXPECT_EQ(moved.float_labels.at("score"), (std::vector<double>{3.0}));
  EXPECT_EQ(moved.labels.at("flag"), (std::vector<std::int64_t>{1}));
  // The text column: named, or matched ignoring case when only one column matches.
  const std::string body = write(dir.file("body.csv"), "body,topic\nhello,a\n");
  EXPECT_EQ(read_text_csv(body, "body").texts, (std::vector<std::string>{"hello"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_text_csv(body, "Text"); },
      {"body.csv:1", "text column 'Text'", "got 'body,topic'", "set data.text_attribute"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_text_csv(write(dir.file("two.csv"), "TEXT,text,topic\na,b,c\n"), "Text"); },
      {"several columns match it ignoring case"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] { read_text_csv(write(dir.file("semi.csv"), "text;topic\na;b\n"), "text"); },
      {"separated by ';'", "save it with commas"}));
}

TEST(TextCsv, BadTablesNameTheRowAndLine) {
  testing::TempDir dir;
  auto bad = [&](const std::string& body, std::initializer_list<std::string> fragments) {
    const std::string p = write(dir.file("bad.csv"), body);
    return testing::throws_with<DataError>([&] { read_text_csv(p, "text"); }, fragments);
  };
  // A quote left open swallows the rest of the file: refused, naming the row's first line.
  EXPECT_TRUE(bad("text,topic\nok,a\n\"open, b\nmore\nlines\n",
                  {"bad.csv:3", "never closed", "3 line(s) to the end of the file"}));
  // A row's field count is counted after its quoted line breaks.
  EXPECT_TRUE(bad("text,topic\n\"two\nlines\",a,extra\n", {"bad.csv:2", "3 fields, the header has 2"}));
  EXPECT_TRUE(bad("text,topic\n\xe9t\xe9,a\n", {"bad.csv:2", "the text of row 1", "not UTF-8", "iconv"}));
  EXPECT_TRUE(bad("text,topic\n", {"has a header but no rows"}));
  EXPECT_TRUE(bad("", {"table of texts", "is empty"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_text_csv(dir.file("none.csv"), "text"); },
                                              {"cannot open table of texts", "No such file or directory"}));
  // A folder opens as a stream and reads as nothing: refused as a folder (before: "is empty"; the
  // texts of one per line: none, and exit 0).
  make_dirs(dir.file("folder.csv"));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({dir.file("folder.csv"), TableFormat::json}, "text");
      },
      {"table of texts '", "folder.csv' is a folder: name the file"}));
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_text_lines(dir.file("folder.csv")); },
                                              {"file of texts (one per line) '", "folder.csv' is a folder"}));
}

// `content` gzip-compressed into `path`, as pandas' to_csv("FILE.csv.gz") and gzip write it.
// data.list_columns: a CSV column of labels separated by blanks or one character is a list of
// labels, as a JSON list is: items trimmed, empty ones dropped; a JSON list named stays as it is.
TEST(TextCsv, ListColumnsSplitFieldsIntoListsOfLabels) {
  testing::TempDir dir;
  const std::string spaced = write(dir.file("spaced.csv"),
                                   "tags,text,genre\n"
                                   "haze  primary\twater,a,x\n"
                                   ",b,y\n"
                                   "primary,c,x\n");
  const TextTable t = read_text_table({spaced, TableFormat::csv, {{"tags"}, "space"}}, "text");
  EXPECT_EQ(t.texts, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(t.label_order, (std::vector<std::string>{"genre", "tags"}));
  EXPECT_EQ(t.bit_names.at("tags"), (std::vector<std::string>{"haze", "primary", "water"}));
  EXPECT_EQ(t.labels.at("tags"), (std::vector<std::int64_t>{0b111, 0, 0b010}));
  const std::string piped =
      write(dir.file("piped.csv"), "text,genres\na,Action | Comedy\nb,\"Drama|Action||\"\nc,Comedy\n");
  const TextTable p = read_text_table({piped, TableFormat::csv, {{"genres"}, "|"}}, "text");
  EXPECT_EQ(p.bit_names.at("genres"), (std::vector<std::string>{"Action", "Comedy", "Drama"}));
  EXPECT_EQ(p.labels.at("genres"), (std::vector<std::int64_t>{0b011, 0b101, 0b010}));
  // A test table split alike, numbered by the training table's labels.
  const std::string test = write(dir.file("test.csv"), "genres,text\nDrama,z\n");
  EXPECT_EQ(read_text_table({test, TableFormat::csv, {{"genres"}, "|"}}, "text",
                            {piped, TableFormat::csv, {{"genres"}, "|"}})
                .labels.at("genres"),
            (std::vector<std::int64_t>{0b100}));
  // A JSON table's own list named too is read as the list it is; a string is split.
  const std::string json = write(dir.file("t.jsonl"), R"({"text": "a", "tags": ["x y"], "more": "p q"})");
  const TextTable j = read_text_table({json, TableFormat::json, {{"tags", "more"}, "space"}}, "text");
  EXPECT_EQ(j.bit_names.at("tags"), (std::vector<std::string>{"x y"}));
  EXPECT_EQ(j.bit_names.at("more"), (std::vector<std::string>{"p", "q"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({piped, TableFormat::csv, {{"tags"}, "|"}}, "text");
      },
      {"piped.csv: data.list_columns names 'tags', which it lacks (its columns: text, genres)"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({piped, TableFormat::csv, {{"text"}, "|"}}, "text");
      },
      {"its text column 'text' is named in data.list_columns"}));
}

std::string write_gz(const std::string& path, const std::string& content) {
  gzFile f = gzopen(path.c_str(), "wb");
  EXPECT_NE(f, nullptr) << path;
  EXPECT_EQ(gzwrite(f, content.data(), static_cast<unsigned>(content.size())),
            static_cast<int>(content.size()));
  gzclose(f);
  return path;
}

// Tables and texts saved gzip-compressed read as the plain files (the compression told by the
// file's first bytes, the format by its name without .gz); a cut one is an error naming it.
TEST(TextCsv, GzipCompressedTablesAndTextsReadAsThePlainFiles) {
  testing::TempDir dir;
  const std::string csv = "text,topic,score\n\"a, b\nc\",x,0.5\nd,y,2\n";
  const std::string jsonl = R"({"text": "a, b\nc", "topic": "x", "score": 0.5, "tags": ["p", "q"]})"
                            "\n"
                            R"({"text": "d", "topic": "y", "score": 2, "tags": []})"
                            "\n";
  EXPECT_EQ(table_format(dir.file("t.csv.gz")), TableFormat::csv);
  EXPECT_EQ(table_format(dir.file("t.JSONL.GZ")), TableFormat::json);
  EXPECT_EQ(table_format(dir.file("t.gz")), std::nullopt);
  const TextTable plain = read_text_table({write(dir.file("t.csv"), csv), TableFormat::csv}, "text");
  const TextTable packed = read_text_table({write_gz(dir.file("t.csv.gz"), csv), TableFormat::csv}, "text");
  EXPECT_EQ(packed.texts, plain.texts);
  EXPECT_EQ(packed.texts, (std::vector<std::string>{"a, b\nc", "d"}));
  EXPECT_EQ(packed.labels, plain.labels);
  EXPECT_EQ(packed.float_labels, plain.float_labels);
  const TextTable json =
      read_text_table({write_gz(dir.file("t.jsonl.gz"), jsonl), TableFormat::json}, "text");
  EXPECT_EQ(json.texts, plain.texts);
  EXPECT_EQ(json.labels.at("tags"), (std::vector<std::int64_t>{3, 0}));
  EXPECT_EQ(read_text_lines(write_gz(dir.file("t.txt.gz"), "one\ntwo\n")),
            (std::vector<std::string>{"one", "two"}));
  // The same gzip stream cut short, or with a bit flipped: zlib's error, naming the file (not its
  // first rows as the table).
  std::string big;
  for (int i = 0; i < 20000; ++i) big += "text " + std::to_string(i * 7919 % 10007) + ",x,1\n";
  write_gz(dir.file("cut.csv.gz"), "text,topic,score\n" + big);
  {
    std::string bytes = read_file(dir.file("cut.csv.gz"));
    bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x10);
    write(dir.file("flip.csv.gz"), bytes);
  }
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({dir.file("flip.csv.gz"), TableFormat::csv}, "text");
      },
      {"error reading '", "flip.csv.gz': ", "(the gzip stream is damaged)"}));
  const auto size = static_cast<off_t>(file_size(dir.file("cut.csv.gz")));
  ASSERT_EQ(::truncate(dir.file("cut.csv.gz").c_str(), size / 2), 0);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({dir.file("cut.csv.gz"), TableFormat::csv}, "text");
      },
      {"error reading '", "cut.csv.gz': unexpected end of file (the gzip stream is cut short)"}));
}

// JSON lines as Hugging Face datasets' to_json writes them (keys in the columns' order,
// non-ASCII escaped), a blank line, keys in another order, each kind of value: the same table
// as the CSV with those fields; an array of records (pandas' orient="records") likewise.
TEST(TextJson, ReadsRecordsAsTheCsvWithTheSameFields) {
  testing::TempDir dir;
  const std::string csv = write(dir.file("train.csv"),
                                "topic,text,score,flag,hot\n"
                                "wheat,\"caf\xc3\xa9, \"\"quoted\"\"\nline\",0.5,1,true\n"
                                "corn , plain ,2,0,false\n"
                                "wheat,,1.25,1,false\n");
  const std::string jsonl = write(
      dir.file("train.jsonl"),
      R"({"topic": "wheat", "text": "caf\u00e9, \"quoted\"\nline", "score": 0.5, "flag": 1, "hot": true})"
      "\r\n\n"
      R"({"text": " plain ", "topic": "corn", "score": 2, "flag": 0, "hot": false})"
      "\n"
      R"({"topic": "wheat", "text": null, "score": 1.25, "flag": 1, "hot": false})");
  const TextTable c = read_text_csv(csv, "text");
  const TextTable j = read_text_table({jsonl, TableFormat::json}, "text");
  EXPECT_EQ(j.texts, c.texts);
  EXPECT_EQ(j.texts[0], "caf\xc3\xa9, \"quoted\"\nline");
  EXPECT_EQ(c.texts[1], " plain ") << "a text as written: a byte-level BPE tokenizer reads its blanks";
  EXPECT_EQ(c.class_names.at("topic"), (std::vector<std::string>{"corn", "wheat"})) << "labels are trimmed";
  EXPECT_EQ(j.label_order, c.label_order);
  EXPECT_EQ(j.labels, c.labels);
  EXPECT_EQ(j.float_labels, c.float_labels);
  EXPECT_EQ(j.class_names, c.class_names);
  EXPECT_EQ(j.class_names.at("hot"), (std::vector<std::string>{"false", "true"}));
  const std::string array = write(dir.file("train.json"), R"([
 {"topic": "wheat", "text": "a", "score": 0.5, "flag": 1, "hot": true},
 {"topic": "corn", "text": "b", "score": 2, "flag": 0, "hot": false}
]
)");
  EXPECT_EQ(read_text_table({array, TableFormat::json}, "text").labels.at("topic"),
            (std::vector<std::int64_t>{1, 0}));
  // Keys holding objects or lists of lists in the first record are no columns.
  const TextTable ids = read_text_table(
      {write(dir.file("ids.jsonl"), R"({"ids": [[2, 4]], "text": "a", "topic": "x", "meta": {"n": 1}})"
                                    "\n"
                                    R"({"ids": [], "text": "b", "topic": "y", "meta": null})"),
       TableFormat::json},
      "text");
  EXPECT_EQ(ids.texts, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(ids.label_order, (std::vector<std::string>{"topic"}));
  EXPECT_EQ(ids.left_out, (std::vector<std::string>{"ids", "meta"}));
  // A test table in the other format, numbered by the training table's names.
  const std::string test =
      write(dir.file("test.jsonl"), R"({"text": "x", "hot": true, "flag": 0, "score": 1, "topic": "corn"})"
                                    "\n");
  const TextTable t = read_text_table({test, TableFormat::json}, "text", {csv, TableFormat::csv});
  EXPECT_EQ(t.label_order, c.label_order);
  EXPECT_EQ(t.labels.at("topic"), (std::vector<std::int64_t>{0}));
  EXPECT_EQ(t.labels.at("hot"), (std::vector<std::int64_t>{1}));
  EXPECT_EQ(table_format("a/B.JSONL"), TableFormat::json);
  EXPECT_EQ(table_format("b.ndjson"), TableFormat::json);
  EXPECT_EQ(table_format("c.csv"), TableFormat::csv);
  EXPECT_FALSE(table_format("d.txt").has_value());
}

// A key holding a list of labels in every record (Hugging Face's multi-label columns) is a
// bitmask source (multi-hot past 62 labels): bit j the j-th label (integers: themselves; names: sorted from
// the training table); null is no label; the test table's lists are read by the training table's labels.
TEST(TextJson, AListOfLabelsIsABitmaskSource) {
  testing::TempDir dir;
  const std::string train =
      write(dir.file("train.jsonl"), R"({"text": "a", "tags": ["wheat", "corn"], "ids": [3], "topic": "x"})"
                                     "\n"
                                     R"({"text": "b", "tags": [], "ids": [0, 2], "topic": "y"})"
                                     "\n"
                                     R"({"text": "c", "tags": null, "ids": null, "topic": "x"})"
                                     "\n"
                                     R"({"text": "d", "tags": ["rye"], "ids": [1, 1], "topic": "y"})");
  const TextTable t = read_text_table({train, TableFormat::json}, "text");
  EXPECT_EQ(t.label_order, (std::vector<std::string>{"topic", "tags", "ids"}));
  EXPECT_EQ(t.bit_names.at("tags"), (std::vector<std::string>{"corn", "rye", "wheat"}));
  EXPECT_EQ(t.labels.at("tags"), (std::vector<std::int64_t>{0b101, 0, 0, 0b010}));
  EXPECT_EQ(t.bit_names.at("ids"), (std::vector<std::string>{"0", "1", "2", "3"}));
  EXPECT_EQ(t.labels.at("ids"), (std::vector<std::int64_t>{0b1000, 0b0101, 0, 0b0010}));
  const std::string test =
      write(dir.file("test.jsonl"), R"({"ids": [3, 0], "tags": ["rye"], "topic": "x", "text": "e"})");
  const TextTable u = read_text_table({test, TableFormat::json}, "text", {train, TableFormat::json});
  EXPECT_EQ(u.labels.at("tags"), (std::vector<std::int64_t>{0b010}));
  EXPECT_EQ(u.labels.at("ids"), (std::vector<std::int64_t>{0b1001}));
  auto refused = [&](const std::string& body, std::initializer_list<std::string> fragments) {
    const std::string p = write(dir.file("bad.jsonl"), body);
    return testing::throws_with<DataError>(
        [&] {
          read_text_table({p, TableFormat::json}, "text", {train, TableFormat::json});
        },
        fragments);
  };
  EXPECT_TRUE(refused(R"({"text": "e", "tags": ["oats"], "ids": [], "topic": "x"})",
                      {"row 1 lists tags 'oats'", "never lists (its labels: corn, rye, wheat)"}));
  EXPECT_TRUE(refused(R"({"text": "e", "tags": [], "ids": [4], "topic": "x"})", {"lists ids '4'"}));
  EXPECT_TRUE(refused(R"({"text": "e", "tags": "rye", "ids": [], "topic": "x"})", {"different columns"}));
  EXPECT_TRUE(refused(
      R"({"text": "e", "tags": [], "ids": [], "topic": "x"})"
      "\n"
      R"({"text": "f", "tags": [], "ids": [], "topic": "x", "more": 1})",
      {"bad.jsonl:2", "has 'more', which the first record lacks (its keys: text, topic, tags, ids)"}));
  EXPECT_TRUE(refused(R"({"text": "e", "tags": [], "ids": [], "topic": "x"})"
                      "\n"
                      R"({"text": "f", "tags": "rye", "ids": [], "topic": "x"})",
                      {"bad.jsonl:2", "'tags' holds \"rye\" where the first record holds a list"}));
  // Past 62 labels a list is multi-hot: a row of K zeros and ones (label_lists.h), K at most 4096.
  std::string many = R"({"text": "a", "n": [)";
  for (int j = 0; j < 63; j += 2) many += (j ? ", " : "") + std::to_string(j);
  const TextTable wide = read_text_table(
      {write(dir.file("many.jsonl"), many + "]}\n" + R"({"text": "b", "n": [61, 1]})"), TableFormat::json},
      "text");
  ASSERT_EQ(wide.bit_names.at("n").size(), 63u) << "0 to 62";
  std::vector<std::int64_t> rows(2 * 63, 0);
  for (int j = 0; j < 63; j += 2) rows[j] = 1;
  rows[63 + 61] = rows[63 + 1] = 1;
  EXPECT_EQ(wide.labels.at("n"), rows);
  // Names: sorted from the training table, a test table's rows by its labels.
  std::string named_train, named_test = R"({"text": "z", "w": ["w07", "w69"]})";
  for (int j = 0; j < 70; ++j) {
    char name[8];
    std::snprintf(name, sizeof name, "w%02d", 69 - j);  // listed in reverse
    named_train += std::string(R"({"text": "t", "w": [")") + name + "\"]}\n";
  }
  const std::string named = write(dir.file("named.jsonl"), named_train);
  const TextTable nt = read_text_table({named, TableFormat::json}, "text");
  EXPECT_EQ(nt.bit_names.at("w").front(), "w00");
  EXPECT_EQ(nt.bit_names.at("w").back(), "w69");
  std::vector<std::int64_t> reversed(70 * 70, 0);  // row i lists w(69 - i)
  for (int i = 0; i < 70; ++i) reversed[i * 70 + 69 - i] = 1;
  EXPECT_EQ(nt.labels.at("w"), reversed);
  const TextTable nu = read_text_table({write(dir.file("named_test.jsonl"), named_test), TableFormat::json},
                                       "text", {named, TableFormat::json});
  std::vector<std::int64_t> test_row(70, 0);
  test_row[7] = test_row[69] = 1;
  EXPECT_EQ(nu.labels.at("w"), test_row);
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table(
            {write(dir.file("bad_named.jsonl"), R"({"text": "z", "w": ["w70"]})"), TableFormat::json}, "text",
            {named, TableFormat::json});
      },
      {"lists w 'w70'", "its labels: w00, w01", "w09, ... 70 labels)"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({write(dir.file("huge.jsonl"), R"({"text": "a", "n": [4096]})"), TableFormat::json},
                        "text");
      },
      {"'n' lists label 4096", "at most 4096"}));
  EXPECT_TRUE(testing::throws_with<DataError>(
      [&] {
        read_text_table({write(dir.file("none.jsonl"), R"({"text": "a", "n": []})"), TableFormat::json},
                        "text");
      },
      {"'n' holds only empty lists"}));
}

TEST(TextJson, BadRecordsNameTheLineAndKey) {
  testing::TempDir dir;
  auto bad = [&](const std::string& body, std::initializer_list<std::string> fragments) {
    const std::string p = write(dir.file("bad.jsonl"), body);
    return testing::throws_with<DataError>(
        [&] {
          read_text_table({p, TableFormat::json}, "text");
        },
        fragments);
  };
  EXPECT_TRUE(bad(R"({"text": "a", "tags": 1})"
                  "\n"
                  R"({"text": "b", "tags": [1, 2]})",
                  {"bad.jsonl:2", "'tags' holds a list", "where the first record holds one value",
                   "a list of them in every record"}));
  EXPECT_TRUE(bad(R"({"text": "a", "t": 1})"
                  "\n"
                  R"({"text": "b"})",
                  {"bad.jsonl:2", "has no 't'"}));
  EXPECT_TRUE(bad(R"({"text": "a", "t": 1})"
                  "\n\n"
                  R"({"text": "b", "t": 1, "u": 2})",
                  {"bad.jsonl:3", "has 'u', which the first record lacks"}));
  EXPECT_TRUE(
      bad("{\"text\": \"a\",\n \"t\": 1}\n", {"bad.jsonl:1", "not a JSON record", "write one per line"}));
  EXPECT_TRUE(bad("{\"text\": \"\xe9\", \"t\": 1}\n", {"bad.jsonl:1", "not a JSON record", "UTF-8"}));
  EXPECT_TRUE(bad("[1, 2]\n", {"bad.jsonl: record 1", "should be a JSON object", "got number"}));
  EXPECT_TRUE(bad(R"({"body": "a"})", {"bad.jsonl:1", "text column 'text'", "got 'body'"}));
  EXPECT_TRUE(bad("\n\n", {"table of texts", "is empty"}));
  EXPECT_TRUE(bad(R"({"ids": [1], "meta": {"a": 1}})",
                  {"bad.jsonl:1", "no key of one value (ids, meta: lists or objects)"}));
  // A JSON table read as CSV says what it is.
  const std::string p = write(dir.file("records.csv"), R"({"text": "a", "t": 1})");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { read_text_csv(p, "text"); },
                                              {"JSON records, not CSV", "data.source = text-json"}));
}

// Lines of a pipe as they come: what is there is taken without waiting for more, up to max;
// a last line without a newline at the end; a byte-order mark at the start and \r dropped;
// a line that is not UTF-8 refused, naming the stream and the line.
TEST(LineStream, TakesTheLinesThereUpToMaxThenTheRestAtTheEnd) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const auto put = [&](const std::string& s) {
    ASSERT_EQ(::write(fds[1], s.data(), s.size()), static_cast<ssize_t>(s.size()));
  };
  LineStream lines(fds[0], "standard input");
  put("\xEF\xBB\xBF"
      "first\r\nsecond\nthird\n");
  EXPECT_EQ(lines.next(2), (std::vector<std::string>{"first", "second"}));
  EXPECT_EQ(lines.next(5), (std::vector<std::string>{"third"})) << "what is there, the pipe still open";
  put("fourth\nfif");
  EXPECT_EQ(lines.next(5), (std::vector<std::string>{"fourth"})) << "a partial line waits for its end";
  put("th\nsixth");
  ::close(fds[1]);
  EXPECT_EQ(lines.next(5), (std::vector<std::string>{"fifth", "sixth"}));
  EXPECT_TRUE(lines.next(5).empty());
  ::close(fds[0]);

  ASSERT_EQ(::pipe(fds), 0);
  LineStream bad(fds[0], "standard input");
  put("fine\nnot \xFF utf-8\n");
  ::close(fds[1]);
  EXPECT_TRUE(testing::throws_with<DataError>([&] { bad.next(5); }, {"standard input:2", "UTF-8"}));
  ::close(fds[0]);
}

// A file as standard input (`< file`): the stream reads ahead, and gives back what it read past
// the last line taken, so the next reader of the descriptor starts at the line after it.
TEST(LineStream, GivesBackWhatItReadPastTheLastLineWhereItCanSeek) {
  testing::TempDir dir;
  write_file_atomic(dir.file("lines.txt"), "one\ntwo\nthree\nfour\n");
  const int fd = ::open(dir.file("lines.txt").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  {
    LineStream lines(fd, "standard input");
    EXPECT_EQ(lines.next(2), (std::vector<std::string>{"one", "two"}));
  }
  char rest[64] = {};
  EXPECT_EQ(std::string(rest, static_cast<std::size_t>(::read(fd, rest, sizeof rest))), "three\nfour\n");
  ::close(fd);
}

}  // namespace
}  // namespace canopy::datasets
