//! The `coremq` binary: configuration, one pinned thread per core, signals, and the shutdown report.

use std::process::exit;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::Parser as _;

use coremq::cli::{Cli, Command};
use coremq::config::{self, BackendChoice, Config};
use coremq::core::Settings;
use coremq::io::{self, Backend};
use coremq::server::{self, CoreSetup, Reload, SHUTDOWN};
use coremq::stats::Stats;
use coremq::{cpus, tls, xcore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("coremq: {msg}");
    exit(2)
}

fn choose_backend(choice: BackendChoice) -> Backend {
    match choice {
        BackendChoice::Epoll => Backend::Epoll,
        BackendChoice::Uring => match io::probe_uring() {
            Ok(()) => Backend::Uring,
            Err(why) => fail(format!("--backend uring: io_uring is not available here: {why}")),
        },
        BackendChoice::Auto => match io::probe_uring() {
            Ok(()) => Backend::Uring,
            Err(why) => {
                eprintln!("coremq: warning: io_uring is not available ({why}); using the epoll backend");
                Backend::Epoll
            }
        },
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and, by inheritance, in every worker, so that only
/// `wait_for_signal` on the main thread receives them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and pthread_sigmask only
    // reads it. All pointers are to live locals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: `set` was initialised by block_signals and `sig` is a live local.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

/// Raises the open-files limit to its hard limit: every connection is a file descriptor, and the
/// usual soft limit (1,024) would cap the broker far below what it can serve.
fn raise_open_files_limit() -> Result<u64, String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a live, properly aligned rlimit the call fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: `raised` is a live rlimit read by the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// One TLS configuration per listener (`None` for plain ones), built afresh for one core.
fn tls_configs(cfg: &Config) -> Result<Vec<Option<Arc<rustls::ServerConfig>>>, String> {
    cfg.listeners.iter().map(|l| l.tls.as_ref().map(tls::server_config).transpose()).collect()
}

/// SIGHUP: re-reads the password, ACL and TLS files and hands each core its own copy. Connections stay
/// up; if any file no longer loads, every core keeps what it had, and one line says why.
fn reload(cfg: &Config, cores: &[mpsc::Sender<Reload>]) {
    let loaded = config::reload_auth(cfg).and_then(|auth| {
        let tls = (0..cores.len()).map(|_| tls_configs(cfg)).collect::<Result<Vec<_>, _>>()?;
        Ok((auth, tls))
    });
    let (auth, tls) = match loaded {
        Ok(l) => l,
        Err(e) => return eprintln!("coremq: SIGHUP: reload failed, keeping the previous files: {e}"),
    };
    let mut what = Vec::new();
    if let (Some((path, _)), Some(p)) = (&cfg.password_file, &auth.passwords) {
        what.push(format!("password file {} ({} users)", path.display(), p.len()));
    }
    if let Some((path, _)) = &cfg.acl_file {
        what.push(format!("ACL file {}", path.display()));
    }
    let certs = cfg.listeners.iter().filter(|l| l.tls.is_some()).count();
    if certs > 0 {
        what.push(format!("TLS files of {certs} listener(s)"));
    }
    for (tx, tls) in cores.iter().zip(tls) {
        let _ = tx.send(Reload { auth: auth.clone(), tls });
    }
    if what.is_empty() {
        eprintln!("coremq: SIGHUP: no password, ACL or TLS file configured; nothing to reload");
    } else {
        eprintln!("coremq: SIGHUP: reloaded {}", what.join(" and "));
    }
}

fn main() {
    // A panic is a bug: unwinding would end only its core's thread, and the other cores would then wait
    // forever on that core's full rings. Print it as usual, then abort the whole broker. (A hook rather
    // than `panic = "abort"` in the profile, which would build the library twice for the tests.)
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's message spans several lines (usage, hints); a bad flag gets one line, like a bad key.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            fail(format!("{} (see --help)", first.trim_start_matches("error: ")))
        }
    };
    if let Some(Command::Passwd(args)) = &cli.command {
        if let Err(e) = coremq::passwd::run(args) {
            eprintln!("coremq passwd: {e}");
            exit(1);
        }
        return;
    }
    let cfg = config::load(&cli).unwrap_or_else(|e| fail(e));
    // First, before recovery rewrites the data directory: a second broker on an address this one serves
    // must stop here with the error any port in use gives, not join its SO_REUSEPORT group. The claims
    // are held until the process exits.
    let _claims: Vec<io::AddressClaim> = cfg
        .listeners
        .iter()
        .map(|l| {
            io::claim_address(l.bind).unwrap_or_else(|e| fail(format!("cannot listen on {}: {e}", l.bind)))
        })
        .collect();
    let backend = choose_backend(cfg.keys.backend);
    let sigset = block_signals();

    let n = cfg.threads;
    // Held until exit, like the address claims: one broker per data directory.
    let _data_lock = cfg
        .persistence
        .as_ref()
        .map(|pc| server::persist::lock_data_dir(&pc.data_dir).unwrap_or_else(|e| fail(e)));
    // Recovery runs before any core starts: each core begins with its part of the state.
    let mut stores: Vec<Option<server::persist::CoreStore>> = match &cfg.persistence {
        Some(pc) => server::persist::open_store(pc, n, Settings::from_config(&cfg).limits)
            .unwrap_or_else(|e| fail(e))
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..n).map(|_| None).collect(),
    };
    let meshes = xcore::build_mesh(n, cfg.keys.ring_capacity);
    let signals = meshes[0].signals().clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let mut reloads = Vec::with_capacity(n);
    let addrs = cfg.listeners.clone();
    let per_listener: Vec<usize> = addrs.iter().map(|l| l.max_connections).collect();
    let limits = xcore::ConnLimits::new(cfg.keys.max_connections, &per_listener);
    for (id, mesh) in meshes.into_iter().enumerate() {
        let (reload_tx, reload_rx) = mpsc::channel();
        reloads.push(reload_tx);
        // Checked once already by config::load; a file changed since then is a startup error here.
        let tls = tls_configs(&cfg).unwrap_or_else(|e| fail(e));
        let setup = CoreSetup {
            id,
            settings: Settings::from_config(&cfg),
            mesh,
            listeners: addrs.clone(),
            limits: limits.clone(),
            ready: ready_tx.clone(),
            done: done_tx.clone(),
            tls,
            reload: reload_rx,
            store: stores.get_mut(id).and_then(Option::take),
        };
        let cpu = cfg.keys.cpus.as_ref().and_then(|c| c.get(id).copied());
        let spawned = std::thread::Builder::new().name(format!("coremq-core-{id}")).spawn(move || {
            if let Some(cpu) = cpu {
                if let Err(e) = cpus::pin_current_thread(cpu) {
                    let _ = setup.ready.send(Err(format!("cannot pin core {id} to cpu {cpu}: {e}")));
                    return;
                }
            }
            let ready = setup.ready.clone();
            if let Err(e) = io::run(backend, server::run_core(setup)) {
                let _ = ready.send(Err(format!("core {id}: cannot start the {backend:?} runtime: {e}")));
            }
        });
        if let Err(e) = spawned {
            fail(format!("cannot start thread {id}: {e}"));
        }
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fail(e),
            Err(_) => fail("a core did not start within 10 s"),
        }
    }
    let listen: Vec<String> = addrs
        .iter()
        .map(|l| {
            let anon =
                if l.allow_anonymous { "anonymous clients allowed" } else { "anonymous clients refused" };
            let proto = if l.tls.is_some() { "mqtts, " } else { "" };
            format!("{} ({proto}{anon})", l.bind)
        })
        .collect();
    match raise_open_files_limit() {
        Ok(n) => eprintln!(
            "coremq: open files limit {n} (at most about {} client connections)",
            n.saturating_sub(64)
        ),
        Err(e) => eprintln!("coremq: warning: cannot raise the open files limit: {e}"),
    }
    let pinning = match &cfg.keys.cpus {
        Some(c) => format!(", pinned to cpus {}", cpus::format_cpu_list(c)),
        None => String::new(),
    };
    if let Some((path, file)) = &cfg.password_file {
        eprintln!("coremq: password file {} ({} users)", path.display(), file.len());
    }
    if let Some((path, _)) = &cfg.acl_file {
        eprintln!("coremq: ACL file {} (what no rule allows is denied)", path.display());
    }
    eprintln!(
        "coremq: listening on {}; {n} {}, {} backend{pinning}",
        listen.join(", "),
        if n == 1 { "thread" } else { "threads" },
        match backend {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        }
    );
    if cfg.default_listener {
        eprintln!(
            "coremq: only local clients can connect; to listen on other interfaces use --listen 0.0.0.0:1883 \
             or a [[listener]] bind in a config file"
        );
    }
    let started = std::time::Instant::now();

    let sig = loop {
        let sig = wait_for_signal(&sigset);
        if sig != libc::SIGHUP {
            break sig;
        }
        reload(&cfg, &reloads);
    };
    SHUTDOWN.store(true, Ordering::SeqCst);
    for s in signals.iter() {
        s.wake.notify_one();
    }
    let mut per_core: Vec<Option<Stats>> = vec![None; n];
    for _ in 0..n {
        match done_rx.recv_timeout(Duration::from_secs(5)) {
            Ok((id, s)) => {
                if let Some(slot) = per_core.get_mut(id) {
                    *slot = Some(s);
                }
            }
            Err(_) => break,
        }
    }
    let mut all = Stats::new();
    let mut report =
        format!("coremq: shutdown on signal {sig} after {:.1} s\n", started.elapsed().as_secs_f64());
    for (id, s) in per_core.iter().enumerate() {
        match s {
            Some(s) => {
                report.push_str(&s.render(&format!("core {id}")));
                all.merge(s);
            }
            None => report.push_str(&format!("core {id}: did not stop within 5 s\n")),
        }
    }
    report.push_str(&all.render("all"));
    print!("{report}");
    exit(0);
}
