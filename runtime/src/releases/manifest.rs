//! A release: what a tenant's workers serve, as one signed manifest.
//!
//! A release maps each plugin name to the SHA-256 of its bytes, under a strictly increasing
//! `epoch`, with at most one canary (a plugin's next version served to a share of the
//! workflows). It is signed whole by a key the tenant trusts: the signature covers
//! `wasmq-release/1\n` followed by the manifest's exact JSON bytes, which are kept as
//! signed ([`SignedRelease::manifest`]) so no re-serialisation can change what was signed.
//! Binding each plugin's name and digest to the tenant, the manifest is also the plugins'
//! signature: a worker that verifies it and then each blob's digest needs no `.sig` files.
//!
//! A canary picks its version by a hash of the tenant, the plugin and the task's `root_id`
//! ([`canary_bucket`]), the same on every worker: every step of a chain, every member of a
//! chord and every retry share their root and so run one version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::signing::{RELEASE_DOMAIN, SignatureError, SigningKey, TrustedKeys};

/// The format of a release manifest.
pub const RELEASE_FORMAT: &str = "wasmq-release/1";

/// Buckets a canary's share is counted in: percent × 100.
pub const CANARY_BUCKETS: u32 = 10_000;

/// What a tenant's workers serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Always [`RELEASE_FORMAT`].
    pub format: String,
    /// The tenant (`default` for a worker without `[tenants]`).
    pub tenant: String,
    /// Strictly increasing per tenant: a worker never applies an epoch at or below its own.
    pub epoch: u64,
    /// When it was made (RFC 3339).
    pub created: String,
    /// Plugin name → hex SHA-256 of its bytes.
    pub plugins: BTreeMap<String, String>,
    /// A plugin's next version, served to a share of the workflows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// What made it: `deploy math`, `promote math`, `rollback to 3`.
    pub note: String,
}

/// A plugin's next version served to `percent` of the workflows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// The plugin.
    pub plugin: String,
    /// The hex SHA-256 of the canary's bytes.
    pub sha256: String,
    /// The share of workflows (by `root_id`) it serves, 0–100, in hundredths.
    pub percent: f64,
}

impl Canary {
    /// The buckets (of [`CANARY_BUCKETS`]) the canary takes.
    pub fn buckets(&self) -> u32 {
        // Clamped first, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let buckets = (self.percent.clamp(0.0, 100.0) * 100.0).round() as u32;
        buckets
    }

    /// True when the workflow `root_id` of `tenant` runs the canary.
    pub fn selects(&self, tenant: &str, root_id: &str) -> bool {
        canary_bucket(tenant, &self.plugin, root_id) < self.buckets()
    }
}

/// A workflow's bucket for a plugin's canary, in `0..CANARY_BUCKETS`: the first 8 bytes of
/// SHA-256(tenant, plugin, root id) modulo the buckets — the same on every worker.
pub fn canary_bucket(tenant: &str, plugin: &str, root_id: &str) -> u32 {
    let mut hasher = Sha256::new();
    for part in [tenant, plugin, root_id] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    // The remainder is below CANARY_BUCKETS.
    #[allow(clippy::cast_possible_truncation)]
    let bucket = (u64::from_be_bytes(first) % u64::from(CANARY_BUCKETS)) as u32;
    bucket
}

impl Release {
    /// A release of `tenant` at `epoch`.
    pub fn new(tenant: &str, epoch: u64, plugins: BTreeMap<String, String>, note: &str) -> Self {
        Self {
            format: RELEASE_FORMAT.to_owned(),
            tenant: tenant.to_owned(),
            epoch,
            created: crate::signing::format_instant(&chrono::Utc::now()),
            plugins,
            canary: None,
            note: note.to_owned(),
        }
    }

    /// Every digest the release needs: its plugins' and its canary's.
    pub fn digests(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .plugins
            .iter()
            .map(|(name, digest)| (name.clone(), digest.clone()))
            .collect();
        if let Some(canary) = &self.canary {
            all.push((canary.plugin.clone(), canary.sha256.clone()));
        }
        all
    }
}

/// A release as signed: the manifest's exact bytes, who signed them, and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRelease {
    /// The manifest's JSON, exactly as signed.
    pub manifest: String,
    /// The signing key's id.
    pub key_id: String,
    /// The Ed25519 signature, in hex.
    pub signature: String,
}

fn signed_bytes(manifest: &str) -> Vec<u8> {
    format!("{RELEASE_DOMAIN}\n{manifest}").into_bytes()
}

impl SignedRelease {
    /// Signs `release` with `key`.
    pub fn sign(release: &Release, key: &SigningKey) -> Self {
        let manifest = serde_json::to_string(release).unwrap_or_default();
        Self {
            signature: hex::encode(key.sign(&signed_bytes(&manifest))),
            key_id: key.public().key_id(),
            manifest,
        }
    }

    /// The release, checked: signed by a key `trusted` holds, for `tenant`.
    ///
    /// # Errors
    /// An untrusted key, a signature that does not verify, a manifest that does not parse
    /// or names another tenant.
    pub fn verify(&self, trusted: &TrustedKeys, tenant: &str) -> Result<Release, SignatureError> {
        trusted.verify(
            tenant,
            &self.key_id,
            &signed_bytes(&self.manifest),
            &self.signature,
        )?;
        let release = self.unverified()?;
        if release.tenant != tenant {
            return Err(SignatureError::WrongTenant {
                signed_for: release.tenant,
                tenant: tenant.to_owned(),
            });
        }
        Ok(release)
    }

    /// The release without checking its signature: for listings, never for serving.
    ///
    /// # Errors
    /// A manifest that does not parse.
    pub fn unverified(&self) -> Result<Release, SignatureError> {
        let malformed = |reason: String| SignatureError::Malformed {
            what: "the release manifest".into(),
            reason,
        };
        let release: Release =
            serde_json::from_str(&self.manifest).map_err(|e| malformed(e.to_string()))?;
        if release.format != RELEASE_FORMAT {
            return Err(malformed(format!(
                "format {:?}, expected {RELEASE_FORMAT:?}",
                release.format
            )));
        }
        Ok(release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        let mut plugins = BTreeMap::new();
        plugins.insert("math".to_owned(), "ab".repeat(32));
        Release::new("acme", 3, plugins, "deploy math")
    }

    #[test]
    fn a_signed_release_verifies_only_for_its_tenant_and_untouched() {
        let key = SigningKey::generate().unwrap();
        let trusted = TrustedKeys::new(vec![key.public()]);
        let signed = SignedRelease::sign(&release(), &key);
        assert_eq!(
            signed.verify(&trusted, "acme").unwrap(),
            release_with(&signed)
        );
        assert!(matches!(
            signed.verify(&trusted, "globex"),
            Err(SignatureError::WrongTenant { .. })
        ));
        let mut tampered = signed.clone();
        tampered.manifest = tampered.manifest.replace("\"epoch\":3", "\"epoch\":9");
        assert!(matches!(
            tampered.verify(&trusted, "acme"),
            Err(SignatureError::BadSignature { .. })
        ));
        let stranger = SigningKey::generate().unwrap();
        assert!(matches!(
            SignedRelease::sign(&release(), &stranger).verify(&trusted, "acme"),
            Err(SignatureError::UntrustedKey { .. })
        ));
    }

    fn release_with(signed: &SignedRelease) -> Release {
        signed.unverified().unwrap()
    }

    #[test]
    fn a_canary_takes_its_share_of_root_ids_and_is_stable() {
        let canary = Canary {
            plugin: "math".into(),
            sha256: "cd".repeat(32),
            percent: 10.0,
        };
        let picked = (0..20_000)
            .filter(|i| canary.selects("acme", &format!("root-{i}")))
            .count();
        assert!((1_700..=2_300).contains(&picked), "{picked} of 20000");
        assert_eq!(
            canary.selects("acme", "root-7"),
            canary.selects("acme", "root-7")
        );
        let none = Canary {
            percent: 0.0,
            ..canary.clone()
        };
        assert!(!(0..1000).any(|i| none.selects("acme", &i.to_string())));
        let all = Canary {
            percent: 100.0,
            ..canary
        };
        assert!((0..1000).all(|i| all.selects("acme", &i.to_string())));
    }
}
