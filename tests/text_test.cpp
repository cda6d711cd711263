// The WordPiece tokenizer and the readers of texts (ARFF, CSV tables) on small files made here.
// Agreement with the reference tokenizer on real text is checked by tests/python/test_text.py.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "canopy/core/error.h"
#include "canopy/core/fs.h"
#include "canopy/datasets/text.h"
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
  const WordPieceTokenizer t(config(dir));
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
  const WordPieceTokenizer t(config(dir));
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
  EXPECT_EQ(WordPieceTokenizer(cased).encode("Hello hello"), (Ids{2, 1, 7, 3}));
}

TEST(WordPiece, TruncatesToMaxLengthKeepingSeparators) {
  testing::TempDir dir;
  EXPECT_EQ(WordPieceTokenizer(config(dir, 4)).encode("hello world hello"), (Ids{2, 7, 9, 3}));
  EXPECT_EQ(WordPieceTokenizer(config(dir, 4)).encode("unaffable"), (Ids{2, 4, 5, 3})) << "cut inside a word";
  EXPECT_EQ(WordPieceTokenizer(config(dir, 3)).encode("hello world"), (Ids{2, 7, 3}));
  const std::string longword(101, 'a');
  EXPECT_EQ(WordPieceTokenizer(config(dir)).encode(longword), (Ids{2, 1, 3})) << "over 100 characters: [UNK]";
}

TEST(WordPiece, BadVocabulariesAndSettingsAreClearErrors) {
  testing::TempDir dir;
  TokenizerConfig c = config(dir);
  c.vocab = write(dir.file("novocab.txt"), "[PAD]\n[UNK]\n[SEP]\nhello\n");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { WordPieceTokenizer t(c); }, {"novocab.txt", "[CLS]"}));
  c.vocab = dir.file("missing.txt");
  EXPECT_TRUE(testing::throws_with<DataError>([&] { WordPieceTokenizer t(c); }, {"missing.txt"}));
  c = config(dir, 2);
  EXPECT_TRUE(
      testing::throws_with<ConfigError>([&] { WordPieceTokenizer t(c); }, {"text.max_length", "got 2"}));
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
      {"different headers", "topic,text,score,flag vs topic,text"}));
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
