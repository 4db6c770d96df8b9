//! The byte-level tokenizer: every UTF-8 byte is one id, plus an end-of-document id.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_utf8_bytes_and_end_of_document() {
        let mut ids = Vec::new();
        ByteTokenizer.encode_document("hé", &mut ids);
        assert_eq!(ids, vec![104, 0xc3, 0xa9, ByteTokenizer::EOD]);
    }
}
