//! The password file: `user:PHC-hash` lines, argon2id with OWASP parameters, managed by
//! `raftmq passwd`.
//!
//! Parsing is strict (fail closed): a line that is not a valid entry stops the start; blank
//! lines and `#` comments are skipped and never become users (CVE-2018-12551).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::security::SecurityError;

/// OWASP minimum for argon2id: 19 MiB of memory, 2 iterations, 1 lane.
fn hasher() -> Result<Argon2<'static>, SecurityError> {
    let params = Params::new(19 * 1024, 2, 1, None).map_err(|e| SecurityError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Users and their password hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, String>,
}

impl PasswordFile {
    /// Parses the file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, SecurityError> {
        let mut users = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: &str| SecurityError::File { file: origin.to_owned(), line: n + 1, reason: why.to_owned() };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or_else(|| bad("expected user:hash"))?;
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err(bad("invalid user name"));
            }
            let parsed = PasswordHash::new(hash).map_err(|_| bad("invalid password hash"))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(bad("unsupported hash algorithm (argon2id expected)"));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(bad("duplicate user"));
            }
        }
        Ok(PasswordFile { users })
    }

    /// Reads and parses a password file.
    pub fn load(path: &Path) -> Result<PasswordFile, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|e| SecurityError::Read { file: path.display().to_string(), source: e })?;
        // Made now rather than on the first unknown user, whose check would take twice as long.
        dummy_hash();
        PasswordFile::parse(&text, &path.display().to_string())
    }

    /// Whether `user` has an entry.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Checks a password. Takes as long for an unknown user as for a known one. Blocking
    /// (argon2 by design takes milliseconds of CPU): call from a blocking thread.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (dummy_hash(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        verify_with_thread_memory(password, &parsed) && known
    }

    /// Adds or replaces a user's hash.
    pub fn set(&mut self, user: &str, hash: String) {
        self.users.insert(user.to_owned(), hash);
    }

    /// Removes a user; returns whether it existed.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True without users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Writes the file atomically, readable by its owner only (0600). The new content goes
    /// to a temporary file with a random name in the same directory, created exclusively
    /// (`O_EXCL`: an existing file or a symlink planted there makes it fail, never
    /// redirects the write), then renamed over the file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (tmp, mut f) = (0..16)
            .find_map(|_| {
                let tmp = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                match options.open(&tmp) {
                    Ok(f) => Some(Ok((tmp, f))),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                    Err(e) => Some(Err(e)),
                }
            })
            .unwrap_or_else(|| Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free temporary file name")))?;
        let written = (|| {
            for (user, hash) in &self.users {
                writeln!(f, "{user}:{hash}")?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// A hash of nothing in particular, made once: unknown users are checked against it so
/// that they take as long as known ones.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(b"raftmq-timing-equaliser").unwrap_or_default())
}

thread_local! {
    /// argon2's working memory (19 MiB with our parameters), kept per verifying thread.
    /// Allocating it per check made the allocator keep tens of freed blocks around (RSS
    /// grew by hundreds of MB under a login flood); reused, memory is exactly this block
    /// per thread of the verification pool.
    static BLOCKS: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Verifies `password` against a PHC argon2 hash with this thread's working memory; the
/// final comparison is constant-time (`password_hash::Output`).
fn verify_with_thread_memory(password: &[u8], hash: &PasswordHash<'_>) -> bool {
    let (Ok(algorithm), Ok(params), Some(expected), Some(salt)) =
        (Algorithm::try_from(hash.algorithm), Params::try_from(hash), hash.hash, hash.salt)
    else {
        return false;
    };
    let version = hash.version.map_or(Ok(Version::V0x13), Version::try_from);
    let Ok(version) = version else { return false };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let mut out = vec![0u8; expected.len()];
    let hasher = Argon2::new(algorithm, version, params.clone());
    let computed = BLOCKS.with(|blocks| {
        let Ok(mut blocks) = blocks.try_borrow_mut() else { return false };
        let need = params.block_count();
        if blocks.len() != need {
            *blocks = vec![argon2::Block::default(); need];
        }
        hasher.hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..]).is_ok()
    });
    computed && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
}

/// Hashes a password with argon2id, OWASP parameters and a random salt (PHC string).
pub fn hash_password(password: &[u8]) -> Result<String, SecurityError> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(hasher()?.hash_password(password, &salt).map_err(|e| SecurityError::Hash(e.to_string()))?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_and_round_trip() {
        let hash = hash_password(b"s3cret").unwrap_or_default();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let mut file = PasswordFile::default();
        file.set("alice", hash);
        let text = file.users.iter().map(|(u, h)| format!("{u}:{h}\n")).collect::<String>();
        let parsed = PasswordFile::parse(&format!("# users\n\n{text}"), "test").ok();
        assert_eq!(parsed.as_ref(), Some(&file));
        assert!(file.verify("alice", b"s3cret"));
        assert!(!file.verify("alice", b"wrong"));
        assert!(!file.verify("bob", b"s3cret"));
    }

    /// Issue 10, item 10: a planted `FILE.tmp` (a symlink, or a world-readable file) neither
    /// redirects the write nor leaves the result readable by others.
    #[cfg(unix)]
    #[test]
    fn save_ignores_planted_temporary_files_and_keeps_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("raftmq-passwd-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).ok();
        let file = dir.join("passwd");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").ok();
        std::os::unix::fs::symlink(&victim, dir.join("passwd.tmp")).ok();
        let mut users = PasswordFile::default();
        users.set("alice", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into());
        assert!(users.save(&file).is_ok());
        assert_eq!(std::fs::read_to_string(&victim).ok().as_deref(), Some("precious"));
        let mode = std::fs::metadata(&file).map(|m| m.permissions().mode() & 0o777).ok();
        assert_eq!(mode, Some(0o600));
        // An existing world-readable file is replaced by a 0600 one.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).ok();
        assert!(users.save(&file).is_ok());
        assert_eq!(std::fs::metadata(&file).map(|m| m.permissions().mode() & 0o777).ok(), Some(0o600));
        let leftovers = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count())
            .unwrap_or(0);
        assert_eq!(leftovers, 1, "only the planted link remains");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn b35_malformed_lines_fail_closed() {
        for bad in ["alice", ":$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA", "alice:plaintext", "al ice:x", "a:$sha512$x"] {
            assert!(PasswordFile::parse(bad, "test").is_err(), "{bad}");
        }
        let dup =
            "a:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\na:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
        assert!(PasswordFile::parse(dup, "test").is_err());
        // Blank lines are not users.
        assert_eq!(PasswordFile::parse("\n\n   \n", "test").map(|f| f.len()).ok(), Some(0));
    }
}
