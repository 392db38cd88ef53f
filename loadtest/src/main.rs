//! coremq-swarm: a load generator for any MQTT 3.1.1 or 5.0 broker, used to compare coremq with
//! mosquitto. See `coremq-swarm --help`; the JSON line it prints last is what scripts/compare.sh
//! reads.

mod account;
mod cli;
mod client;
mod report;
mod run;
mod stamp;
mod tls;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::Parser;
use coremq::protocol::QoS;
use tokio::sync::watch;

use account::{StreamTracker, Tally};
use cli::{Args, Plan, Scenario};
use client::Conn;
use report::{Latency, Summary};
use run::{Ctx, Event, Phase, ThreadOut, Work, CONNECT_TIMEOUT, DRAIN};

/// Connection errors printed on stderr before the rest are only counted.
const MAX_ERRORS_SHOWN: usize = 5;

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("coremq-swarm: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match args.plan() {
        Ok(p) => p,
        Err(e) => return usage_error(&e),
    };
    if !plan.cpus.is_empty() {
        if let Ok(allowed) = coremq::cpus::allowed_cpus() {
            if let Some(c) = plan.cpus.iter().find(|c| !allowed.contains(c)) {
                return usage_error(&format!(
                    "--cpus: cpu {c} is not available to this process (allowed: {})",
                    coremq::cpus::format_cpu_list(&allowed)
                ));
            }
        }
    }
    let fds_needed = u64::from(plan.connections) + plan.subscriber_specs.len() as u64 + 64;
    if let Err(e) = raise_fd_limit(fds_needed) {
        return usage_error(&e);
    }
    match probe(&plan) {
        Ok(Some(session)) => eprintln!("coremq-swarm: TLS session: {session}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("coremq-swarm: cannot connect to {}: {e}", plan.addr);
            return ExitCode::from(2);
        }
    }
    let summary =
        if plan.scenario == Scenario::Storm { run_storm(plan.clone()) } else { run_messages(plan.clone()) };
    if plan.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.human());
        println!("{}", summary.json());
    }
    let t = &summary.tally;
    let failed = (plan.qos != QoS::AtMostOnce && t.lost > 0)
        || (plan.qos == QoS::ExactlyOnce && t.duplicated > 0)
        || summary.connect_failures > 0;
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Raises the soft open-files limit towards `needed` (up to the hard limit); an error if even the
/// hard limit is too low, so that a big storm fails up front instead of with EMFILE half-way.
fn raise_fd_limit(needed: u64) -> Result<(), String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(()); // cannot tell: let the run find out
    }
    if lim.rlim_cur >= needed {
        return Ok(());
    }
    let want = libc::rlimit { rlim_cur: needed.min(lim.rlim_max), rlim_max: lim.rlim_max };
    // SAFETY: `want` is a valid rlimit; raising the soft limit up to the hard one is always allowed.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) };
    if rc != 0 || want.rlim_cur < needed {
        return Err(format!(
            "{needed} file descriptors needed but the limit is {} (raise `ulimit -n`)",
            if rc == 0 { want.rlim_cur } else { lim.rlim_cur }
        ));
    }
    Ok(())
}

/// One CONNECT/CONNACK/DISCONNECT before anything else, so an unreachable broker (or a failed TLS
/// handshake) is one clear line and exit status 2 rather than thousands of failed connections.
/// Returns the negotiated TLS session, if TLS is on.
fn probe(plan: &Plan) -> Result<Option<String>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    rt.block_on(async {
        let id = format!("swarm-{}-probe-0", std::process::id());
        let conn =
            Conn::connect(&plan.addr, plan.tls.as_ref(), plan.version, &id, false, CONNECT_TIMEOUT).await?;
        let session = conn.tls_session();
        conn.close().await;
        Ok(session)
    })
}

/// Spreads the plan's connections round-robin over the threads and starts them.
fn spawn_threads(
    ctx: &Arc<Ctx>,
    storm: u32,
) -> (Vec<std::thread::JoinHandle<ThreadOut>>, mpsc::Receiver<Event>, watch::Sender<Phase>) {
    let threads = ctx.plan.threads;
    let mut work: Vec<Work> = (0..threads).map(|_| Work::default()).collect();
    for (i, s) in ctx.plan.subscriber_specs.iter().enumerate() {
        if let Some(w) = work.get_mut(i % threads) {
            w.subs.push(s.clone());
        }
    }
    // Publishers continue the round-robin where subscribers stopped, so that with two threads
    // and one subscriber (fan-in) the subscriber does not share its thread with a publisher.
    let n_subs = ctx.plan.subscriber_specs.len();
    for (i, p) in ctx.plan.publishers.iter().enumerate() {
        if let Some(w) = work.get_mut((n_subs + i) % threads) {
            w.pubs.push(p.clone());
        }
    }
    for n in 0..storm {
        if let Some(w) = work.get_mut(n as usize % threads) {
            w.storm.push(n);
        }
    }
    let (etx, erx) = mpsc::channel();
    let (ptx, prx) = watch::channel(Phase::Setup);
    let mut handles = Vec::new();
    for (idx, w) in work.into_iter().enumerate() {
        let (ctx, etx, prx) = (ctx.clone(), etx.clone(), prx.clone());
        let h = std::thread::Builder::new()
            .name(format!("swarm-{idx}"))
            .spawn(move || run::thread_main(idx, w, ctx, etx, prx));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => eprintln!("coremq-swarm: cannot start thread {idx}: {e}"),
        }
    }
    (handles, erx, ptx)
}

/// Joins the threads, merging histograms and collecting subscriber trackers and errors.
fn join_threads(handles: Vec<std::thread::JoinHandle<ThreadOut>>) -> ThreadOut {
    let mut all = ThreadOut { hist: run::new_histogram(), subs: Vec::new(), errors: Vec::new() };
    for h in handles {
        match h.join() {
            Ok(out) => {
                // Same bounds everywhere, so adding cannot fail; clamp values if it ever did.
                if all.hist.add(&out.hist).is_err() {
                    for v in out.hist.iter_recorded() {
                        all.hist.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                    }
                }
                all.subs.extend(out.subs);
                all.errors.extend(out.errors);
            }
            Err(_) => all.errors.push("a swarm thread panicked".to_string()),
        }
    }
    all
}

fn show_errors(errors: &[String]) {
    for e in errors.iter().take(MAX_ERRORS_SHOWN) {
        eprintln!("coremq-swarm: {e}");
    }
    if errors.len() > MAX_ERRORS_SHOWN {
        eprintln!("coremq-swarm: ... and {} more", errors.len() - MAX_ERRORS_SHOWN);
    }
}

/// Prints the per-second progress line when a second has passed since the last one.
struct Progress {
    started: Instant,
    last: Instant,
    sent: u64,
    recv: u64,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress { started: now, last: now, sent: 0, recv: 0 }
    }

    /// `measure_at` and `end_at` name the phase of the second that just passed.
    fn tick(&mut self, ctx: &Ctx, measure_at: Instant, end_at: Instant) {
        let el = self.last.elapsed();
        if el < Duration::from_secs(1) {
            return;
        }
        let label = if self.last < measure_at {
            "warmup"
        } else if self.last < end_at {
            "run"
        } else {
            "drain"
        };
        let (sent, recv) = (ctx.sent_all.load(Relaxed), ctx.recv_all.load(Relaxed));
        let secs = el.as_secs_f64();
        eprintln!(
            "coremq-swarm: {:6.1}s {label:<7} sent {:>10.0}/s  recv {:>10.0}/s",
            self.started.elapsed().as_secs_f64(),
            sent.saturating_sub(self.sent) as f64 / secs,
            recv.saturating_sub(self.recv) as f64 / secs,
        );
        (self.last, self.sent, self.recv) = (Instant::now(), sent, recv);
    }
}

/// Every scenario but storm: connect and subscribe, publish for warmup + duration, drain, tally.
fn run_messages(plan: Plan) -> Summary {
    let ctx = Arc::new(Ctx::new(plan));
    let plan = &ctx.plan;
    let (handles, events, phase) = spawn_threads(&ctx, 0);

    // Setup: every connection reports once; each is bounded by the connect deadline.
    let n_pubs = plan.publishers.len();
    let n_subs = plan.subscriber_specs.len();
    let mut sub_ok = vec![false; n_subs];
    let (mut pubs_ok, mut reported) = (0u32, 0usize);
    let mut errors = Vec::new();
    let mut refused = 0u32;
    let setup_deadline = ctx.connect_deadline + Duration::from_secs(1);
    while reported < n_pubs + n_subs {
        let left = setup_deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Pub(r)) => match r {
                Ok(()) => pubs_ok += 1,
                Err(e) => errors.push(e),
            },
            Ok(Event::Sub(id, r)) => match r {
                Ok(granted) => {
                    if let Some(ok) = sub_ok.get_mut(id as usize) {
                        *ok = true;
                    }
                    if !granted {
                        refused += 1;
                    }
                }
                Err(e) => errors.push(e),
            },
            Ok(Event::Storm(_)) => {}
            Err(_) => break,
        }
        reported += 1;
    }
    let subs_ok = sub_ok.iter().filter(|&&o| o).count() as u64;
    let connect_failures = (n_pubs + n_subs) as u64 - u64::from(pubs_ok) - subs_ok;
    show_errors(&errors);
    if refused > 0 {
        eprintln!("coremq-swarm: the broker refused {refused} subscription(s) (SUBACK 0x80): their messages count as lost");
    }

    // Receivers per publisher, for the drain check and the tally: every connected subscriber,
    // except that a shared group counts once.
    let mut weight = vec![0u64; n_pubs];
    let mut groups_seen = Vec::new();
    for (s, _) in plan.subscriber_specs.iter().zip(&sub_ok).filter(|(_, &ok)| ok) {
        if let Some(g) = s.group {
            if groups_seen.contains(&g) {
                continue;
            }
            groups_seen.push(g);
        }
        for p in s.pubs.0..s.pubs.1 {
            if let Some(w) = weight.get_mut(p as usize) {
                *w += 1;
            }
        }
    }

    // Go.
    let start = ctx.now_ns();
    let measure = start.saturating_add(u64::try_from(plan.warmup.as_nanos()).unwrap_or(u64::MAX));
    let end = measure.saturating_add(u64::try_from(plan.duration.as_nanos()).unwrap_or(u64::MAX));
    ctx.start_ns.store(start, Relaxed);
    ctx.measure_ns.store(measure, Relaxed);
    ctx.end_ns.store(end, Relaxed);
    phase.send_replace(Phase::Go);

    let mut progress = Progress::new();
    let end_at = ctx.base + Duration::from_nanos(end);
    let measure_at = ctx.base + Duration::from_nanos(measure);
    while Instant::now() < end_at {
        std::thread::sleep(Duration::from_millis(10));
        progress.tick(&ctx, measure_at, end_at);
    }
    let drain_until = end_at + DRAIN;
    while Instant::now() < drain_until {
        let expected: u64 = ctx.sent.iter().zip(&weight).map(|(s, w)| s.load(Relaxed) * w).sum();
        if ctx.pubs_done.load(Relaxed) >= pubs_ok && ctx.recv_new.load(Relaxed) >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        progress.tick(&ctx, measure_at, end_at);
    }
    phase.send_replace(Phase::Stop);
    let out = join_threads(handles);
    show_errors(&out.errors);

    // Tally: plain subscribers stream by stream; shared groups merged first.
    let sent: Vec<u64> = ctx.sent.iter().map(|s| s.load(Relaxed)).collect();
    let mut by_sub: HashMap<u32, Vec<StreamTracker>> = out.subs.into_iter().collect();
    let mut groups: HashMap<u32, ((u32, u32), Vec<StreamTracker>)> = HashMap::new();
    let mut tally = Tally::default();
    for (s, _) in plan.subscriber_specs.iter().zip(&sub_ok).filter(|(_, &ok)| ok) {
        let (lo, hi) = s.pubs;
        let trackers = by_sub.remove(&s.id).unwrap_or_default();
        match s.group {
            None => {
                for p in lo..hi {
                    let t = trackers.get((p - lo) as usize).cloned().unwrap_or_default();
                    tally.add(sent.get(p as usize).copied().unwrap_or(0), &t);
                }
            }
            Some(g) => {
                let entry = groups.entry(g).or_insert_with(|| {
                    ((lo, hi), vec![StreamTracker::new(); hi.saturating_sub(lo) as usize])
                });
                for (merged, t) in entry.1.iter_mut().zip(&trackers) {
                    merged.merge(t);
                }
            }
        }
    }
    for ((lo, _), trackers) in groups.values() {
        for (i, t) in trackers.iter().enumerate() {
            tally.add(sent.get(*lo as usize + i).copied().unwrap_or(0), t);
        }
    }
    let duration_s = plan.duration.as_secs_f64();
    Summary {
        scenario: plan.scenario.name(),
        qos: plan.qos as u8,
        payload: plan.payload,
        connections: plan.connections,
        subscribers: n_subs as u32,
        duration_s,
        sent: sent.iter().sum(),
        tally,
        recv_rate: if duration_s > 0.0 { tally.received as f64 / duration_s } else { 0.0 },
        latency: Latency::of(&out.hist),
        connect_failures,
        connects: u64::from(pubs_ok) + subs_ok,
        connect_rate: 0.0,
        foreign: ctx.foreign.load(Relaxed),
    }
}

/// Storm: open every connection as fast as the broker accepts them, hold them, close them.
fn run_storm(plan: Plan) -> Summary {
    let ctx = Arc::new(Ctx::new(plan));
    let plan = &ctx.plan;
    let t0 = ctx.now_ns();
    let (handles, events, phase) = spawn_threads(&ctx, plan.connections);
    let mut hist = run::new_histogram();
    let (mut ok, mut failed, mut last_ns) = (0u64, 0u64, t0);
    let mut errors = Vec::new();
    let setup_deadline = ctx.connect_deadline + Duration::from_secs(1);
    let mut progress = Progress::new();
    while ok + failed < u64::from(plan.connections) {
        let left = setup_deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Event::Storm(Ok((lat_ns, at_ns)))) => {
                ok += 1;
                last_ns = last_ns.max(at_ns);
                hist.saturating_record(lat_ns / 1000);
            }
            Ok(Event::Storm(Err(e))) => {
                failed += 1;
                errors.push(e);
            }
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
            Err(_) => break,
        }
        if progress.last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "coremq-swarm: {:6.1}s connect  {ok} connected, {failed} failed",
                progress.started.elapsed().as_secs_f64()
            );
            progress.last = Instant::now();
        }
    }
    // Connections that never reported by the deadline failed too.
    failed = u64::from(plan.connections) - ok;
    show_errors(&errors);
    let connect_secs = last_ns.saturating_sub(t0) as f64 / 1e9;
    eprintln!(
        "coremq-swarm: {ok} connected, {failed} failed in {connect_secs:.3} s; holding {} s",
        plan.duration.as_secs_f64()
    );
    let hold_until = Instant::now() + plan.duration;
    while Instant::now() < hold_until {
        std::thread::sleep(hold_until.saturating_duration_since(Instant::now()).min(Duration::from_secs(1)));
        if Instant::now() < hold_until {
            eprintln!(
                "coremq-swarm: {:6.1}s hold     {ok} connections open",
                progress.started.elapsed().as_secs_f64()
            );
        }
    }
    phase.send_replace(Phase::Stop);
    let out = join_threads(handles);
    show_errors(&out.errors);
    Summary {
        scenario: plan.scenario.name(),
        qos: plan.qos as u8,
        payload: plan.payload,
        connections: plan.connections,
        subscribers: 0,
        duration_s: plan.duration.as_secs_f64(),
        sent: 0,
        tally: Tally::default(),
        recv_rate: 0.0,
        latency: Latency::of(&hist),
        connect_failures: failed,
        connects: ok,
        connect_rate: if connect_secs > 0.0 { ok as f64 / connect_secs } else { 0.0 },
        foreign: 0,
    }
}
