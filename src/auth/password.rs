//! The broker's password file, in mosquitto 2.0's `mosquitto_passwd` format so that users bring their
//! files unchanged: one `USERNAME:HASH` per line, blank lines and `#` comments ignored.
//!
//! Hashes we read:
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 (mosquitto 2.0), standard padded base64.
//! - `$6$SALT$HASH`: SHA-512(password || salt) (mosquitto 1.x), standard padded base64.
//!
//! Plaintext passwords are refused: mosquitto would hash them in place with `mosquitto_passwd -U`, but a
//! broker that silently accepts a plaintext file invites people to keep one.
//!
//! Pure code: the caller reads the file; nothing here does I/O (except `getrandom` for a fresh salt).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha512};
use subtle::{Choice, ConstantTimeEq};

/// Iterations that [`hash_password`] uses when the operator does not choose.
///
/// PBKDF2 is deliberately slow so that a stolen password file resists offline guessing; 10,000 rounds of
/// HMAC-SHA512 cost about 5 ms of one core, which still lets a core verify a storm of reconnecting clients
/// (and the broker caches verified credentials, see [`VerifyCache`], so the cost is paid once per client).
/// mosquitto_passwd itself defaults to only 101 iterations; files made with it are read unchanged.
pub const DEFAULT_ITERATIONS: u32 = 10_000;

/// Upper bound on the iteration count read from a file: beyond it a single CONNECT would pin a core for
/// seconds, which is far more likely a typo than a choice.
const MAX_ITERATIONS: u32 = 10_000_000;

/// Length in bytes of the derived key / digest in both formats (SHA-512 output).
const HASH_LEN: usize = 64;

/// Salt length that mosquitto_passwd (and [`hash_password`]) writes.
const SALT_LEN: usize = 12;

/// Largest salt we accept when reading; mosquitto only writes 12 bytes, but other tools may write more.
const MAX_SALT_LEN: usize = 64;

/// Base64 length of `MAX_SALT_LEN` bytes: lets us refuse an absurd salt before decoding (allocating) it.
const MAX_SALT_B64_LEN: usize = MAX_SALT_LEN.div_ceil(3) * 4;

/// An MQTT username is a length-prefixed UTF-8 string, so a longer one could never match a client.
const MAX_USERNAME_LEN: usize = 65_535;

/// Fixed salt of the dummy credential that unknown users are checked against (its value is irrelevant;
/// only the cost of the derivation matters).
const DUMMY_SALT: [u8; SALT_LEN] = *b"coremq-dummy";

/// One user's stored credential.
#[derive(Clone)]
enum Credential {
    /// mosquitto 2.0 `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 { iterations: u32, salt: Vec<u8>, hash: [u8; HASH_LEN] },
    /// mosquitto 1.x `$6$`: a single salted SHA-512.
    Sha512 { salt: Vec<u8>, hash: [u8; HASH_LEN] },
}

// Hand-written so that a `{:?}` of a PasswordFile in a log never prints hashes or salts.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Pbkdf2 { iterations, .. } => write!(f, "Pbkdf2Sha512 {{ iterations: {iterations} }}"),
            Credential::Sha512 { .. } => f.write_str("Sha512Salted"),
        }
    }
}

impl Credential {
    /// Derives the candidate hash of `password` with this credential's parameters.
    fn derive(&self, password: &[u8]) -> [u8; HASH_LEN] {
        let mut out = [0u8; HASH_LEN];
        match self {
            Credential::Pbkdf2 { iterations, salt, .. } => {
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
            }
            Credential::Sha512 { salt, .. } => {
                out = Sha512::new().chain_update(password).chain_update(salt).finalize().into();
            }
        }
        out
    }

    /// Whether `password` matches, compared in constant time so the comparison leaks nothing about how
    /// many leading bytes of the hash were right.
    fn matches(&self, password: &[u8]) -> Choice {
        let stored = match self {
            Credential::Pbkdf2 { hash, .. } | Credential::Sha512 { hash, .. } => hash,
        };
        self.derive(password).ct_eq(stored)
    }

    /// A credential nobody can match, costing what a real one with `iterations` (None: `$6$`) costs.
    fn dummy(iterations: Option<u32>) -> Credential {
        match iterations {
            Some(iterations) => {
                Credential::Pbkdf2 { iterations, salt: DUMMY_SALT.to_vec(), hash: [0; HASH_LEN] }
            }
            None => Credential::Sha512 { salt: DUMMY_SALT.to_vec(), hash: [0; HASH_LEN] },
        }
    }
}

/// A parsed password file: username -> credential.
#[derive(Clone, Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, Credential>,
    /// What unknown users are checked against, shaped like the file's most common credential so that
    /// a failed lookup costs what a wrong password for a real user costs. `None` (empty or default
    /// file): PBKDF2 with [`DEFAULT_ITERATIONS`].
    dummy: Option<Credential>,
}

impl PasswordFile {
    /// Parses the text of a password file. Any malformed line is an error naming it (`"line N: ..."`);
    /// a half-read password file must never be put in service.
    pub fn parse(text: &str) -> Result<PasswordFile, String> {
        let mut users: HashMap<String, Credential> = HashMap::new();
        for (idx, line) in text.split('\n').enumerate() {
            // idx counts lines of an in-memory string, so it is far below usize::MAX.
            let n = idx.saturating_add(1);
            let Some((name, hash)) = split_line(line) else { continue };
            let Some(hash) = hash else {
                return Err(format!("line {n}: expected USERNAME:HASH, found no ':'"));
            };
            if !valid_username(name) {
                return Err(format!("line {n}: invalid username {name:?} ({USERNAME_RULE})"));
            }
            let cred = parse_hash(hash).map_err(|e| format!("line {n}: user {name:?}: {e}"))?;
            match users.entry(name.to_owned()) {
                Entry::Occupied(_) => return Err(format!("line {n}: duplicate user {name:?}")),
                Entry::Vacant(slot) => {
                    slot.insert(cred);
                }
            }
        }
        let dummy = most_common_cost(&users).map(Credential::dummy);
        Ok(PasswordFile { users, dummy })
    }

    /// Number of users in the file.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users (every CONNECT with a username then fails).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` has a line in the file.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Slow path: derives and compares in constant time (subtle::ConstantTimeEq). For an unknown user it
    /// still derives once against a fixed dummy credential so that timing does not reveal which users exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(cred) => cred.matches(password).into(),
            None => {
                let matched = match &self.dummy {
                    Some(dummy) => dummy.matches(password),
                    None => Credential::dummy(Some(DEFAULT_ITERATIONS)).matches(password),
                };
                // black_box: the result is thrown away, and the optimiser must not drop the derivation
                // whose whole point is to take the same time as a real one.
                std::hint::black_box(matched);
                false
            }
        }
    }
}

/// A fresh "$7$ITER$SALT$HASH" string with a 12-byte random salt from getrandom.
///
/// `iterations` is clamped to the range that [`PasswordFile::parse`] accepts (1..=10,000,000), so the
/// output always reads back. Panics if the operating system's random number generator fails: this is
/// only called by the `coremq passwd` tool, where writing a predictable salt would be worse than stopping.
pub fn hash_password(password: &[u8], iterations: u32) -> String {
    let iterations = clamp_iterations(iterations);
    let mut salt = [0u8; SALT_LEN];
    if let Err(e) = getrandom::getrandom(&mut salt) {
        panic!("hash_password: the OS random number generator failed ({e}); refusing to use a weak salt");
    }
    let mut hash = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut hash);
    format!("$7${iterations}${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
}

/// The iteration counts that `parse` accepts: 1..=MAX_ITERATIONS.
fn clamp_iterations(iterations: u32) -> u32 {
    iterations.clamp(1, MAX_ITERATIONS)
}

/// Editing for `coremq passwd`: returns the new file text. Replaces USER's line in place if present,
/// else appends; other lines (comments, blanks, other users) are kept byte for byte; the result ends with '\n'.
///
/// `hash` must be a hash this module reads (e.g. from [`hash_password`]); checking it here keeps a stray
/// newline or plaintext from ever being written into the file. If USER appears on several lines (an
/// invalid file), the first is replaced and the others are dropped, which makes the file valid again.
/// A replaced line keeps its `\r` if the file uses CRLF line ends. Err if user invalid (empty, ':' or
/// control char, see [`valid_username`]).
pub fn set_user(text: &str, user: &str, hash: &str) -> Result<String, String> {
    if !valid_username(user) {
        return Err(format!("invalid username {user:?} ({USERNAME_RULE})"));
    }
    parse_hash(hash).map_err(|e| format!("invalid hash for user {user:?}: {e}"))?;
    let mut out = String::with_capacity(text.len().saturating_add(user.len()).saturating_add(hash.len()));
    let mut replaced = false;
    for line in text.split_terminator('\n') {
        if line_user(line) == Some(user) {
            if !replaced {
                push_entry(&mut out, user, hash);
                if line.ends_with('\r') {
                    // push_entry ended the line with '\n'; put the CR back in front of it.
                    out.pop();
                    out.push_str("\r\n");
                }
                replaced = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !replaced {
        push_entry(&mut out, user, hash);
    }
    Ok(out)
}

/// Editing for `coremq passwd -D`: returns the new file text without USER's line(s); every other line is
/// kept byte for byte. The result is empty or ends with '\n'. Err("user USER is not in the file") if absent.
pub fn delete_user(text: &str, user: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for line in text.split_terminator('\n') {
        if line_user(line) == Some(user) {
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if found {
        Ok(out)
    } else {
        Err(format!("user {user} is not in the file"))
    }
}

/// Human-readable form of the [`valid_username`] rule, for error messages.
const USERNAME_RULE: &str =
    "must be 1..=65535 bytes without ':' or control characters, not start with '#' or start/end with a space";

/// Validates a username for the file (same rule as parse).
///
/// Besides non-empty, no ':' and no control characters, the name must fit in an MQTT string (65,535
/// bytes), must not start with '#' (the line would read as a comment) and must not start or end with a
/// space (mosquitto trims blanks around the name, so such a name could never match what it wrote).
pub fn valid_username(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= MAX_USERNAME_LEN
        && !user.starts_with('#')
        && !user.starts_with(' ')
        && !user.ends_with(' ')
        && !user.chars().any(|c| c == ':' || c.is_control())
}

/// Per-core cache of credentials that verified, so that a reconnecting client costs one SHA-512, not
/// ITERATIONS of PBKDF2. Keyed by username; stores SHA-512(process-random 32-byte key || password);
/// bounded (clears itself when it reaches `capacity` entries). A wrong password is never cached.
///
/// The cache is consulted *before* the file, so it must be [`clear`](VerifyCache::clear)ed whenever the
/// password file is reloaded; otherwise a removed user or changed password keeps working. The random key
/// (drawn per cache from getrandom) means a memory dump does not hold plain SHA-512s of passwords, which
/// would be cheap to brute-force; if the OS cannot provide randomness the cache simply never caches.
pub struct VerifyCache {
    /// None when getrandom failed: then nothing is cached and every verify takes the slow path.
    key: Option<[u8; 32]>,
    capacity: usize,
    entries: HashMap<String, [u8; HASH_LEN]>,
}

// Hand-written so that the key and the digests never reach a log.
impl fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyCache")
            .field("enabled", &self.key.is_some())
            .field("capacity", &self.capacity)
            .field("len", &self.entries.len())
            .finish()
    }
}

impl VerifyCache {
    /// A cache holding at most `capacity` users (0 disables caching).
    pub fn new(capacity: usize) -> VerifyCache {
        let mut key = [0u8; 32];
        let key = getrandom::getrandom(&mut key).ok().map(|()| key);
        VerifyCache { key, capacity, entries: HashMap::new() }
    }

    /// Checks against the cache first, then `file.verify`; caches a success.
    ///
    /// A cached user whose password does not match the cached one falls through to the slow path, so a
    /// wrong password costs the same whether or not the user is cached.
    pub fn verify(&mut self, file: &PasswordFile, user: &str, password: &[u8]) -> bool {
        let digest = self.key.map(|key| keyed_digest(&key, password));
        if let (Some(digest), Some(cached)) = (&digest, self.entries.get(user)) {
            if bool::from(digest.ct_eq(cached)) {
                return true;
            }
        }
        if !file.verify(user, password) {
            return false;
        }
        if let Some(digest) = digest {
            if self.capacity > 0 {
                if self.entries.len() >= self.capacity && !self.entries.contains_key(user) {
                    // Wholesale clearing is crude but bounded and O(1) amortised; the cost is one PBKDF2
                    // per client that reconnects afterwards.
                    self.entries.clear();
                }
                self.entries.insert(user.to_owned(), digest);
            }
        }
        true
    }

    /// Forgets every cached credential; must be called when the password file is reloaded.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// SHA-512(key || password): what the cache stores instead of the password.
fn keyed_digest(key: &[u8; 32], password: &[u8]) -> [u8; HASH_LEN] {
    Sha512::new().chain_update(key).chain_update(password).finalize().into()
}

/// What mosquitto's `isspace` trims around the username and the hash.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn trim_blank(s: &str) -> &str {
    s.trim_matches(is_blank)
}

/// Splits one line into (username, hash), both trimmed of blanks as mosquitto does. None for a blank or
/// comment line (first non-blank character '#'); Some((line, None)) when there is no ':'.
fn split_line(line: &str) -> Option<(&str, Option<&str>)> {
    let trimmed = trim_blank(line);
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    match trimmed.split_once(':') {
        Some((name, hash)) => Some((trim_blank(name), Some(trim_blank(hash)))),
        None => Some((trimmed, None)),
    }
}

/// The username a line defines, read exactly as `parse` reads it, for the editing functions.
fn line_user(line: &str) -> Option<&str> {
    match split_line(line) {
        Some((name, Some(_))) => Some(name),
        _ => None,
    }
}

fn push_entry(out: &mut String, user: &str, hash: &str) {
    out.push_str(user);
    out.push(':');
    out.push_str(hash);
    out.push('\n');
}

/// The most common (scheme, iterations) in the file, None for `$6$`; ties go to the costlier one so
/// the choice is deterministic. Outer None when the file is empty.
fn most_common_cost(users: &HashMap<String, Credential>) -> Option<Option<u32>> {
    let mut counts: HashMap<Option<u32>, usize> = HashMap::new();
    for cred in users.values() {
        let cost = match cred {
            Credential::Pbkdf2 { iterations, .. } => Some(*iterations),
            Credential::Sha512 { .. } => None,
        };
        let count = counts.entry(cost).or_insert(0);
        *count = count.saturating_add(1);
    }
    counts.into_iter().max_by_key(|&(cost, count)| (count, cost)).map(|(cost, _)| cost)
}

/// Parses one HASH field. Errors do not echo the field: it may be someone's (wrongly pasted) password.
fn parse_hash(hash: &str) -> Result<Credential, String> {
    if let Some(rest) = hash.strip_prefix("$7$") {
        let mut parts = rest.split('$');
        let (Some(iterations), Some(salt), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("a \"$7$\" hash must be $7$ITERATIONS$SALT$HASH".to_owned());
        };
        let iterations = parse_iterations(iterations)?;
        let salt = decode_salt(salt)?;
        let hash = decode_hash(digest)?;
        Ok(Credential::Pbkdf2 { iterations, salt, hash })
    } else if let Some(rest) = hash.strip_prefix("$6$") {
        let mut parts = rest.split('$');
        let (Some(salt), Some(digest), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("a \"$6$\" hash must be $6$SALT$HASH".to_owned());
        };
        let salt = decode_salt(salt)?;
        let hash = decode_hash(digest)?;
        Ok(Credential::Sha512 { salt, hash })
    } else if hash.is_empty() {
        Err("empty hash".to_owned())
    } else {
        Err("unsupported hash: expected \"$7$...\" (PBKDF2-SHA512) or \"$6$...\" (SHA-512); plaintext \
             passwords are refused, hash them with `coremq passwd` or `mosquitto_passwd`"
            .to_owned())
    }
}

fn parse_iterations(s: &str) -> Result<u32, String> {
    // Digits only: u32::from_str would also take a leading '+', which no tool writes.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("iteration count {s:?} is not a number"));
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_ITERATIONS).contains(&n) => Ok(n),
        _ => Err(format!("iteration count {s} is outside 1..={MAX_ITERATIONS}")),
    }
}

fn decode_salt(s: &str) -> Result<Vec<u8>, String> {
    if s.len() > MAX_SALT_B64_LEN {
        return Err(format!("salt longer than {MAX_SALT_LEN} bytes"));
    }
    let salt = STANDARD.decode(s).map_err(|e| format!("salt is not valid base64 ({e})"))?;
    if salt.is_empty() || salt.len() > MAX_SALT_LEN {
        return Err(format!("salt is {} bytes, expected 1..={MAX_SALT_LEN}", salt.len()));
    }
    Ok(salt)
}

fn decode_hash(s: &str) -> Result<[u8; HASH_LEN], String> {
    // A 64-byte hash is 88 base64 characters; refuse anything far longer before allocating for it.
    if s.len() > 2 * HASH_LEN {
        return Err(format!("hash longer than {HASH_LEN} bytes"));
    }
    let bytes = STANDARD.decode(s).map_err(|e| format!("hash is not valid base64 ({e})"))?;
    <[u8; HASH_LEN]>::try_from(bytes.as_slice())
        .map_err(|_| format!("hash is {} bytes, expected {HASH_LEN}", bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    const ALICE: &str = "alice:$7$101$A5vu6A0og8Iqy6wg$8pJiFU/ApcLDMvsqFr2474xcZfAL/s/9PK7lQCug7qMvnXwmE70ysROzfhGiDNonO8IsWaKYfzosS40CpSDDUQ==";
    const ALICE_HASH: &str = "$7$101$A5vu6A0og8Iqy6wg$8pJiFU/ApcLDMvsqFr2474xcZfAL/s/9PK7lQCug7qMvnXwmE70ysROzfhGiDNonO8IsWaKYfzosS40CpSDDUQ==";
    const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";

    /// A fresh temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("coremq-pw-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mosquitto_passwd(args: &[&str], file: &Path) {
        let mut cmd = Command::new(MOSQUITTO_PASSWD);
        let (flags, rest) = args.split_at(args.len() - 2);
        cmd.args(flags).arg(file).args(rest);
        let status = cmd.status().unwrap();
        assert!(status.success(), "mosquitto_passwd {args:?} failed: {status}");
    }

    fn sha512_line(user: &str, password: &[u8], salt: &[u8]) -> String {
        let digest = Sha512::new().chain_update(password).chain_update(salt).finalize();
        format!("{user}:$6${}${}", STANDARD.encode(salt), STANDARD.encode(digest))
    }

    #[test]
    fn mosquitto_example_line_verifies() {
        let file = PasswordFile::parse(ALICE).unwrap();
        assert_eq!(file.len(), 1);
        assert!(!file.is_empty());
        assert!(file.contains("alice"));
        assert!(!file.contains("Alice"));
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"Secret"));
        assert!(!file.verify("alice", b""));
        assert!(!file.verify("alice", b"secret "));
        assert!(!file.verify("bob", b"secret"));
        assert!(!file.verify("", b"secret"));
    }

    #[test]
    fn blanks_comments_crlf_and_mosquitto_trimming() {
        let text = format!("# users\n\n   \n  # indented comment\r\n  {ALICE}  \r\n\n");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.verify("alice", b"secret"));
        // mosquitto trims blanks around the username and the hash too.
        let spaced = ALICE.replacen(':', " :\t", 1);
        assert!(PasswordFile::parse(&spaced).unwrap().verify("alice", b"secret"));
        assert!(PasswordFile::parse("").unwrap().is_empty());
        assert!(PasswordFile::default().is_empty());
        assert!(!PasswordFile::default().verify("alice", b"secret"));
    }

    #[test]
    fn real_mosquitto_passwd_file() {
        if !Path::new(MOSQUITTO_PASSWD).exists() {
            eprintln!("skipping: {MOSQUITTO_PASSWD} is not installed");
            return;
        }
        let dir = TempDir::new("real");
        let pw = dir.path("pw");
        mosquitto_passwd(&["-c", "-b", "bob", "pw1"], &pw);
        mosquitto_passwd(&["-b", "carol", "pw2"], &pw);
        // mosquitto 1.x format, still written by 2.0 on request.
        mosquitto_passwd(&["-H", "sha512", "-b", "dave", "pw3"], &pw);
        let text = std::fs::read_to_string(&pw).unwrap();
        assert!(text.contains("bob:$7$") && text.contains("dave:$6$"), "{text}");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 3);
        assert!(file.verify("bob", b"pw1"));
        assert!(file.verify("carol", b"pw2"));
        assert!(file.verify("dave", b"pw3"));
        assert!(!file.verify("bob", b"pw2"));
        assert!(!file.verify("carol", b"pw1"));
        assert!(!file.verify("dave", b"pw1"));
        assert!(!file.verify("bob", b""));
        assert!(!file.verify("eve", b"pw1"));

        // Our editing keeps mosquitto's lines intact, and mosquitto_passwd accepts our result.
        let edited = set_user(&text, "carol", &hash_password(b"new", 101)).unwrap();
        let edited = delete_user(&edited, "dave").unwrap();
        std::fs::write(&pw, &edited).unwrap();
        mosquitto_passwd(&["-b", "erin", "pw5"], &pw);
        let file = PasswordFile::parse(&std::fs::read_to_string(&pw).unwrap()).unwrap();
        assert_eq!(file.len(), 3);
        assert!(file.verify("bob", b"pw1"));
        assert!(file.verify("carol", b"new"));
        assert!(!file.verify("carol", b"pw2"));
        assert!(!file.contains("dave"));
        assert!(file.verify("erin", b"pw5"));
    }

    #[test]
    fn hash_password_round_trips() {
        let hash = hash_password(b"hunter2", 1_000);
        let parts: Vec<&str> = hash.split('$').collect();
        assert_eq!(parts.len(), 5, "{hash}");
        assert_eq!((parts[0], parts[1], parts[2]), ("", "7", "1000"));
        assert_eq!(STANDARD.decode(parts[3]).unwrap().len(), 12);
        assert_eq!(STANDARD.decode(parts[4]).unwrap().len(), 64);
        let file = PasswordFile::parse(&format!("u:{hash}\n")).unwrap();
        assert!(file.verify("u", b"hunter2"));
        assert!(!file.verify("u", b"hunter3"));
        // Fresh salt each time.
        assert_ne!(hash, hash_password(b"hunter2", 1_000));
        // Out-of-range iteration counts are clamped so the result always reads back.
        let zero = hash_password(b"x", 0);
        assert!(zero.starts_with("$7$1$"), "{zero}");
        assert!(PasswordFile::parse(&format!("u:{zero}")).unwrap().verify("u", b"x"));
        // (Clamping down is checked on the helper: 10M iterations in a debug build take minutes.)
        assert_eq!(clamp_iterations(u32::MAX), 10_000_000);
        assert_eq!(clamp_iterations(10_000_000), 10_000_000);
        assert_eq!(clamp_iterations(5), 5);
    }

    #[test]
    fn default_iterations_round_trip() {
        let hash = hash_password(b"pw", DEFAULT_ITERATIONS);
        assert!(hash.starts_with("$7$10000$"));
        let file = PasswordFile::parse(&format!("u:{hash}")).unwrap();
        assert!(file.verify("u", b"pw"));
        assert!(!file.verify("u", b"pW"));
    }

    /// Kills and reaps the broker we started when the test ends, however it ends.
    struct Broker(Child);
    impl Drop for Broker {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Runs mosquitto_pub with a deadline; true if it connected and published.
    fn mosquitto_pub(port: u16, user: &str, password: &str) -> bool {
        let mut child = Command::new("/usr/bin/mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", user, "-P", password])
            .args(["-t", "coremq/pwtest", "-m", "x"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto_pub did not finish in 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The strongest compatibility check: the real mosquitto broker accepts a line we wrote.
    #[test]
    fn mosquitto_broker_accepts_hash_password() {
        let (broker, publisher) = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto_pub");
        if !Path::new(broker).exists() || !Path::new(publisher).exists() {
            eprintln!("skipping: {broker} or {publisher} is not installed");
            return;
        }
        let dir = TempDir::new("broker");
        let pw = dir.path("pw");
        let text = set_user("# made by coremq\n", "zed", &hash_password(b"s3cret", 2_000)).unwrap();
        std::fs::write(&pw, text).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.path("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n", pw.display()),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path("log")).unwrap();
        let _broker = Broker(
            Command::new(broker).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(mosquitto_pub(port, "zed", "s3cret"), "mosquitto rejected our hash");
        assert!(!mosquitto_pub(port, "zed", "wrong"), "mosquitto accepted a wrong password");
    }

    #[test]
    fn sha512_lines_verify() {
        let text =
            format!("{}\n{}\n", sha512_line("old", b"pass", b"0123456789ab"), sha512_line("x", b"", b"s"));
        let file = PasswordFile::parse(&text).unwrap();
        assert!(file.verify("old", b"pass"));
        assert!(!file.verify("old", b"pas"));
        assert!(!file.verify("old", b"pass0123456789ab"));
        assert!(file.verify("x", b""));
        assert!(!file.verify("x", b"s"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let good = ALICE;
        let h32 = STANDARD.encode([7u8; 32]);
        let h64 = STANDARD.encode([7u8; 64]);
        let s65 = STANDARD.encode([1u8; 65]);
        let cases: Vec<(String, usize)> = vec![
            ("alice:secret".into(), 1),
            ("alice:".into(), 1),
            ("alice".into(), 1),
            (format!("# c\n\n{good}\nbob:$5$abc$def"), 4),
            (format!("bob:$7$101$!!!!$${h64}"), 1),
            ("bob:$7$101$A5vu6A0og8Iqy6wg$not*base64".into(), 1),
            (format!("bob:$7$101$A5vu6A0og8Iqy6wg${h32}"), 1),
            (format!("bob:$7$0$A5vu6A0og8Iqy6wg${h64}"), 1),
            (format!("bob:$7$10000001$A5vu6A0og8Iqy6wg${h64}"), 1),
            (format!("bob:$7$99999999999$A5vu6A0og8Iqy6wg${h64}"), 1),
            (format!("bob:$7$+5$A5vu6A0og8Iqy6wg${h64}"), 1),
            (format!("bob:$7$$A5vu6A0og8Iqy6wg${h64}"), 1),
            (format!("bob:$7$abc$A5vu6A0og8Iqy6wg${h64}"), 1),
            (format!("bob:$7$101$${h64}"), 1),
            (format!("bob:$7$101${s65}${h64}"), 1),
            (format!("bob:$7$101$A5vu6A0og8Iqy6wg${h64}$extra"), 1),
            ("bob:$7$101$A5vu6A0og8Iqy6wg".into(), 1),
            ("bob:$6$A5vu6A0og8Iqy6wg".into(), 1),
            (format!("bob:$6$A5vu6A0og8Iqy6wg${h32}"), 1),
            (format!("bob:$6$A5vu6A0og8Iqy6wg${h64}$x"), 1),
            (format!("{good}\n:{ALICE_HASH}"), 2),
            (format!("{good}\n \t:{ALICE_HASH}"), 2),
            (format!("a\u{1}b:{ALICE_HASH}"), 1),
            (format!("a\u{7f}b:{ALICE_HASH}"), 1),
            (format!("a\u{85}b:{ALICE_HASH}"), 1),
            (format!("a:b:{ALICE_HASH}"), 1),
            (format!("{good}\n\n{good}"), 3),
            (format!("{good}\n# x\n  {good}"), 3),
            (format!("{}:{ALICE_HASH}", "u".repeat(65_536)), 1),
            (format!("bob:$7$101$A5vu6A0og8Iqy6wg${}", "A".repeat(100_000)), 1),
        ];
        for (text, n) in cases {
            let err = PasswordFile::parse(&text).expect_err(&text);
            assert!(err.starts_with(&format!("line {n}: ")), "{err:?} for {text:?}");
        }
        // Errors never echo the hash field (it may be a pasted password).
        let err = PasswordFile::parse("alice:hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn usernames() {
        for ok in ["a", "alice", "bob smith", "é", "user#1", "a b", "日本"] {
            assert!(valid_username(ok), "{ok:?}");
        }
        for bad in ["", ":", "a:b", "a\tb", "a\nb", "a\rb", "\0", "a\u{7f}", "#a", " a", "a ", " "] {
            assert!(!valid_username(bad), "{bad:?}");
        }
        assert!(valid_username(&"u".repeat(65_535)));
        assert!(!valid_username(&"u".repeat(65_536)));
    }

    #[test]
    fn set_user_replaces_in_place_and_appends() {
        let h1 = hash_password(b"one", 10);
        let h2 = hash_password(b"two", 10);
        let text = format!("# top comment\n\n{ALICE}\n# between\nbob:{h1}\n# tail");
        // Replace alice in place: every other byte kept, final newline added.
        let out = set_user(&text, "alice", &h2).unwrap();
        assert_eq!(out, format!("# top comment\n\nalice:{h2}\n# between\nbob:{h1}\n# tail\n"));
        let file = PasswordFile::parse(&out).unwrap();
        assert!(file.verify("alice", b"two"));
        assert!(!file.verify("alice", b"secret"));
        assert!(file.verify("bob", b"one"));
        // Append a new user.
        let out2 = set_user(&out, "carol", &h1).unwrap();
        assert_eq!(out2, format!("{out}carol:{h1}\n"));
        assert_eq!(PasswordFile::parse(&out2).unwrap().len(), 3);
        // Empty file.
        assert_eq!(set_user("", "u", &h1).unwrap(), format!("u:{h1}\n"));
        // A line written with blanks around the name (as mosquitto allows) is the same user.
        let out3 = set_user(&format!("  bob  :{h1}\n"), "bob", &h2).unwrap();
        assert_eq!(out3, format!("bob:{h2}\n"));
        // CRLF file: the replaced line keeps its CR, the others are untouched.
        let crlf = format!("# c\r\n{ALICE}\r\nbob:{h1}\r\n");
        assert_eq!(set_user(&crlf, "alice", &h2).unwrap(), format!("# c\r\nalice:{h2}\r\nbob:{h1}\r\n"));
        // Duplicates (an invalid file) collapse to one line, which makes the file valid again.
        let dup = format!("{ALICE}\n# x\n{ALICE}\n");
        assert_eq!(set_user(&dup, "alice", &h1).unwrap(), format!("alice:{h1}\n# x\n"));
        // Comments that mention the user are not the user's line.
        assert_eq!(set_user("#alice:x\n", "alice", &h1).unwrap(), format!("#alice:x\nalice:{h1}\n"));
    }

    #[test]
    fn set_user_rejects_bad_input() {
        let h = hash_password(b"x", 10);
        for bad in ["", "a:b", "a\nb", "a\u{0}", "#a", " a"] {
            let err = set_user("", bad, &h).unwrap_err();
            assert!(err.contains("invalid username"), "{err}");
        }
        // The hash must be one we read: no plaintext, no injected lines.
        assert!(set_user("", "u", "plain").is_err());
        assert!(set_user("", "u", &format!("{h}\nmallory:{h}")).is_err());
        assert!(set_user("", "u", "").is_err());
    }

    #[test]
    fn delete_user_removes_only_that_user() {
        let h = hash_password(b"x", 10);
        let text = format!("# c\n{ALICE}\n\nbob:{h}\n# end");
        let out = delete_user(&text, "alice").unwrap();
        assert_eq!(out, format!("# c\n\nbob:{h}\n# end\n"));
        let file = PasswordFile::parse(&out).unwrap();
        assert!(!file.contains("alice"));
        assert!(file.verify("bob", b"x"));
        assert_eq!(delete_user(&out, "alice").unwrap_err(), "user alice is not in the file");
        assert_eq!(delete_user(&out, "al").unwrap_err(), "user al is not in the file");
        assert_eq!(delete_user(&format!("bob:{h}"), "bob").unwrap(), "");
        // A comment naming the user is not the user.
        assert!(delete_user("#alice:x\n", "alice").is_err());
    }

    #[test]
    fn unknown_user_still_derives_like_the_file() {
        // The dummy is shaped like the file's most common credential.
        let text = format!("{ALICE}\n{}\n", sha512_line("b", b"p", b"s"));
        let text = format!("{text}c:{}\n", ALICE_HASH);
        let file = PasswordFile::parse(&text).unwrap();
        match &file.dummy {
            Some(Credential::Pbkdf2 { iterations: 101, .. }) => {}
            other => panic!("unexpected dummy {other:?}"),
        }
        assert!(!file.verify("nobody", b"secret"));
        let only6 = PasswordFile::parse(&sha512_line("b", b"p", b"s")).unwrap();
        assert!(matches!(only6.dummy, Some(Credential::Sha512 { .. })));
        assert!(!only6.verify("nobody", b""));
        // Debug output never shows hashes.
        let dbg = format!("{file:?}");
        assert!(!dbg.contains("8pJiFU") && !dbg.contains("A5vu6A0"), "{dbg}");
    }

    #[test]
    fn cache_remembers_success_until_cleared() {
        let file = PasswordFile::parse(ALICE).unwrap();
        let empty = PasswordFile::default();
        let mut cache = VerifyCache::new(16);
        assert!(cache.key.is_some(), "getrandom failed on the test machine");
        assert!(cache.verify(&file, "alice", b"secret"));
        assert_eq!(cache.entries.len(), 1);
        // Served from the cache: the (empty) file is not consulted for a cached user.
        assert!(cache.verify(&empty, "alice", b"secret"));
        assert!(!cache.verify(&empty, "alice", b"Secret"));
        assert!(!cache.verify(&empty, "bob", b"secret"));
        // The stored value is a keyed digest, not the password or its plain SHA-512.
        let plain: [u8; 64] = Sha512::digest(b"secret").into();
        assert_ne!(cache.entries["alice"], plain);
        // Reload: after clear() the empty file is the truth again.
        cache.clear();
        assert!(cache.entries.is_empty());
        assert!(!cache.verify(&empty, "alice", b"secret"));
        assert!(format!("{cache:?}").contains("len: 0"));
    }

    #[test]
    fn cache_never_stores_failures() {
        let file = PasswordFile::parse(ALICE).unwrap();
        let mut cache = VerifyCache::new(16);
        assert!(!cache.verify(&file, "alice", b"wrong"));
        assert!(!cache.verify(&file, "nobody", b"secret"));
        assert!(cache.entries.is_empty());
        // A wrong password for a cached user is still refused and does not replace the entry.
        assert!(cache.verify(&file, "alice", b"secret"));
        let before = cache.entries["alice"];
        assert!(!cache.verify(&file, "alice", b"wrong"));
        assert_eq!(cache.entries["alice"], before);
        assert!(cache.verify(&PasswordFile::default(), "alice", b"secret"));
    }

    #[test]
    fn cache_capacity_bound_clears() {
        let text = ["a", "b", "c"].iter().map(|u| format!("{u}:{ALICE_HASH}\n")).collect::<String>();
        let file = PasswordFile::parse(&text).unwrap();
        let empty = PasswordFile::default();
        let mut cache = VerifyCache::new(2);
        assert!(cache.verify(&file, "a", b"secret"));
        assert!(cache.verify(&file, "b", b"secret"));
        assert_eq!(cache.entries.len(), 2);
        // Re-verifying a cached user at capacity does not clear.
        assert!(cache.verify(&file, "a", b"secret"));
        assert_eq!(cache.entries.len(), 2);
        // A third user: the cache clears itself, then holds only the newcomer.
        assert!(cache.verify(&file, "c", b"secret"));
        assert_eq!(cache.entries.len(), 1);
        assert!(cache.verify(&empty, "c", b"secret"));
        assert!(!cache.verify(&empty, "a", b"secret"));
        // Capacity 0 disables caching.
        let mut off = VerifyCache::new(0);
        assert!(off.verify(&file, "a", b"secret"));
        assert!(off.entries.is_empty());
        assert!(!off.verify(&empty, "a", b"secret"));
    }

    fn username() -> impl Strategy<Value = String> {
        "\\PC{1,24}".prop_filter("valid username", |u| valid_username(u))
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let _ = PasswordFile::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            user in "[a-z#: \t]{0,4}",
            scheme in "\\$[5-8]\\$",
            iter in "[0-9+]{0,11}",
            salt in "[A-Za-z0-9+/=!]{0,20}",
            hash in "[A-Za-z0-9+/=]{0,100}",
            sep in "[$:\n]",
        ) {
            let line = format!("{user}:{scheme}{iter}{sep}{salt}${hash}");
            let _ = PasswordFile::parse(&line);
            let _ = set_user(&line, "u", &line);
            let _ = delete_user(&line, "u");
        }

        #[test]
        fn set_user_round_trips(users in proptest::collection::vec(username(), 1..6), comment in "#\\PC{0,20}") {
            let h = hash_password(b"pw", 1);
            let mut text = format!("{comment}\n");
            for u in &users {
                text = set_user(&text, u, &h).unwrap();
                // Setting again replaces in place: same length in lines.
                let again = set_user(&text, u, ALICE_HASH).unwrap();
                prop_assert_eq!(again.lines().count(), text.lines().count());
                text = again;
            }
            prop_assert!(text.ends_with('\n'));
            let header = format!("{comment}\n");
            prop_assert!(text.starts_with(&header));
            let file = PasswordFile::parse(&text).unwrap();
            let mut distinct = users.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(file.len(), distinct.len());
            for u in &distinct {
                prop_assert!(file.contains(u));
            }
            let first = &users[0];
            let file = PasswordFile::parse(&set_user(&text, first, &h).unwrap()).unwrap();
            prop_assert!(file.verify(first, b"pw"));
            prop_assert!(!file.verify(first, b"secret"));
            let removed = delete_user(&text, first).unwrap();
            let file = PasswordFile::parse(&removed).unwrap();
            prop_assert!(!file.contains(first));
            prop_assert_eq!(file.len(), distinct.len() - 1);
        }
    }
}
