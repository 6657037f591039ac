//! kombu's message compression: a `compression` header names the codec, and the body is
//! compressed with it. kombu registers zlib as `application/x-gzip` (aliases `gzip`, `zlib`;
//! the bytes are zlib's, not gzip's), and every kombu consumer — Celery's event receivers,
//! Flower, celery-exporter — decompresses a message whose header names it before reading it.
//!
//! wasmq compresses its batches of task events on RabbitMQ: they are JSON that repeats
//! itself (the same keys, node and task name in every event), about 250 bytes an event that
//! zlib's fastest level cuts ninefold, so the broker moves a ninth of the bytes for a
//! fraction of the CPU it took to move them (BENCHMARKS.md, "task events").

use std::io::{Read, Write};

/// The `compression` header of a zlib body, as kombu writes it.
pub const ZLIB: &str = "application/x-gzip";

/// What can go wrong reading a compressed body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    /// A codec wasmq does not read.
    #[error("unsupported compression {0:?} (wasmq reads application/x-gzip, kombu's zlib)")]
    Unsupported(String),
    /// The body is not what the codec says.
    #[error("the body is not valid {codec}: {reason}")]
    Corrupt {
        /// The codec named.
        codec: String,
        /// What the decoder said.
        reason: String,
    },
    /// The body expands beyond what the reader accepts (a compression bomb).
    #[error("the body expands to more than {limit} bytes")]
    TooLarge {
        /// The most bytes accepted.
        limit: usize,
    },
}

/// `body` compressed with zlib at its fastest level, for a `compression` header of
/// [`ZLIB`].
pub fn zlib(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

/// `body` as it was before `codec` (a `compression` header) compressed it, refused when
/// it would expand beyond `limit` bytes.
///
/// # Errors
/// [`CompressionError`] for a codec other than zlib's names, a corrupt body, or one
/// expanding beyond `limit`.
pub fn decompress(body: &[u8], codec: &str, limit: usize) -> Result<Vec<u8>, CompressionError> {
    if !matches!(codec, ZLIB | "gzip" | "zlib") {
        return Err(CompressionError::Unsupported(codec.to_owned()));
    }
    let mut plain = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let read = flate2::read::ZlibDecoder::new(body)
        // One byte more than allowed tells an over-long body from one of exactly `limit`.
        .take(limit as u64 + 1)
        .read_to_end(&mut plain);
    match read {
        Err(error) => Err(CompressionError::Corrupt {
            codec: codec.to_owned(),
            reason: error.to_string(),
        }),
        Ok(_) if plain.len() > limit => Err(CompressionError::TooLarge { limit }),
        Ok(_) => Ok(plain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zlib_body_reads_back_under_each_name_kombu_gives_it() {
        let body = br#"[{"type":"task-started","uuid":"a"},{"type":"task-started","uuid":"b"}]"#
            .repeat(20);
        let compressed = zlib(&body);
        assert!(compressed.len() * 5 < body.len(), "{}", compressed.len());
        // zlib's header byte (deflate, 32 KiB window): what Python's zlib.decompress reads.
        assert_eq!(compressed[0], 0x78);
        for codec in [ZLIB, "gzip", "zlib"] {
            assert_eq!(decompress(&compressed, codec, 1 << 20).unwrap(), body);
        }
    }

    #[test]
    fn other_codecs_corrupt_bodies_and_bombs_are_refused() {
        let body = vec![b'a'; 10_000];
        let compressed = zlib(&body);
        assert_eq!(
            decompress(&compressed, "application/x-bz2", 1 << 20),
            Err(CompressionError::Unsupported("application/x-bz2".into()))
        );
        assert!(matches!(
            decompress(b"not zlib", ZLIB, 1 << 20),
            Err(CompressionError::Corrupt { .. })
        ));
        assert_eq!(
            decompress(&compressed, ZLIB, 9_999),
            Err(CompressionError::TooLarge { limit: 9_999 })
        );
        assert_eq!(decompress(&compressed, ZLIB, 10_000).unwrap(), body);
    }
}
