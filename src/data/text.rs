//! Text: a file of sentence pairs (one pair per line, a tab between), tokenized by words or by
//! characters, with vocabularies built from the training split.
//!
//! Ids: 0 `<pad>`, 1 `<unk>`, 2 `<s>`, 3 `</s>`, then the tokens of the training split by
//! falling count (ties: first seen first) while they are seen at least `min_count` times and
//! the declared `token[V]` has room. A sentence becomes its ids, `</s>`, then `<pad>` up to the
//! declared `seq[<= N]`; a sentence that does not fit is an error naming its line. The word
//! tokenizer lowercases and splits off every character that is neither a letter, a digit nor an
//! apostrophe inside a word; the character tokenizer lowercases and keeps every character
//! (spaces included).

use super::{Array, DataError, Values, err};
use std::collections::HashMap;
use std::path::Path;

pub const PAD: i32 = 0;
pub const UNK: i32 = 1;
pub const START: i32 = 2;
pub const END: i32 = 3;
const SPECIALS: [&str; 4] = ["<pad>", "<unk>", "<s>", "</s>"];

pub use crate::syntax::ast::Tokens;

impl Tokens {
    pub fn split(self, sentence: &str) -> Vec<String> {
        let lower = sentence.to_lowercase();
        match self {
            Tokens::Char => lower.trim().chars().map(String::from).collect(),
            Tokens::Word => {
                let mut out = Vec::new();
                for word in lower.split_whitespace() {
                    let chars: Vec<char> = word.chars().collect();
                    let mut cur = String::new();
                    for (i, &c) in chars.iter().enumerate() {
                        let inside = i > 0 && i + 1 < chars.len() && chars[i - 1].is_alphanumeric();
                        if c.is_alphanumeric() || (c == '\'' && inside && chars[i + 1].is_alphanumeric()) {
                            cur.push(c);
                        } else {
                            if !cur.is_empty() {
                                out.push(std::mem::take(&mut cur));
                            }
                            out.push(c.to_string());
                        }
                    }
                    if !cur.is_empty() {
                        out.push(cur);
                    }
                }
                out
            }
        }
    }

    /// Tokens back into text: words with spaces (punctuation attached to the word before it),
    /// characters as they are.
    pub fn join(self, tokens: &[&str]) -> String {
        match self {
            Tokens::Char => tokens.concat(),
            Tokens::Word => {
                let mut out = String::new();
                for t in tokens {
                    let punct = t.chars().all(|c| !c.is_alphanumeric() && c != '¿' && c != '¡');
                    if !out.is_empty() && !punct && !out.ends_with(['¿', '¡']) {
                        out.push(' ');
                    }
                    out.push_str(t);
                }
                out
            }
        }
    }
}

/// A vocabulary: token `i` has id `i`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Vocab {
    pub tokens: Vec<String>,
}

impl Vocab {
    /// From the token lists of the training sentences: at most `cap` ids in all.
    pub fn build<'a>(sentences: impl Iterator<Item = &'a [String]>, cap: usize, min_count: u64) -> Vocab {
        let mut count: HashMap<&str, (u64, usize)> = HashMap::new();
        let mut order = 0;
        for s in sentences {
            for t in s {
                let e = count.entry(t.as_str()).or_insert((0, order));
                e.0 += 1;
                order += 1;
            }
        }
        let mut ranked: Vec<(&str, (u64, usize))> =
            count.into_iter().filter(|(_, (c, _))| *c >= min_count).collect();
        ranked.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.1.1.cmp(&b.1.1)));
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| (*s).to_owned()).collect();
        tokens.extend(ranked.into_iter().take(cap.saturating_sub(SPECIALS.len())).map(|(t, _)| t.to_owned()));
        Vocab { tokens }
    }

    /// The id of each token, made once to encode many sentences.
    pub fn encoder(&self) -> Encoder<'_> {
        Encoder(self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as i32)).collect())
    }

    /// The tokens of `ids` up to the first `</s>` (padding and `<s>` left out).
    pub fn decode(&self, ids: &[i32]) -> Vec<&str> {
        ids.iter()
            .take_while(|&&id| id != END)
            .filter(|&&id| id != PAD && id != START)
            .map(|&id| self.tokens.get(id as usize).map_or("<unk>", String::as_str))
            .collect()
    }
}

/// A vocabulary's ids by token.
pub struct Encoder<'a>(HashMap<&'a str, i32>);

impl Encoder<'_> {
    /// A sentence's ids: its tokens (`<unk>` for those not in the vocabulary) and `</s>`,
    /// padded to `len`; `None` when they do not fit.
    pub fn encode(&self, tokens: &[String], len: usize) -> Option<Vec<i32>> {
        if tokens.len() + 1 > len {
            return None;
        }
        let mut ids: Vec<i32> =
            tokens.iter().map(|t| self.0.get(t.as_str()).copied().unwrap_or(UNK)).collect();
        ids.push(END);
        ids.resize(len, PAD);
        Some(ids)
    }
}

/// What `vocab.json` holds: the tokenizer (`word` or `char`) and a vocabulary per column.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextVocab {
    pub tokens: String,
    pub columns: Vec<Vocab>,
}

/// The name of the vocabulary file beside a run's checkpoint.
pub const VOCAB_FILE: &str = "vocab.json";

impl TextVocab {
    pub fn read(path: &Path) -> Result<TextVocab, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: TextVocab = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a vocabulary aec wrote: {e}", path.display()))?;
        v.tokenizer().ok_or_else(|| format!("{}: unknown tokenizer `{}`", path.display(), v.tokens))?;
        Ok(v)
    }

    /// The vocabulary of the sentences a model writes: the second column's, or the first's
    /// for a model that reads one (a sentence autoencoder).
    pub fn target(&self) -> Option<&Vocab> {
        self.columns.get(1).filter(|v| !v.tokens.is_empty()).or(self.columns.first())
    }

    pub fn tokenizer(&self) -> Option<Tokens> {
        match self.tokens.as_str() {
            "word" => Some(Tokens::Word),
            "char" => Some(Tokens::Char),
            _ => None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// The pairs of a file: one per line, a tab between. With `pairs` false (a sentence
/// autoencoder reads one column) a line without a tab is one sentence, for both columns.
pub fn read_pairs(path: &Path, pairs: bool) -> Result<Vec<(String, String)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        let at = |what: &str| err(format!("{}:{}: {what}", path.display(), i + 1));
        if line.trim().is_empty() {
            return Err(at("an empty line (every line is a sentence, or two separated by a tab)"));
        }
        let mut parts = line.split('\t');
        let first = parts.next().unwrap_or_default().trim().to_owned();
        let second = parts.next().map(|s| s.trim().to_owned());
        if parts.next().is_some() {
            return Err(at("more than one tab (a line is a sentence and its translation)"));
        }
        if pairs && second.is_none() {
            return Err(at("no tab: each line is a sentence, a tab, and its translation"));
        }
        if first.is_empty() || second.as_ref().is_some_and(String::is_empty) {
            return Err(at("an empty sentence beside the tab"));
        }
        let second = second.unwrap_or_else(|| first.clone());
        out.push((first, second));
    }
    if out.is_empty() {
        return Err(err(format!("{}: no sentences", path.display())));
    }
    Ok(out)
}

/// The arrays of `columns` (0: the sentences before the tab, 1: after it) as ids, each padded
/// to its `(len, vocab cap)`, with vocabularies built from the sentences `train`.
pub fn load(
    path: &Path,
    tokens: Tokens,
    min_count: u64,
    columns: &[(usize, (usize, usize))],
    (fraction, seed): (f64, u64),
) -> Result<(Vec<Array>, TextVocab), DataError> {
    let pairs = read_pairs(path, columns.iter().any(|c| c.0 == 1))?;
    let (train, _) = super::split(pairs.len(), fraction, seed);
    let split: Vec<(Vec<String>, Vec<String>)> =
        pairs.iter().map(|(a, b)| (tokens.split(a), tokens.split(b))).collect();
    let mut arrays = Vec::new();
    let mut vocabs = vec![Vocab { tokens: Vec::new() }; 2];
    for &(column, (len, cap)) in columns {
        let sentences: Vec<&[String]> =
            split.iter().map(|p| if column == 0 { p.0.as_slice() } else { p.1.as_slice() }).collect();
        let vocab = Vocab::build(train.iter().filter_map(|&i| sentences.get(i).copied()), cap, min_count);
        let mut ids = Vec::with_capacity(sentences.len() * len);
        let longest = sentences.iter().map(|s| s.len()).max().unwrap_or(0);
        let encoder = vocab.encoder();
        for (i, s) in sentences.iter().enumerate() {
            let Some(v) = encoder.encode(s, len) else {
                let many = match sentences.iter().filter(|s| s.len() + 1 > len).count() {
                    1 => "it is the only one".to_owned(),
                    k => format!("{k} sentences do not fit; the longest has {longest} tokens"),
                };
                return Err(err(format!(
                    "{}:{}: the {} sentence has {} tokens and its end token, more than seq[<= {len}] holds \
                     ({many}): declare seq[<= {}]",
                    path.display(),
                    i + 1,
                    if column == 0 { "first" } else { "second" },
                    s.len(),
                    longest + 1
                )));
            };
            ids.extend(v);
        }
        arrays.push(Array { shape: vec![sentences.len(), len], values: Values::I32(ids) });
        vocabs[column] = vocab;
    }
    Ok((arrays, TextVocab { tokens: tokens.keyword().to_owned(), columns: vocabs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_off_punctuation_and_keep_apostrophes() {
        let t = Tokens::Word.split("It's Saturday Night! Don't, \"stop\".");
        assert_eq!(t, ["it's", "saturday", "night", "!", "don't", ",", "\"", "stop", "\"", "."]);
        assert_eq!(Tokens::Word.join(&["¿", "qué", "es", "?"]), "¿qué es?");
        assert_eq!(Tokens::Char.split(" Ab c"), ["a", "b", " ", "c"]);
    }

    #[test]
    fn the_vocabulary_ranks_by_count_then_first_seen() {
        let s: Vec<Vec<String>> = [["b", "a", "a"], ["c", "b", "d"]]
            .iter()
            .map(|s| s.iter().map(|t| (*t).to_owned()).collect())
            .collect();
        let v = Vocab::build(s.iter().map(Vec::as_slice), 6, 1);
        assert_eq!(v.tokens, ["<pad>", "<unk>", "<s>", "</s>", "b", "a"]);
        let ids = v.encoder().encode(&["a".into(), "z".into()], 4).expect("fits");
        assert_eq!(ids, [5, UNK, END, PAD]);
        assert_eq!(v.encoder().encode(&vec!["a".to_owned(); 4], 4), None);
        assert_eq!(v.decode(&[5, 4, END, 5]), ["a", "b"]);
        let v = Vocab::build(s.iter().map(Vec::as_slice), 100, 2);
        assert_eq!(v.tokens.len(), 6, "tokens seen once are left out");
    }
}
