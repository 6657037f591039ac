//! Ed25519 signatures over plugins and releases: who may ship code to a tenant.
//!
//! A signature signs a *statement*, never the `.wasm` bytes themselves, so a plugin's bytes —
//! its identity everywhere in wasmq and its artifact cache key — never change when it is
//! signed or re-signed. A plugin statement binds the tenant, the plugin's name, the SHA-256
//! of its bytes and an expiry:
//!
//! ```text
//! wasmq-plugin/1\n<tenant>\n<plugin name>\n<sha256 hex>\n<not after, RFC 3339>\n
//! ```
//!
//! so a plugin signed for tenant A does not load for tenant B, one signed as `billing` does
//! not load renamed to `math`, one changed byte breaks the digest, and an old signature
//! runs out. It is kept beside the plugin as `<name>.wasm.sig` ([`PluginSignature`], JSON).
//! A release manifest is signed the same way under its own domain (`wasmq-release/1\n`
//! followed by the manifest's exact bytes), and binds its plugins by name and digest the
//! same way (see `crate::releases`).
//!
//! Keys are Ed25519 (`ring`): a private key file holds the PKCS#8 document in hex, a public
//! key is written `ed25519:<64 hex digits>`, and its key id is the first 8 bytes of the
//! SHA-256 of the raw public key, in hex. Provenance is signed, not capabilities: what a
//! task may reach stays in the operator's configuration (wasmCloud dropped capabilities
//! embedded in signed claims for that reason).
//!
//! Verification checks, in order: the signing key is one the tenant trusts, the signature
//! verifies over the statement as recorded, then the recorded tenant, name and digest are
//! the ones at hand, then the expiry — each failure its own [`SignatureError`] naming what
//! differs, and none of it runs or compiles guest code.
//!
//! Over 400 lines (with its tests) for one idea, who may ship code: keys, statements and
//! the trust policy that checks them stay together.

use std::fmt;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The domain of a plugin statement.
const PLUGIN_DOMAIN: &str = "wasmq-plugin/1";
/// The domain of a release manifest signature.
pub(crate) const RELEASE_DOMAIN: &str = "wasmq-release/1";
/// The format of a `.wasm.sig` file.
pub const SIGNATURE_FORMAT: &str = "wasmq-plugin-signature/1";
/// How a public key is written.
const PUBLIC_PREFIX: &str = "ed25519:";

/// Why a key, a signature or a statement is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The plugin has no signature and its tenant requires one.
    #[error(
        "{plugin} is not signed (no {plugin}.wasm.sig) and tenant {tenant} requires signatures"
    )]
    Unsigned {
        /// The tenant.
        tenant: String,
        /// The plugin's name.
        plugin: String,
    },
    /// The signature file cannot be read or parsed.
    #[error("{what} is not a wasmq signature: {reason}")]
    Malformed {
        /// What was read.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Signed by a key the tenant does not trust.
    #[error("signed by key {key_id}, which tenant {tenant} does not trust")]
    UntrustedKey {
        /// The signer's key id.
        key_id: String,
        /// The tenant.
        tenant: String,
    },
    /// The signature does not verify over the statement it records: the statement was
    /// altered after signing.
    #[error("the signature by key {key_id} does not verify: the signed statement was altered")]
    BadSignature {
        /// The signer's key id.
        key_id: String,
    },
    /// Signed for another tenant.
    #[error("signed for tenant {signed_for}, not for tenant {tenant}")]
    WrongTenant {
        /// The tenant it was signed for.
        signed_for: String,
        /// The tenant loading it.
        tenant: String,
    },
    /// Signed under another plugin name (the file was renamed).
    #[error("signed as plugin {signed_for}, but this file is {plugin}")]
    WrongName {
        /// The name it was signed for.
        signed_for: String,
        /// The name it is loaded under.
        plugin: String,
    },
    /// The bytes are not those that were signed.
    #[error("the bytes of {plugin} changed after signing (signed sha256 {signed}, found {found})")]
    DigestMismatch {
        /// The plugin's name.
        plugin: String,
        /// The digest signed.
        signed: String,
        /// The digest of the bytes at hand.
        found: String,
    },
    /// The signature's validity ended.
    #[error("the signature of {plugin} expired at {not_after}")]
    Expired {
        /// The plugin's name.
        plugin: String,
        /// When it ended (RFC 3339).
        not_after: String,
    },
    /// A key cannot be read, parsed or generated.
    #[error("{0}")]
    Key(String),
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses `ed25519:<64 hex digits>`.
    ///
    /// # Errors
    /// [`SignatureError::Key`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let text = text.trim();
        let hex_part = text.strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            SignatureError::Key(format!(
                "{text:?} is not a public key: expected {PUBLIC_PREFIX}<64 hex digits>"
            ))
        })?;
        let bytes = hex::decode(hex_part)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                SignatureError::Key(format!(
                    "{text:?} is not a public key: expected 64 hex digits after {PUBLIC_PREFIX}"
                ))
            })?;
        Ok(Self(bytes))
    }

    /// Reads a public key from a file of its own (the first line that is not a comment),
    /// or parses `text` itself when it is not a file.
    ///
    /// # Errors
    /// [`SignatureError::Key`] when neither works.
    pub fn from_text_or_file(text: &str) -> Result<Self, SignatureError> {
        if text.trim_start().starts_with(PUBLIC_PREFIX) {
            return Self::parse(text);
        }
        let contents = std::fs::read_to_string(text).map_err(|e| {
            SignatureError::Key(format!(
                "{text:?} is neither a public key ({PUBLIC_PREFIX}…) nor a readable file: {e}"
            ))
        })?;
        Self::parse(first_line(&contents))
    }

    /// The key id: the first 8 bytes of the SHA-256 of the key, in hex.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// An Ed25519 private key, to sign plugins and releases.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public().key_id())
    }
}

impl SigningKey {
    /// A new random key.
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn generate() -> Result<Self, SignatureError> {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| SignatureError::Key("cannot generate a key".into()))?;
        Self::from_pkcs8(document.as_ref())
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, SignatureError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| SignatureError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        Ok(Self {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// Reads a private key file written by [`SigningKey::write`].
    ///
    /// # Errors
    /// [`SignatureError::Key`] naming the file and what is wrong.
    pub fn read(path: &Path) -> Result<Self, SignatureError> {
        let contents = std::fs::read_to_string(path).map_err(|e| {
            SignatureError::Key(format!("cannot read the key {}: {e}", path.display()))
        })?;
        let pkcs8 = hex::decode(first_line(&contents)).map_err(|_| {
            SignatureError::Key(format!(
                "{} is not a wasmq private key (written by `wasmq keys generate`)",
                path.display()
            ))
        })?;
        Self::from_pkcs8(&pkcs8)
            .map_err(|e| SignatureError::Key(format!("{}: {e}", path.display())))
    }

    /// Writes the key to `path`, readable by its owner only, refusing to overwrite a file.
    ///
    /// # Errors
    /// When the file exists or cannot be written.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        writeln!(
            file,
            "# wasmq signing key {} (Ed25519, PKCS#8 in hex). Keep it secret.",
            self.public().key_id()
        )?;
        writeln!(file, "{}", hex::encode(&self.pkcs8))
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Signs `message` (64 bytes).
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// The first line of a key file that is neither empty nor a `#` comment.
fn first_line(contents: &str) -> &str {
    contents
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .unwrap_or("")
}

/// The keys a tenant trusts to sign its plugins and releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    /// Trusts `keys`.
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self { keys }
    }

    /// Parses each entry: a public key (`ed25519:…`) or a file holding one.
    ///
    /// # Errors
    /// The first entry that is neither.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, SignatureError> {
        entries
            .iter()
            .map(|e| PublicKey::from_text_or_file(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted key with this id.
    pub fn find(&self, key_id: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.key_id() == key_id)
    }

    /// Verifies `signature` (hex) by the key `key_id` over `message`, for `tenant`.
    pub(crate) fn verify(
        &self,
        tenant: &str,
        key_id: &str,
        message: &[u8],
        signature_hex: &str,
    ) -> Result<(), SignatureError> {
        let key = self
            .find(key_id)
            .ok_or_else(|| SignatureError::UntrustedKey {
                key_id: key_id.to_owned(),
                tenant: tenant.to_owned(),
            })?;
        let signature = hex::decode(signature_hex).map_err(|_| SignatureError::BadSignature {
            key_id: key_id.to_owned(),
        })?;
        if key.verify(message, &signature) {
            Ok(())
        } else {
            Err(SignatureError::BadSignature {
                key_id: key_id.to_owned(),
            })
        }
    }
}

/// The hex SHA-256 of `bytes` (a plugin's identity, as the engine computes it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A plugin statement's canonical bytes.
fn plugin_statement(tenant: &str, plugin: &str, sha256: &str, not_after: &str) -> Vec<u8> {
    format!("{PLUGIN_DOMAIN}\n{tenant}\n{plugin}\n{sha256}\n{not_after}\n").into_bytes()
}

/// Formats an instant as a statement writes it (RFC 3339, whole seconds, `Z`).
pub(crate) fn format_instant(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A plugin's detached signature, kept beside it as `<name>.wasm.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSignature {
    /// Always [`SIGNATURE_FORMAT`].
    pub format: String,
    /// The tenant it is signed for.
    pub tenant: String,
    /// The plugin's name (the file stem).
    pub plugin: String,
    /// The hex SHA-256 of the plugin's bytes.
    pub sha256: String,
    /// When the signature ends (RFC 3339).
    pub not_after: String,
    /// The signing key's id.
    pub key_id: String,
    /// The Ed25519 signature of the statement, in hex.
    pub signature: String,
}

impl PluginSignature {
    /// Signs `bytes` as plugin `plugin` of `tenant`, valid until `not_after`.
    ///
    /// # Errors
    /// When the tenant or name cannot be part of a statement (empty, or with a line break).
    pub fn sign(
        key: &SigningKey,
        tenant: &str,
        plugin: &str,
        bytes: &[u8],
        not_after: DateTime<Utc>,
    ) -> Result<Self, SignatureError> {
        for (what, value) in [("tenant", tenant), ("plugin name", plugin)] {
            if value.is_empty() || value.contains(['\n', '\r']) {
                return Err(SignatureError::Key(format!(
                    "the {what} {value:?} cannot be signed: empty or several lines"
                )));
            }
        }
        let sha256 = sha256_hex(bytes);
        let not_after = format_instant(&not_after);
        let statement = plugin_statement(tenant, plugin, &sha256, &not_after);
        Ok(Self {
            format: SIGNATURE_FORMAT.to_owned(),
            tenant: tenant.to_owned(),
            plugin: plugin.to_owned(),
            sha256,
            not_after,
            key_id: key.public().key_id(),
            signature: hex::encode(key.sign(&statement)),
        })
    }

    /// Parses a `.wasm.sig` file's contents; `what` names it in errors.
    ///
    /// # Errors
    /// [`SignatureError::Malformed`].
    pub fn parse(what: &str, text: &str) -> Result<Self, SignatureError> {
        let malformed = |reason: String| SignatureError::Malformed {
            what: what.to_owned(),
            reason,
        };
        let signature: Self = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        if signature.format != SIGNATURE_FORMAT {
            return Err(malformed(format!(
                "format {:?}, expected {SIGNATURE_FORMAT:?}",
                signature.format
            )));
        }
        Ok(signature)
    }

    /// The signature as a `.wasm.sig` file holds it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Checks that this signature, by a key `trusted` holds, covers exactly these `bytes`
    /// as plugin `plugin` of `tenant`, and has not expired at `now`.
    ///
    /// # Errors
    /// The first check that fails, as a [`SignatureError`].
    pub fn verify(
        &self,
        trusted: &TrustedKeys,
        tenant: &str,
        plugin: &str,
        bytes: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        let statement = plugin_statement(&self.tenant, &self.plugin, &self.sha256, &self.not_after);
        trusted.verify(tenant, &self.key_id, &statement, &self.signature)?;
        if self.tenant != tenant {
            return Err(SignatureError::WrongTenant {
                signed_for: self.tenant.clone(),
                tenant: tenant.to_owned(),
            });
        }
        if self.plugin != plugin {
            return Err(SignatureError::WrongName {
                signed_for: self.plugin.clone(),
                plugin: plugin.to_owned(),
            });
        }
        let found = sha256_hex(bytes);
        if self.sha256 != found {
            return Err(SignatureError::DigestMismatch {
                plugin: plugin.to_owned(),
                signed: self.sha256.clone(),
                found,
            });
        }
        let expired = DateTime::parse_from_rfc3339(&self.not_after)
            .map_or(true, |end| end.with_timezone(&Utc) <= now);
        if expired {
            return Err(SignatureError::Expired {
                plugin: plugin.to_owned(),
                not_after: self.not_after.clone(),
            });
        }
        Ok(())
    }
}

/// What a tenant requires of the plugins it loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// The tenant's name, as statements name it (`default` for the implicit tenant).
    pub tenant: String,
    /// The keys it trusts.
    pub keys: TrustedKeys,
    /// Refuse plugins without a signature.
    pub require_signatures: bool,
}

/// The name statements give the implicit tenant of a worker without `[tenants]`.
pub const IMPLICIT_TENANT: &str = "default";

impl TrustPolicy {
    /// The policy a configuration describes for `tenant`: its `trusted_keys` entries (keys
    /// or files of keys), whether it requires signatures, and whether it follows a plugin
    /// store (whose releases are always verified, so it needs a key).
    ///
    /// # Errors
    /// A key that does not parse, or signatures required (or a store followed) with no key
    /// to check them with.
    pub fn from_config(
        tenant: &str,
        trusted_keys: &[String],
        require_signatures: bool,
        follows_store: bool,
    ) -> Result<Self, SignatureError> {
        let keys = TrustedKeys::parse(trusted_keys)?;
        if keys.is_empty() && require_signatures {
            return Err(SignatureError::Key(
                "require_signatures needs at least one trusted key (trusted_keys)".into(),
            ));
        }
        if keys.is_empty() && follows_store {
            return Err(SignatureError::Key(
                "following a plugin store needs at least one trusted key (trusted_keys): \
                 every release is verified before anything of it loads"
                    .into(),
            ));
        }
        Ok(Self {
            tenant: tenant.to_owned(),
            keys,
            require_signatures,
        })
    }

    /// True when this policy checks anything (a file without a policy loads as it is).
    pub fn is_active(&self) -> bool {
        !self.keys.is_empty() || self.require_signatures
    }

    /// Checks a plugin's bytes against its signature file's contents, if any, before
    /// anything compiles them. A signature that is present is always checked, even when
    /// signatures are not required: a broken one means someone tampered with something.
    ///
    /// # Errors
    /// Why the plugin is refused.
    pub fn check(
        &self,
        plugin: &str,
        bytes: &[u8],
        signature: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        match signature {
            None if self.require_signatures => Err(SignatureError::Unsigned {
                tenant: self.tenant.clone(),
                plugin: plugin.to_owned(),
            }),
            None => Ok(()),
            Some(text) => PluginSignature::parse(&format!("{plugin}.wasm.sig"), text)?.verify(
                &self.keys,
                &self.tenant,
                plugin,
                bytes,
                now,
            ),
        }
    }
}

/// The path of `plugin`'s signature file: `<plugin>.sig` (`math.wasm` → `math.wasm.sig`).
pub fn signature_path(plugin: &Path) -> std::path::PathBuf {
    let mut name = plugin.as_os_str().to_owned();
    name.push(".sig");
    std::path::PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> DateTime<Utc> {
        Utc::now() + chrono::Duration::days(30)
    }

    fn policy(tenant: &str, keys: &[&SigningKey]) -> TrustPolicy {
        TrustPolicy {
            tenant: tenant.into(),
            keys: TrustedKeys::new(keys.iter().map(|k| k.public()).collect()),
            require_signatures: true,
        }
    }

    #[test]
    fn a_signed_plugin_verifies_and_every_tampering_is_named() {
        let acme = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let bytes = b"\0asm plugin bytes".to_vec();
        let sig = PluginSignature::sign(&acme, "acme", "math", &bytes, later()).unwrap();
        let text = sig.to_json();
        let trust = policy("acme", &[&acme]);
        let now = Utc::now();
        assert_eq!(trust.check("math", &bytes, Some(&text), now), Ok(()));

        assert!(matches!(
            trust.check("math", &bytes, None, now),
            Err(SignatureError::Unsigned { .. })
        ));
        let mut changed = bytes.clone();
        changed[7] ^= 1;
        assert!(matches!(
            trust.check("math", &changed, Some(&text), now),
            Err(SignatureError::DigestMismatch { .. })
        ));
        assert!(matches!(
            trust.check("billing", &bytes, Some(&text), now),
            Err(SignatureError::WrongName { .. })
        ));
        let by_other = PluginSignature::sign(&other, "acme", "math", &bytes, later()).unwrap();
        assert!(matches!(
            trust.check("math", &bytes, Some(&by_other.to_json()), now),
            Err(SignatureError::UntrustedKey { .. })
        ));
        // The statement edited to claim another name: the signature no longer verifies.
        let mut edited = sig.clone();
        edited.plugin = "billing".into();
        assert!(matches!(
            trust.check("billing", &bytes, Some(&edited.to_json()), now),
            Err(SignatureError::BadSignature { .. })
        ));
        // A key both tenants trust still cannot move a plugin from one to the other.
        let shared = policy("globex", &[&acme]);
        assert!(matches!(
            shared.check("math", &bytes, Some(&text), now),
            Err(SignatureError::WrongTenant { .. })
        ));
        let expired = PluginSignature::sign(
            &acme,
            "acme",
            "math",
            &bytes,
            Utc::now() - chrono::Duration::seconds(1),
        )
        .unwrap();
        assert!(matches!(
            trust.check("math", &bytes, Some(&expired.to_json()), now),
            Err(SignatureError::Expired { .. })
        ));
        assert!(matches!(
            trust.check("math", &bytes, Some("{not json"), now),
            Err(SignatureError::Malformed { .. })
        ));
    }

    #[test]
    fn unsigned_plugins_load_unless_required_but_a_bad_signature_never_does() {
        let key = SigningKey::generate().unwrap();
        let mut trust = policy("default", &[&key]);
        trust.require_signatures = false;
        assert_eq!(trust.check("math", b"x", None, Utc::now()), Ok(()));
        let sig = PluginSignature::sign(&key, "default", "math", b"x", later()).unwrap();
        assert!(
            trust
                .check("math", b"y", Some(&sig.to_json()), Utc::now())
                .is_err()
        );
    }

    #[test]
    fn keys_round_trip_through_their_files_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let path = dir.path().join("acme.key");
        key.write(&path).unwrap();
        assert!(key.write(&path).is_err(), "never overwrites a key");
        let read = SigningKey::read(&path).unwrap();
        assert_eq!(read.public(), key.public());
        let text = key.public().to_string();
        assert_eq!(PublicKey::parse(&text).unwrap(), key.public());
        std::fs::write(dir.path().join("acme.pub"), format!("# comment\n{text}\n")).unwrap();
        let from_file =
            PublicKey::from_text_or_file(dir.path().join("acme.pub").to_str().unwrap()).unwrap();
        assert_eq!(from_file, key.public());
        assert_eq!(key.public().key_id().len(), 16);
        assert!(PublicKey::parse("ed25519:abcd").is_err());
        assert!(SigningKey::read(&dir.path().join("acme.pub")).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
