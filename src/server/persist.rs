//! The file side of persistence: recovery at startup (on the main thread, before the cores run) and each
//! core's log task (appends, group commit, compaction), which writes through `crate::io`.
//!
//! Layout of `data_dir`: `CURRENT` names the live generation directory (`gen-K`), which holds one log per
//! core (`core-N.log`). Startup reads generation K, rebuilds the state, writes generation K+1 for the
//! current thread count (one snapshot per core), makes it durable, switches `CURRENT` with an atomic rename
//! and only then deletes generation K: a crash at any point leaves one complete generation to start from.
//! While running, a core's log is compacted by writing a snapshot next to it and renaming it over the log.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{after_batch, shutting_down, CoreRef};
use crate::config::{FsyncPolicy, PersistenceConfig};
use crate::core::home_core;
use crate::io;
use crate::persist::{self, read_log, recover, snapshot_session, Record, RecoveredSession, Tail, LOG_MAGIC};
use crate::session::{Limits, Message};

/// What one core starts from: its log (already holding its snapshot) and the state recovered for it.
pub struct CoreStore {
    pub file: fs::File,
    pub path: PathBuf,
    /// Bytes in the file: where appends continue.
    pub len: u64,
    pub sessions: Vec<(RecoveredSession, u32)>,
    /// Every retained message (each core keeps a whole copy).
    pub retained: Vec<Message>,
    /// Highest session number in the log.
    pub last_sid: u32,
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
}

const CURRENT: &str = "CURRENT";

fn err(path: &Path, what: &str, e: std::io::Error) -> String {
    format!("persistence: {what} {}: {e}", path.display())
}

/// Makes a directory entry (a new or renamed file) durable.
fn sync_dir(dir: &Path) -> Result<(), String> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(dir, "cannot sync directory", e))
}

/// Locks `data_dir` for this process (`data_dir/LOCK`) until the returned file is dropped: two brokers
/// recovering from and writing to one directory would each rewrite the other's generations. Creates the
/// directory if needed.
pub fn lock_data_dir(dir: &Path) -> Result<fs::File, String> {
    fs::create_dir_all(dir).map_err(|e| err(dir, "cannot create", e))?;
    let path = dir.join("LOCK");
    io::lock_exclusive(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => format!(
            "persistence: {} is in use by another coremq process (it holds the lock on {})",
            dir.display(),
            path.display()
        ),
        _ => err(&path, "cannot lock", e),
    })
}

/// Reads the live generation, rebuilds the state, and writes the next generation for `threads` cores.
/// Damaged log tails are reported (one line each) and cut off; anything else that prevents a safe start
/// is an error (one line).
pub fn open_store(cfg: &PersistenceConfig, threads: usize, limits: Limits) -> Result<Vec<CoreStore>, String> {
    let started = Instant::now();
    let dir = &cfg.data_dir;
    fs::create_dir_all(dir).map_err(|e| err(dir, "cannot create", e))?;
    let current_path = dir.join(CURRENT);
    let current = match fs::read_to_string(&current_path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(&current_path, "cannot read", e)),
    };
    let clock = crate::server::wall_clock();
    let mut logs = Vec::new();
    let mut generation = 0u64;
    if let Some(name) = &current {
        generation = name.strip_prefix("gen-").and_then(|n| n.parse().ok()).ok_or_else(|| {
            format!("persistence: {} names \"{name}\", not a generation", current_path.display())
        })?;
        let gen_dir = dir.join(name);
        let mut files: Vec<PathBuf> = fs::read_dir(&gen_dir)
            .map_err(|e| err(&gen_dir, "cannot read", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        for path in files {
            let bytes = Bytes::from(fs::read(&path).map_err(|e| err(&path, "cannot read", e))?);
            let contents =
                read_log(&bytes, &clock).map_err(|why| format!("persistence: {}: {why}", path.display()))?;
            if let Tail::Torn { offset, why } = contents.tail {
                eprintln!(
                    "coremq: persistence: {}: {why} at byte {offset} of {}: the damaged tail is cut off",
                    path.display(),
                    bytes.len()
                );
                if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                    let _ = f.set_len(contents.valid_len as u64);
                }
            }
            logs.push(contents.records);
        }
    }
    let recovered = recover(logs, limits, &clock);
    let (n_sessions, n_retained, n_records) =
        (recovered.sessions.len(), recovered.retained.len(), recovered.records);

    // The next generation: one snapshot per core of the current thread count.
    let next = format!("gen-{}", generation + 1);
    let next_dir = dir.join(&next);
    if next_dir.exists() {
        // Left by a start that crashed before switching CURRENT: never live, safe to drop.
        fs::remove_dir_all(&next_dir).map_err(|e| err(&next_dir, "cannot remove", e))?;
    }
    fs::create_dir_all(&next_dir).map_err(|e| err(&next_dir, "cannot create", e))?;
    let mut per_core: Vec<Vec<(RecoveredSession, u32)>> = (0..threads).map(|_| Vec::new()).collect();
    let mut sids = vec![0u32; threads];
    for rs in recovered.sessions {
        let core = home_core(rs.client_id.as_str(), threads);
        let core = core.index();
        sids[core] += 1;
        per_core[core].push((rs, sids[core]));
    }
    let mut stores = Vec::with_capacity(threads);
    for (core, sessions) in per_core.into_iter().enumerate() {
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(LOG_MAGIC);
        let mut records = Vec::new();
        for (rs, sid) in &sessions {
            // Every recovered session is offline now; one that was connected at the crash counts from here.
            let offline = rs.offline_since.or(Some(clock.instant));
            snapshot_session(*sid, &rs.client_id, rs.expiry, offline, &rs.session, &clock, &mut records);
            for (filter, opts) in &rs.subscriptions {
                let filter = crate::protocol::Utf8Bytes::copy_from_str(filter);
                records.push(Record::Subscribe { sid: *sid, filter, opts: *opts });
            }
        }
        for m in &recovered.retained {
            if home_core(m.topic.as_str(), threads).index() == core {
                records.push(Record::Retained { msg: m.clone() });
            }
        }
        for r in &records {
            persist::encode_record(r, &clock, &mut buf);
        }
        let path = next_dir.join(format!("core-{core}.log"));
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| err(&path, "cannot create", e))?;
        file.write_all(&buf).and_then(|_| file.sync_all()).map_err(|e| err(&path, "cannot write", e))?;
        stores.push(CoreStore {
            file,
            path,
            len: buf.len() as u64,
            sessions,
            retained: recovered.retained.clone(),
            last_sid: sids[core],
            fsync: cfg.fsync,
            fsync_interval: cfg.fsync_interval,
        });
    }
    sync_dir(&next_dir)?;
    let tmp = dir.join("CURRENT.tmp");
    fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(next.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| err(&tmp, "cannot write", e))?;
    fs::rename(&tmp, &current_path).map_err(|e| err(&current_path, "cannot replace", e))?;
    sync_dir(dir)?;
    if let Some(old) = current {
        if old != next {
            let _ = fs::remove_dir_all(dir.join(old));
        }
    }
    println!(
        "coremq: persistence: {} sessions and {n_retained} retained messages recovered from {} ({n_records} \
         records) in {:.0} ms; fsync {}",
        n_sessions,
        dir.display(),
        started.elapsed().as_secs_f64() * 1000.0,
        match cfg.fsync {
            FsyncPolicy::Always => "always".to_string(),
            FsyncPolicy::Interval => format!("every {} ms", cfg.fsync_interval.as_millis()),
            FsyncPolicy::Never => "never".to_string(),
        }
    );
    Ok(stores)
}

/// Replaces the log at `path` with `snapshot`: written and synced beside it, then renamed over it.
async fn rotate(path: &Path, snapshot: Bytes) -> std::io::Result<(io::File, u64)> {
    let tmp = path.with_extension("log.tmp");
    let std_file = fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&tmp)?;
    let file = io::File::from_std(std_file)?;
    let len = snapshot.len() as u64;
    file.write_all_at(snapshot, 0).await?;
    file.sync_data().await?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok((file, len))
}

/// One core's log writer: takes what the core appended, writes it at the end of the log, syncs it as the
/// policy says (everything taken together: group commit), tells the core how far the log is durable, and
/// compacts the log when it has grown.
pub async fn log_task(
    core: CoreRef,
    store_file: fs::File,
    path: PathBuf,
    mut offset: u64,
    policy: FsyncPolicy,
    interval: Duration,
) {
    let mut file = match io::File::from_std(store_file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("coremq: persistence: {}: {e}", path.display());
            return;
        }
    };
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    loop {
        let snap = core.borrow_mut().take_snapshot(false, Instant::now());
        if let Some((snapshot, before, pos)) = snap {
            // What preceded the snapshot goes to the old file first: until the rename, that file is the log.
            let n = before.len() as u64;
            if file.write_all_at(before, offset).await.is_ok() {
                offset += n;
            }
            match rotate(&path, snapshot).await {
                Ok((f, len)) => {
                    file = f;
                    offset = len;
                    unsynced = false;
                    core.borrow_mut().log_durable(pos);
                }
                Err(e) => eprintln!("coremq: persistence: compacting {} failed: {e}", path.display()),
            }
            finish(&core);
            continue;
        }
        let taken = core.borrow_mut().take_log_output();
        let Some((bytes, pos)) = taken else {
            if unsynced && (policy == FsyncPolicy::Interval || shutting_down()) {
                if last_sync.elapsed() >= interval || shutting_down() {
                    let _ = file.sync_data().await;
                    unsynced = false;
                    last_sync = Instant::now();
                    continue;
                }
                // Written but not synced yet: come back when the interval is up.
                let wait = interval.saturating_sub(last_sync.elapsed());
                let woken = core.log_wake.notified();
                let _ = tokio::time::timeout(wait, woken).await;
                continue;
            }
            core.log_wake.notified().await;
            continue;
        };
        let n = bytes.len() as u64;
        if let Err(e) = file.write_all_at(bytes, offset).await {
            // A failing disk: say so, and keep the broker up; acknowledgements that wait for durability
            // (fsync = "always") keep waiting.
            eprintln!("coremq: persistence: writing {} failed: {e}", path.display());
            io::sleep(Duration::from_secs(1)).await;
            continue;
        }
        offset += n;
        unsynced = true;
        let sync = match policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => last_sync.elapsed() >= interval,
            FsyncPolicy::Never => false,
        };
        if sync {
            if let Err(e) = file.sync_data().await {
                eprintln!("coremq: persistence: syncing {} failed: {e}", path.display());
                io::sleep(Duration::from_secs(1)).await;
                continue;
            }
            unsynced = false;
            last_sync = Instant::now();
        }
        // With "interval" and "never", written is as durable as the policy promises.
        core.borrow_mut().log_durable(pos);
        finish(&core);
    }
}

/// Sends what became durable (held acknowledgements, confirmations to other cores).
fn finish(core: &CoreRef) {
    core.borrow_mut().end_batch(Instant::now());
    after_batch(core);
}
