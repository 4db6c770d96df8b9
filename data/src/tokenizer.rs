//! Tokenizers: the byte-level fallback (`bytes`) and any Hugging Face `tokenizer.json`,
//! plus training a byte-level BPE (`catapult data tokenizer train`).

use crate::DataError;
use std::path::Path;

/// Special token that ends every document in tokenizers we train.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// End-of-document tokens tried, in order, when a tokenizer.json is loaded without an
/// explicit `data.eod_token`.
const EOD_CANDIDATES: [&str; 5] = [END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>"];

/// Maps text to ids 0..=255 (its UTF-8 bytes) and marks document ends with `EOD`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Id appended after every document.
    pub const EOD: u32 = 256;
    /// Ids in use: 256 bytes and `EOD`.
    pub const VOCAB_SIZE: usize = 257;

    /// The document's ids, followed by `EOD`.
    pub fn encode_document(&self, text: &str, out: &mut Vec<u32>) {
        out.extend(text.bytes().map(u32::from));
        out.push(Self::EOD);
    }
}

enum Kind {
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

/// A loaded tokenizer: how text becomes ids, which id ends a document, and a fingerprint
/// that pre-tokenized datasets are checked against.
pub struct Tokenizer {
    kind: Kind,
    eod: u32,
    vocab_size: usize,
    fingerprint: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer(vocab {}, eod {}, {})",
            self.vocab_size, self.eod, self.fingerprint
        )
    }
}

impl Tokenizer {
    /// The byte-level tokenizer.
    pub fn bytes() -> Self {
        Self {
            kind: Kind::Bytes,
            eod: ByteTokenizer::EOD,
            vocab_size: ByteTokenizer::VOCAB_SIZE,
            fingerprint: "bytes".into(),
        }
    }

    /// `bytes`, or the path of a tokenizer.json. `eod_token` names the end-of-document
    /// token; without it the usual names are tried.
    pub fn load(spec: &str, eod_token: Option<&str>) -> Result<Self, DataError> {
        if spec == "bytes" {
            return Ok(Self::bytes());
        }
        let path = Path::new(spec);
        let fail = |problem: String| DataError::Tokenizer {
            path: spec.to_string(),
            problem,
        };
        let raw = std::fs::read(path).map_err(|e| {
            fail(format!(
                "cannot be read ({e}); train one with `catapult data tokenizer train --vocab-size V INPUT... -o {spec}`, \
                 or set data.tokenizer to `bytes`"
            ))
        })?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&raw)
            .map_err(|e| fail(format!("is not a valid tokenizer.json ({e})")))?;
        let eod = match eod_token {
            Some(name) => tokenizer.token_to_id(name).ok_or_else(|| {
                fail(format!(
                    "has no token `{name}` (data.eod_token); name a token of its vocabulary"
                ))
            })?,
            None => EOD_CANDIDATES
                .iter()
                .find_map(|name| tokenizer.token_to_id(name))
                .ok_or_else(|| {
                    fail(format!(
                        "has none of the usual end-of-document tokens ({}); set data.eod_token",
                        EOD_CANDIDATES.join(", ")
                    ))
                })?,
        };
        let vocab_size = tokenizer.get_vocab_size(true).max(eod as usize + 1);
        Ok(Self {
            kind: Kind::Hf(Box::new(tokenizer)),
            eod,
            vocab_size,
            fingerprint: blake3::hash(&raw).to_hex().to_string(),
        })
    }

    /// The id that ends every document.
    pub fn eod(&self) -> u32 {
        self.eod
    }

    /// Ids in use (the model's vocabulary must be at least this large).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `bytes`, or the BLAKE3 hash of the tokenizer.json.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Appends the document's ids and the end-of-document id to `out`.
    pub fn encode_document(&self, text: &str, out: &mut Vec<u32>) -> Result<(), DataError> {
        match &self.kind {
            Kind::Bytes => ByteTokenizer.encode_document(text, out),
            Kind::Hf(t) => {
                let encoding = t
                    .encode_fast(text, false)
                    .map_err(|e| DataError::Tokenizer {
                        path: self.fingerprint.clone(),
                        problem: format!("failed to encode a document ({e})"),
                    })?;
                out.extend_from_slice(encoding.get_ids());
                out.push(self.eod);
            }
        }
        Ok(())
    }
}

/// Trains a byte-level BPE with `vocab_size` ids (including `<|endoftext|>`) on `texts`
/// and writes it to `out` as a tokenizer.json. Deterministic: the same texts give the
/// same file.
pub fn train_bpe<I>(texts: I, vocab_size: usize, out: &Path) -> Result<(), DataError>
where
    I: Iterator<Item = String> + Send,
{
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, NormalizerWrapper, TokenizerBuilder};
    let fail = |problem: String| DataError::Tokenizer {
        path: out.display().to_string(),
        problem,
    };
    let alphabet = ByteLevel::alphabet();
    if vocab_size < alphabet.len() + 1 {
        return Err(fail(format!(
            "--vocab-size {vocab_size} is below the {} byte symbols plus {END_OF_TEXT}; use at least {}",
            alphabet.len(),
            alphabet.len() + 1
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(|e| fail(e.to_string()))?;
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| fail(format!("training failed ({e})")))?;
    let tmp = out.with_extension("json.tmp");
    tokenizer
        .save(&tmp, false)
        .map_err(|e| fail(format!("cannot be written ({e})")))?;
    std::fs::rename(&tmp, out).map_err(|e| fail(format!("cannot be written ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_utf8_bytes_and_end_of_document() {
        let mut ids = Vec::new();
        ByteTokenizer.encode_document("hé", &mut ids);
        assert_eq!(ids, vec![104, 0xc3, 0xa9, ByteTokenizer::EOD]);
    }

    fn corpus() -> Vec<String> {
        (0..400)
            .map(|i| {
                format!(
                    "In the beginning number {i} the quick brown fox jumps over the lazy dog {}",
                    i % 7
                )
            })
            .collect()
    }

    #[test]
    fn trained_bpe_round_trips_is_deterministic_and_compresses() {
        let dir = std::env::temp_dir().join(format!("catapult-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.json"), dir.join("b.json"));
        train_bpe(corpus().into_iter(), 300, &a).unwrap();
        train_bpe(corpus().into_iter(), 300, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let t = Tokenizer::load(a.to_str().unwrap(), None).unwrap();
        assert_eq!(t.vocab_size(), 300);
        let text = "the quick brown fox jumps over the lazy dog";
        let mut ids = Vec::new();
        t.encode_document(text, &mut ids).unwrap();
        assert_eq!(*ids.last().unwrap(), t.eod());
        assert!(
            ids.len() < text.len() / 2,
            "{} ids for {} bytes",
            ids.len(),
            text.len()
        );
        let Kind::Hf(hf) = &t.kind else { panic!() };
        assert_eq!(hf.decode(&ids[..ids.len() - 1], true).unwrap(), text);
    }

    #[test]
    fn missing_tokenizer_file_names_the_path_and_the_fix() {
        let err = Tokenizer::load("/nonexistent/tokenizer.json", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
        assert!(err.contains("catapult data tokenizer train"), "{err}");
    }
}
