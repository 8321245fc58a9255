//! The master key and what it does (`domain.md`, Erasure): it wraps and opens the data
//! keys; a data key seals and opens one subject's personal fields and keys the hashes
//! that stand for personal values (the claims' keyed hash).
//!
//! Only RustCrypto's primitives, never a construction of our own: AES-256-GCM (`aes-gcm`)
//! with a random 96-bit nonce per message and the value's place as associated data (a
//! sealed field moved to another subject, event or field does not open), HKDF-SHA-256 to
//! derive one key per purpose from the master key, HMAC-SHA-256 for keyed hashes.
//!
//! Invariants: no key is ever printed (`Debug` shows none); a value that does not open
//! is an error, never a wrong answer.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::StoreError;

/// What a sealed value begins with: the scheme and its version.
pub const SEALED: &str = "enc:v1:";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The master key: 32 bytes, written as 64 hex characters.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

impl MasterKey {
    /// A key from its 64 hex characters (surrounding whitespace ignored, as in a file).
    pub fn from_hex(text: &str) -> Result<Self, StoreError> {
        let bad =
            || StoreError::MasterKey("it must be 32 bytes written as 64 hex characters".into());
        let bytes = hex::decode(text.trim()).map_err(|_| bad())?;
        Ok(MasterKey(bytes.try_into().map_err(|_| bad())?))
    }

    /// A new random key, from the operating system's generator.
    pub fn generate() -> Self {
        MasterKey(Aes256Gcm::generate_key(OsRng).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key of one purpose, derived from this one.
    fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut key = [0; 32];
        // 32 bytes is far below HKDF-SHA-256's limit of 8,160, so this cannot fail.
        let _ = Hkdf::<Sha256>::new(None, &self.0).expand(purpose.as_bytes(), &mut key);
        key
    }
}

/// What the master key does.
#[derive(Clone)]
pub struct Vault {
    wrapping: Aes256Gcm,
    check: Vec<u8>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Vault(…)")
    }
}

impl Vault {
    pub fn new(master: &MasterKey) -> Self {
        let wrapping = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(
            &master.derive("annals data key wrapping v1"),
        ));
        let check = mac(
            &master.derive("annals master key check v1"),
            b"the master key of this Annals database",
        )
        .to_vec();
        Vault { wrapping, check }
    }

    /// What tells this master key from any other (stored at the first start).
    pub fn check_value(&self) -> &[u8] {
        &self.check
    }

    /// A data key wrapped for `subject`: nonce, then the sealed key.
    pub fn wrap(&self, subject: &str, key: &DataKey) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .wrapping
            .encrypt(
                &nonce,
                Payload {
                    msg: &key.bytes,
                    aad: subject.as_bytes(),
                },
            )
            // AES-GCM fails only past 64 GiB in one message.
            .unwrap_or_default();
        [nonce.as_slice(), &sealed].concat()
    }

    /// The data key `wrap` wrapped for `subject`.
    pub fn unwrap(&self, subject: &str, wrapped: &[u8]) -> Result<DataKey, StoreError> {
        let opened = open(&self.wrapping, wrapped, subject.as_bytes()).ok_or_else(|| {
            StoreError::MasterKey(format!(
                "the data key of {subject} does not open with this master key"
            ))
        })?;
        Ok(DataKey::from_bytes(opened.try_into().map_err(|_| {
            StoreError::Corrupt(format!("the data key of {subject} is not 32 bytes"))
        })?))
    }
}

/// One subject's key, with its cipher ready (AES's key schedule is made once per key,
/// not once per value).
#[derive(Clone)]
pub struct DataKey {
    bytes: [u8; 32],
    cipher: Aes256Gcm,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(…)")
    }
}

impl DataKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self::from_bytes(Aes256Gcm::generate_key(OsRng).into())
    }

    fn from_bytes(bytes: [u8; 32]) -> Self {
        DataKey {
            bytes,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)),
        }
    }

    /// `plain` sealed for its `place` (where it is stored: subject, event, field), as
    /// text: `enc:v1:` and the base64 of nonce and ciphertext.
    pub fn seal(&self, place: &str, plain: &[u8]) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: place.as_bytes(),
                },
            )
            .unwrap_or_default();
        format!(
            "{SEALED}{}",
            BASE64.encode([nonce.as_slice(), &sealed].concat())
        )
    }

    /// What `seal` sealed for `place`.
    pub fn open(&self, place: &str, sealed: &str) -> Result<Vec<u8>, StoreError> {
        self.open_in(place, sealed, &mut Vec::new())
            .map(<[u8]>::to_vec)
    }

    /// What `seal` sealed for `place`, opened in `scratch` (cleared first): a reader of
    /// many values reuses one buffer.
    pub fn open_in<'a>(
        &self,
        place: &str,
        sealed: &str,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], StoreError> {
        let corrupt = || StoreError::Corrupt(format!("a sealed value of {place} does not open"));
        scratch.clear();
        let b64 = sealed.strip_prefix(SEALED).ok_or_else(corrupt)?;
        BASE64.decode_vec(b64, scratch).map_err(|_| corrupt())?;
        if scratch.len() < NONCE_LEN + TAG_LEN {
            return Err(corrupt());
        }
        let (nonce, rest) = scratch.split_at_mut(NONCE_LEN);
        let (message, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                place.as_bytes(),
                message,
                Tag::from_slice(tag),
            )
            .map_err(|_| corrupt())?;
        Ok(&scratch[NONCE_LEN..scratch.len() - TAG_LEN])
    }

    /// A keyed hash of `message` (HMAC-SHA-256), in hex.
    pub fn keyed_hash(&self, message: &[u8]) -> String {
        hex::encode(mac(&self.bytes, message))
    }
}

fn open(cipher: &Aes256Gcm, bytes: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = bytes.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .ok()
}

fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let Ok(mut hmac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return [0; 32];
    };
    hmac.update(message);
    hmac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_at_its_place() {
        let key = DataKey::generate();
        let sealed = key.seal("lead-1/LeadCaptured/email", b"\"ada@example.com\"");
        assert!(sealed.starts_with(SEALED));
        assert!(!sealed.contains("ada"));
        assert_eq!(
            key.open("lead-1/LeadCaptured/email", &sealed).unwrap(),
            b"\"ada@example.com\""
        );
        assert!(key.open("lead-2/LeadCaptured/email", &sealed).is_err());
        assert!(
            DataKey::generate()
                .open("lead-1/LeadCaptured/email", &sealed)
                .is_err()
        );
        // Two seals of one value differ (a fresh nonce each).
        assert_ne!(
            sealed,
            key.seal("lead-1/LeadCaptured/email", b"\"ada@example.com\"")
        );
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_master_key_and_subject() {
        let master = MasterKey::generate();
        let vault = Vault::new(&master);
        let key = DataKey::generate();
        let wrapped = vault.wrap("lead-1", &key);
        let opened = vault.unwrap("lead-1", &wrapped).unwrap();
        assert_eq!(opened.bytes, key.bytes);
        assert!(vault.unwrap("lead-2", &wrapped).is_err());
        let other = Vault::new(&MasterKey::generate());
        assert!(other.unwrap("lead-1", &wrapped).is_err());
        assert_ne!(other.check_value(), vault.check_value());
        assert_eq!(Vault::new(&master).check_value(), vault.check_value());
    }

    #[test]
    fn a_master_key_is_64_hex_characters_and_never_printed() {
        let key = MasterKey::generate();
        assert_eq!(
            MasterKey::from_hex(&format!(" {}\n", key.to_hex())).unwrap(),
            key
        );
        assert!(MasterKey::from_hex("abc").is_err());
        assert!(MasterKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(MasterKey::from_hex(&"ab".repeat(33)).is_err());
        assert!(!format!("{key:?}").contains(&key.to_hex()[..8]));
    }
}
