//! Finding out whether io_uring is usable here, and with which setup flags, without tokio-uring
//! (whose `start` panics when the ring cannot be created).

use std::sync::atomic::{AtomicU8, Ordering};

use io_uring::{opcode, IoUring, Probe};

/// Submission queue entries of each core's ring (the completion queue gets twice as many). Each
/// ring's memory may count against RLIMIT_MEMLOCK, which is why the probe uses the same size.
pub(super) const RING_ENTRIES: u32 = 1024;

/// Ring setup flags, best first. `COOP_TASKRUN` (Linux 5.19) and `SINGLE_ISSUER` (6.0) cut
/// interrupts and locking; older kernels reject unknown flags with EINVAL, so weaker setups are
/// tried next. `DEFER_TASKRUN` is never used: tokio-uring waits for completions through epoll on
/// the ring fd, which deferred task work never signals, so accepts hang.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Setup {
    CoopSingleIssuer,
    Coop,
    Plain,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::CoopSingleIssuer, Setup::Coop, Setup::Plain];

    /// An io_uring builder with this setup's flags.
    pub(super) fn uring_builder(self) -> io_uring::Builder {
        let mut b = IoUring::builder();
        match self {
            Setup::CoopSingleIssuer => {
                b.setup_coop_taskrun().setup_single_issuer();
            }
            Setup::Coop => {
                b.setup_coop_taskrun();
            }
            Setup::Plain => {}
        }
        b
    }

    fn code(self) -> u8 {
        match self {
            Setup::CoopSingleIssuer => 1,
            Setup::Coop => 2,
            Setup::Plain => 3,
        }
    }

    fn from_code(c: u8) -> Option<Setup> {
        Setup::ALL.into_iter().find(|s| s.code() == c)
    }
}

/// The setup found to work by an earlier probe (0 = not probed successfully yet). Failures are not
/// cached: ENOMEM can be transient (ring memory is released some milliseconds after close).
static FOUND: AtomicU8 = AtomicU8::new(0);

/// Operations tokio-uring issues for what this module uses (reads, writev, accept, close on
/// drop, cancellation at shutdown). Partial implementations (gVisor) may lack some.
const NEEDED_OPS: [(u8, &str); 5] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

/// Probes whether an io_uring can be created here, by creating and dropping a ring of the size
/// and flags [`super::run`] will use. `Err` carries a one-line human reason.
pub fn probe_uring() -> Result<(), String> {
    setup().map(|_| ())
}

/// The best setup this kernel accepts, probing on first use.
pub(super) fn setup() -> Result<Setup, String> {
    if let Some(s) = Setup::from_code(FOUND.load(Ordering::Relaxed)) {
        return Ok(s);
    }
    for s in Setup::ALL {
        match s.uring_builder().build(RING_ENTRIES) {
            Ok(ring) => {
                check_ops(&ring)?;
                FOUND.store(s.code(), Ordering::Relaxed);
                return Ok(s);
            }
            // Unknown setup flag on an older kernel: try the next, weaker setup.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(describe(&e)),
        }
    }
    Err("io_uring_setup rejects every ring configuration (EINVAL): kernel io_uring too old".into())
}

/// Checks that the kernel implements every opcode tokio-uring will submit.
fn check_ops(ring: &IoUring) -> Result<(), String> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        format!("io_uring opcode probe failed ({e}): kernel io_uring too old (Linux 5.6+ needed)")
    })?;
    let missing: Vec<&str> =
        NEEDED_OPS.iter().filter(|(code, _)| !probe.is_supported(*code)).map(|(_, name)| *name).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("io_uring lacks operations {}", missing.join(", ")))
    }
}

/// One line saying why `io_uring_setup` failed and what to do about it.
fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "io_uring not permitted (EPERM): disabled by the kernel.io_uring_disabled sysctl or \
             blocked by a seccomp filter (e.g. a container runtime's default profile): {e}"
        ),
        Some(libc::ENOSYS) => {
            format!("kernel without io_uring (ENOSYS): not built in, or the syscall is filtered: {e}")
        }
        Some(libc::ENOMEM) => format!(
            "cannot allocate a {RING_ENTRIES}-entry io_uring (ENOMEM): RLIMIT_MEMLOCK too low, \
             raise it (ulimit -l) or use the epoll backend: {e}"
        ),
        _ => format!("io_uring_setup failed: {e}"),
    }
}
