//! Client-side encryption of replica objects with age, as Litestream v0.3.10+ stores it
//! (spec §1.4): the object is `age(lz4-frame(payload))`, object names are unchanged. Only X25519
//! keys, which is what Litestream 0.3 parses (`age.ParseX25519Identity` / `ParseX25519Recipient`),
//! so every replica one tool writes the other can read.

use std::io::{self, Write};
use std::str::FromStr;

use age::x25519;
use thiserror::Error;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A streaming object body, as `replica::ObjectReader` (spelled out: `replica` builds on this
/// module, not the other way round).
type ObjectReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

/// The first line of every age file; used to tell encrypted objects from plain LZ4 frames.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{origin}: line {line}: not an age X25519 {what} ({hint})")]
    Parse {
        origin: String,
        line: usize,
        what: &'static str,
        hint: &'static str,
    },
    #[error("{origin}: {source}")]
    Io {
        origin: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "age: recipients are set but no identities: litestreamd reads the newest segment back to resume after a restart, as Litestream 0.3 does, so the replica needs an identity too"
    )]
    RecipientsWithoutIdentities,
}

/// A replica's age keys. `recipients` encrypt what is written; `identities` decrypt what is read.
#[derive(Clone, Default)]
pub struct AgeKeys {
    recipients: Vec<x25519::Recipient>,
    identities: Vec<x25519::Identity>,
}

impl std::fmt::Debug for AgeKeys {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgeKeys")
            .field("recipients", &self.recipients.len())
            .field("identities", &self.identities.len())
            .finish()
    }
}

/// Where a key text came from, for error messages ("config key", a file path, a variable).
pub struct KeySource {
    pub origin: String,
    pub text: String,
}

impl KeySource {
    pub fn inline(origin: impl Into<String>, text: impl Into<String>) -> Self {
        KeySource {
            origin: origin.into(),
            text: text.into(),
        }
    }
    /// An age key file (`age-keygen` output, or a recipients file): one key per line, `#`
    /// comments allowed.
    pub fn file(path: &std::path::Path) -> Result<Self, KeyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            origin: origin.clone(),
            source,
        })?;
        Ok(KeySource { origin, text })
    }
}

fn parse_lines<T: FromStr>(
    sources: &[KeySource],
    what: &'static str,
    hint: &'static str,
) -> Result<Vec<T>, KeyError> {
    let mut out = Vec::new();
    for s in sources {
        for (i, line) in s.text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(line.parse().map_err(|_| KeyError::Parse {
                origin: s.origin.clone(),
                line: i + 1,
                what,
                hint,
            })?);
        }
    }
    Ok(out)
}

impl AgeKeys {
    /// Parses recipients (`age1…`) and identities (`AGE-SECRET-KEY-1…`). None when both are
    /// empty (the replica is not encrypted).
    pub fn parse(
        recipients: &[KeySource],
        identities: &[KeySource],
    ) -> Result<Option<Self>, KeyError> {
        let keys = AgeKeys {
            recipients: parse_lines(recipients, "recipient", "expected age1...")?,
            identities: parse_lines(identities, "identity", "expected AGE-SECRET-KEY-1...")?,
        };
        if !keys.recipients.is_empty() && keys.identities.is_empty() {
            return Err(KeyError::RecipientsWithoutIdentities);
        }
        Ok((!keys.recipients.is_empty() || !keys.identities.is_empty()).then_some(keys))
    }

    /// Whether objects written with these keys are encrypted.
    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Wraps `w` so that what is written to it is encrypted to every recipient. The caller must
    /// call `finish()` on the returned writer; dropping it instead leaves a truncated object that
    /// fails to decrypt (and the upload bridge turns that into an error anyway).
    pub fn encrypt_writer<W: Write>(&self, w: W) -> io::Result<age::stream::StreamWriter<W>> {
        let enc = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(io::Error::other)?;
        enc.wrap_output(w)
    }

    /// Decrypts an object body (whose age header has already been recognised).
    pub async fn decrypt_reader(&self, body: ObjectReader) -> Result<ObjectReader, DecryptError> {
        if self.identities.is_empty() {
            return Err(DecryptError::NoIdentity);
        }
        let dec = age::Decryptor::new_async(body.compat())
            .await
            .map_err(DecryptError::Age)?;
        let reader = dec
            .decrypt_async(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(DecryptError::Age)?;
        Ok(Box::pin(reader.compat()))
    }
}

#[derive(Debug, Error)]
pub enum DecryptError {
    #[error(
        "the object is age-encrypted but no age identity is configured for this replica (age.identities / age.identity_files, or --age-identity-file)"
    )]
    NoIdentity,
    #[error("age: {0}")]
    Age(age::DecryptError),
}

impl DecryptError {
    /// A wrong key says so plainly instead of age's "no matching keys".
    pub fn explain(&self) -> String {
        match self {
            DecryptError::Age(age::DecryptError::NoMatchingKeys) => {
                "age: none of the configured identities can decrypt this object (wrong identity for this replica?)".into()
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;
    use tokio::io::AsyncReadExt;

    fn keypair() -> (String, String) {
        let id = x25519::Identity::generate();
        (
            id.to_public().to_string(),
            id.to_string().expose_secret().to_string(),
        )
    }

    #[tokio::test]
    async fn round_trip_and_wrong_key() {
        let (r, i) = keypair();
        let keys = AgeKeys::parse(&[KeySource::inline("r", &r)], &[KeySource::inline("i", &i)])
            .unwrap()
            .unwrap();
        let mut w = keys.encrypt_writer(Vec::new()).unwrap();
        w.write_all(b"secret payload").unwrap();
        let ct = w.finish().unwrap();
        assert!(ct.starts_with(AGE_MAGIC));
        assert!(!ct.windows(6).any(|w| w == b"secret"));
        let mut out = Vec::new();
        keys.decrypt_reader(Box::pin(std::io::Cursor::new(ct.clone())))
            .await
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"secret payload");

        let (r2, i2) = keypair();
        let other = AgeKeys::parse(&[KeySource::inline("r", r2)], &[KeySource::inline("i", i2)])
            .unwrap()
            .unwrap();
        let err = match other
            .decrypt_reader(Box::pin(std::io::Cursor::new(ct)))
            .await
        {
            Err(e) => e.explain(),
            Ok(_) => panic!("a wrong identity decrypted the object"),
        };
        assert!(err.contains("wrong identity"), "{err}");
    }

    #[test]
    fn bad_keys_name_their_origin_and_line() {
        let err = AgeKeys::parse(
            &[KeySource::inline(
                "/etc/age.pub",
                "# comment\n\nage1nonsense\n",
            )],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/age.pub: line 3"), "{err}");
        let (r, _) = keypair();
        assert!(matches!(
            AgeKeys::parse(&[KeySource::inline("r", r)], &[]),
            Err(KeyError::RecipientsWithoutIdentities)
        ));
        assert!(AgeKeys::parse(&[], &[]).unwrap().is_none());
    }
}
