//! Who may connect and what they may touch: the password file and the ACL file, both in mosquitto's
//! formats so that mosquitto users bring theirs unchanged. Pure code: files are read by the caller,
//! nothing here does I/O; each core keeps its own copy (no cross-core lookup on the hot path).

pub mod acl;
pub mod password;

use acl::Acl;
use password::PasswordFile;

/// The password and ACL files as loaded at startup or by a SIGHUP reload (`None`: not configured).
#[derive(Clone, Debug, Default)]
pub struct AuthFiles {
    pub passwords: Option<PasswordFile>,
    pub acl: Option<Acl>,
}
