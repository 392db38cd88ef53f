//! Who may connect and what they may touch: password files written by `coremq passwd` and by the real
//! `mosquitto_passwd`, per-listener anonymous access, and mosquitto-format ACL files, all against the
//! real binary with rumqttc, mosquitto_pub/sub and raw sockets.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::raw::{self, Connect, Pkt, Raw, Recv};
use common::tools;
use common::{
    client, client_with, coremq_bin, free_port, qos, temp_dir, use_mosquitto, Backend, Broker, ClientOpts,
    SILENCE, WAIT,
};
use rumqttc::SubscribeReasonCode;

backend_tests!(
    passwords_admit_and_refuse,
    anonymous_is_a_per_listener_choice,
    acl_rules_apply_everywhere,
    sighup_reloads_without_dropping_connections,
);

/// Runs `coremq passwd ARGS` with `stdin` fed to it; returns (success, stderr).
fn passwd(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(coremq_bin())
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coremq passwd");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("coremq passwd output");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn have_mosquitto_passwd() -> bool {
    Command::new("mosquitto_passwd").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Starts coremq from a config file in `dir` with one listener and the given `[auth]` files (names
/// relative to `dir`, as the config resolves them).
fn start(
    b: Backend,
    dir: &Path,
    allow_anonymous: bool,
    password_file: Option<&str>,
    acl_file: Option<&str>,
) -> Broker {
    let port = free_port();
    let mut conf = format!(
        "threads = 2\nbackend = \"{}\"\n\n[[listener]]\nbind = \"127.0.0.1:{port}\"\nallow_anonymous = {allow_anonymous}\n",
        b.as_str()
    );
    if password_file.is_some() || acl_file.is_some() {
        conf.push_str("\n[auth]\n");
    }
    if let Some(p) = password_file {
        conf.push_str(&format!("password_file = \"{p}\"\n"));
    }
    if let Some(a) = acl_file {
        conf.push_str(&format!("acl_file = \"{a}\"\n"));
    }
    let path = dir.join("coremq.toml");
    std::fs::write(&path, conf).expect("write config");
    Broker::start_coremq_args(&["--config".to_string(), path.display().to_string()], port)
}

/// A raw CONNECT with credentials; returns the CONNACK code, and the connection if it was accepted.
async fn try_connect(port: u16, id: &str, user: Option<&str>, password: Option<&str>) -> (u8, Option<Raw>) {
    let mut c = Connect::new(id, true);
    c.username = user.map(str::to_string);
    c.password = password.map(|p| p.as_bytes().to_vec());
    let mut r = Raw::tcp(port).await;
    r.send(&c.encode()).await;
    match r.recv().await {
        Pkt::ConnAck { code: 0, .. } => (0, Some(r)),
        Pkt::ConnAck { code, .. } => {
            // A refused client is closed right after its CONNACK.
            r.expect_closed(WAIT).await;
            (code, None)
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
}

fn creds(user: &str, password: &str) -> ClientOpts {
    ClientOpts { credentials: Some((user.into(), password.into())), ..Default::default() }
}

fn pw_file(dir: &Path) -> PathBuf {
    dir.join("passwd")
}

async fn passwords_admit_and_refuse(b: Backend) {
    if use_mosquitto() {
        eprintln!("auth: coremq's own config and passwd tool; skipped under mosquitto");
        return;
    }
    let dir = temp_dir("auth-pw");
    let file = pw_file(&dir);
    let f = file.to_str().expect("utf-8 path");
    // Three ways in: -c -b, a password on stdin, and the real mosquitto_passwd editing our file.
    assert_eq!(passwd(&["-c", "-b", f, "alice", "alice-pw"], ""), (true, String::new()));
    let (ok, err) = passwd(&[f, "carol"], "carol-pw\n");
    assert!(ok, "password from stdin: {err}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).expect("stat").permissions());
    assert_eq!(mode & 0o777, 0o600, "a created password file is readable by its owner only");
    let text = std::fs::read_to_string(&file).expect("read passwd");
    assert!(text.contains("alice:$7$") && text.contains("carol:$7$"), "{text}");
    assert!(!text.contains("alice-pw") && !text.contains("carol-pw"), "no plaintext in the file");
    let bob_pw = if have_mosquitto_passwd() {
        let st = Command::new("mosquitto_passwd")
            .args(["-b", f, "bob", "bob-pw"])
            .status()
            .expect("mosquitto_passwd");
        assert!(st.success(), "mosquitto_passwd edits the file coremq wrote");
        "bob-pw"
    } else {
        eprintln!("auth: mosquitto_passwd not installed; bob added by coremq passwd");
        assert!(passwd(&["-b", f, "bob", "bob-pw"], "").0);
        "bob-pw"
    };
    // Errors are one line and change nothing.
    let (ok, err) = passwd(&["-D", f, "nobody"], "");
    assert!(!ok && err.contains("nobody") && err.lines().count() == 1, "{err}");
    let (ok, err) = passwd(&["-b", dir.join("missing").to_str().expect("utf-8"), "x", "y"], "");
    assert!(!ok && err.contains("cannot read"), "{err}");
    // Delete, then add back: the file stays loadable throughout.
    assert!(passwd(&["-b", f, "dave", "dave-pw"], "").0);
    assert!(passwd(&["-D", f, "dave"], "").0);
    assert!(!std::fs::read_to_string(&file).expect("read").contains("dave:"));

    let broker = start(b, &dir, false, Some("passwd"), None);
    let port = broker.port;
    let mut alice = client_with(port, "pw-alice", creds("alice", "alice-pw")).await;
    alice.subscribe("pw/#", qos(1)).await;
    let out =
        tools::mosquitto_pub(port, &["-u", "bob", "-P", bob_pw, "-t", "pw/bob", "-m", "from-bob", "-q", "1"])
            .await;
    assert_eq!(out.code, Some(0), "mosquitto_pub as bob: {out:?}");
    assert_eq!(&alice.recv().await.payload[..], b"from-bob");
    let (code, carol) = try_connect(port, "pw-carol", Some("carol"), Some("carol-pw")).await;
    assert_eq!(code, 0, "carol's password came from stdin");
    carol.expect("accepted").disconnect().await;

    // MQTT 3.1.1: a refused login gets CONNACK 0x05 (mosquitto's code) and is closed.
    assert_eq!(try_connect(port, "pw-x1", Some("alice"), Some("wrong")).await.0, 5, "wrong password");
    assert_eq!(try_connect(port, "pw-x2", Some("alice"), None).await.0, 5, "no password");
    assert_eq!(try_connect(port, "pw-x3", Some("mallory"), Some("alice-pw")).await.0, 5, "unknown user");
    assert_eq!(try_connect(port, "pw-x4", Some("dave"), Some("dave-pw")).await.0, 5, "deleted user");
    assert_eq!(try_connect(port, "pw-x5", None, None).await.0, 5, "anonymous on a listener that refuses it");
    let out = tools::mosquitto_pub(port, &["-u", "bob", "-P", "nope", "-t", "pw/bob", "-m", "x"]).await;
    assert_ne!(out.code, Some(0), "mosquitto_pub with a wrong password fails");
    // A reconnect with a cached credential still checks the password.
    assert_eq!(try_connect(port, "pw-x6", Some("alice"), Some("alice-pw!")).await.0, 5);
    assert_eq!(try_connect(port, "pw-ok", Some("alice"), Some("alice-pw")).await.0, 0);
    alice.publish("pw/after", qos(1), false, "still-here").await;
    assert_eq!(&alice.recv().await.payload[..], b"still-here", "refusals disturbed nobody");
    alice.disconnect().await;

    let st = broker.stop();
    assert!(st.status.success(), "{st:?}");
    let refused = st.stdout.lines().find(|l| l.trim_start().starts_with("refused:") && !l.contains("core"));
    eprintln!("auth: {}", st.stdout);
    assert!(
        st.stdout.contains("bad username or password 6") && st.stdout.contains("anonymous not allowed 1"),
        "refusals counted by reason: {refused:?}\n{}",
        st.stdout
    );
    for secret in ["alice-pw", "bob-pw", "carol-pw", "wrong", "nope"] {
        assert!(!st.stdout.contains(secret) && !st.stderr.contains(secret), "{secret} appeared in the log");
    }
    assert!(st.stderr.contains("password file") && st.stderr.contains("(3 users)"), "{}", st.stderr);
}

async fn anonymous_is_a_per_listener_choice(b: Backend) {
    if use_mosquitto() {
        return;
    }
    let dir = temp_dir("auth-anon");
    let f = pw_file(&dir);
    assert!(passwd(&["-c", "-b", f.to_str().expect("utf-8"), "alice", "alice-pw"], "").0);
    // With a password file and allow_anonymous = true: no username is fine, a wrong password is not.
    let broker = start(b, &dir, true, Some("passwd"), None);
    let port = broker.port;
    let mut anon = client(port, "anon-1").await;
    anon.subscribe("anon/t", qos(0)).await;
    assert_eq!(try_connect(port, "anon-2", Some("alice"), Some("bad")).await.0, 5);
    let (code, c) = try_connect(port, "anon-3", Some("alice"), Some("alice-pw")).await;
    assert_eq!(code, 0);
    let mut c = c.expect("accepted");
    c.send(&raw::publish("anon/t", 0, false, false, 0, b"hi")).await;
    assert_eq!(&anon.recv().await.payload[..], b"hi");
    c.disconnect().await;
    anon.disconnect().await;
    drop(broker);

    // No password file, allow_anonymous = false: everyone is refused (mosquitto's behaviour).
    let dir = temp_dir("auth-closed");
    let broker = start(b, &dir, false, None, None);
    assert_eq!(try_connect(broker.port, "closed-1", None, None).await.0, 5);
    assert_eq!(try_connect(broker.port, "closed-2", Some("alice"), Some("alice-pw")).await.0, 5);
}

const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite sensors/#
topic deny sensors/secret

user bob
topic write sensors/#
topic read alerts/#

user carol
topic read #

pattern readwrite clients/%c/#
pattern read users/%u/inbox
";

fn granted(q: rumqttc::QoS) -> Vec<SubscribeReasonCode> {
    vec![SubscribeReasonCode::Success(q)]
}

async fn acl_rules_apply_everywhere(b: Backend) {
    if use_mosquitto() {
        return;
    }
    let dir = temp_dir("auth-acl");
    let f = pw_file(&dir);
    let f = f.to_str().expect("utf-8");
    assert!(passwd(&["-c", "-b", f, "alice", "a"], "").0);
    assert!(passwd(&["-b", f, "bob", "b"], "").0);
    assert!(passwd(&["-b", f, "carol", "c"], "").0);
    std::fs::write(dir.join("acl"), ACL).expect("write acl");
    let broker = start(b, &dir, true, Some("passwd"), Some("acl"));
    let port = broker.port;

    // Subscriptions: allowed ones are granted, the others get 0x80 (3.1.1).
    let mut alice = client_with(port, "alice-1", creds("alice", "a")).await;
    assert_eq!(alice.subscribe_codes("sensors/#", qos(1)).await, granted(qos(1)));
    assert_eq!(
        alice.subscribe_codes("public/#", qos(1)).await,
        vec![SubscribeReasonCode::Failure],
        "anonymous rule"
    );
    assert_eq!(
        alice.subscribe_codes("#", qos(1)).await,
        vec![SubscribeReasonCode::Failure],
        "wider than sensors/#"
    );
    assert_eq!(alice.subscribe_codes("clients/alice-1/#", qos(1)).await, granted(qos(1)), "pattern %c");
    assert_eq!(alice.subscribe_codes("clients/other/#", qos(1)).await, vec![SubscribeReasonCode::Failure]);
    assert_eq!(alice.subscribe_codes("users/alice/inbox", qos(1)).await, granted(qos(1)), "pattern %u");
    assert_eq!(alice.subscribe_codes("users/bob/inbox", qos(1)).await, vec![SubscribeReasonCode::Failure]);
    let mut carol = client_with(port, "carol-1", creds("carol", "c")).await;
    assert_eq!(carol.subscribe_codes("#", qos(1)).await, granted(qos(1)));
    let mut anon = client(port, "anon-acl").await;
    assert_eq!(anon.subscribe_codes("public/#", qos(0)).await, granted(qos(0)));
    assert_eq!(anon.subscribe_codes("sensors/#", qos(0)).await, vec![SubscribeReasonCode::Failure]);

    // Publishing: bob may write sensors/#; a denied PUBLISH is acknowledged (3.1.1) but goes nowhere.
    let mut bob = client_with(port, "bob-1", creds("bob", "b")).await;
    bob.publish("sensors/t1", qos(1), false, "ok-1").await;
    assert_eq!(&alice.recv().await.payload[..], b"ok-1");
    assert_eq!(&carol.recv().await.payload[..], b"ok-1");
    bob.publish("alerts/x", qos(1), false, "denied-write").await;
    // alice may read sensors/# but not sensors/secret (deny wins); carol reads everything.
    bob.publish("sensors/secret", qos(1), false, "secret-1").await;
    assert_eq!(&carol.recv().await.payload[..], b"secret-1");
    bob.publish("sensors/t2", qos(1), false, "ok-2").await;
    assert_eq!(&alice.recv().await.payload[..], b"ok-2", "alice never saw alerts/x nor sensors/secret");
    assert_eq!(&carol.recv().await.payload[..], b"ok-2", "carol never saw the denied alerts/x");
    // alice's own write to sensors/secret is denied too.
    alice.publish("sensors/secret", qos(1), false, "secret-2").await;
    let out = tools::mosquitto_pub(port, &["-u", "bob", "-P", "b", "-t", "sensors/t3", "-m", "ok-3"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(&carol.recv().await.payload[..], b"ok-3", "secret-2 never arrived");
    assert_eq!(&alice.recv().await.payload[..], b"ok-3");
    // Anonymous clients have only their section: they may not publish anything.
    anon.publish("public/news", qos(1), false, "anon-write").await;

    // Retained messages delivered on subscribe are checked too.
    bob.publish("sensors/r/secret", qos(1), true, "retained-ok").await;
    bob.publish("sensors/secret", qos(1), true, "retained-secret").await;
    let mut alice2 = client_with(port, "alice-2", creds("alice", "a")).await;
    assert_eq!(alice2.subscribe_codes("sensors/#", qos(1)).await, granted(qos(1)));
    assert_eq!(&alice2.recv().await.payload[..], b"retained-ok");
    // Drain what carol and alice got from the retained publishes.
    assert_eq!(&carol.recv().await.payload[..], b"retained-ok");
    assert_eq!(&carol.recv().await.payload[..], b"retained-secret");
    assert_eq!(&alice.recv().await.payload[..], b"retained-ok");

    // Wills: bob may write sensors/# but not alerts/#.
    for (id, topic) in [("bob-will-ok", "sensors/will"), ("bob-will-denied", "alerts/will")] {
        let mut c = Connect::new(id, true);
        c.username = Some("bob".into());
        c.password = Some(b"b".to_vec());
        c.will = Some((topic.into(), b"gone".to_vec(), 1, false));
        let mut r = Raw::tcp(port).await;
        r.send(&c.encode()).await;
        assert!(matches!(r.recv().await, Pkt::ConnAck { code: 0, .. }));
        r.reset();
    }
    for c in [&mut carol, &mut alice, &mut alice2] {
        let m = c.recv().await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("sensors/will", &b"gone"[..]), "{}", c.id);
    }
    // Nothing else reaches carol (the denied will, anon's write), nor alice2 beyond the retained one.
    let mut probe = Raw::connect_with(port, &{
        let mut c = Connect::new("carol-probe", true);
        c.username = Some("carol".into());
        c.password = Some(b"c".to_vec());
        c
    })
    .await
    .0;
    assert_eq!(probe.subscribe(1, &[("alerts/#", 1), ("public/#", 1)]).await, vec![1, 1]);
    match probe.try_recv(SILENCE).await {
        Recv::Timeout => {}
        other => panic!("a denied will or PUBLISH was routed: {other:?}"),
    }
    carol.expect_nothing_now();
    alice.expect_nothing_now();
    alice2.expect_nothing_now();
    for c in [alice, alice2, bob, carol, anon] {
        c.disconnect().await;
    }
    probe.disconnect().await;

    let st = broker.stop();
    assert!(st.status.success(), "{st:?}");
    let all = st.stdout.lines().find(|l| l.starts_with("all:")).expect("all: line");
    // Denied: 5 subscriptions, 3 PUBLISHes (alerts/x by bob, sensors/secret by alice, public/news by an
    // anonymous client) and one will.
    assert_eq!(common::stat_value(all, "denied"), Some(9), "{all}");
}

/// Polls (≤ 5 s) until a CONNECT as `user` gets `want` (the reload is applied by each core's sweeper).
async fn until_connack(port: u16, user: &str, password: &str, want: u8) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut i = 0;
    loop {
        i += 1;
        let (code, c) = try_connect(port, &format!("hup-{user}-{i}"), Some(user), Some(password)).await;
        if let Some(c) = c {
            c.disconnect().await;
        }
        if code == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{user}: CONNACK {code}, want {want} after SIGHUP");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn sighup_reloads_without_dropping_connections(b: Backend) {
    if use_mosquitto() {
        return;
    }
    let dir = temp_dir("auth-hup");
    let f = pw_file(&dir);
    let f = f.to_str().expect("utf-8");
    assert!(passwd(&["-c", "-b", f, "alice", "a"], "").0);
    std::fs::write(dir.join("acl"), "user alice\ntopic readwrite hup/#\n").expect("write acl");
    let broker = start(b, &dir, false, Some("passwd"), Some("acl"));
    let (port, pid) = (broker.port, broker.pid());
    let mut alice = client_with(port, "hup-alice", creds("alice", "a")).await;
    alice.subscribe("hup/#", qos(1)).await;
    assert_eq!(try_connect(port, "hup-erin-0", Some("erin"), Some("e")).await.0, 5);

    // A new user and a narrower ACL: erin gets in, alice stays connected, and her old subscription
    // now only delivers what the new rules let her read.
    assert!(passwd(&["-b", f, "erin", "e"], "").0);
    std::fs::write(
        dir.join("acl"),
        "user alice\ntopic readwrite hup/#\ntopic deny hup/closed\nuser erin\ntopic write hup/#\n",
    )
    .expect("write acl");
    // SAFETY: kill(2) on the broker's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    until_connack(port, "erin", "e", 0).await;
    let (_, erin) = try_connect(port, "hup-erin", Some("erin"), Some("e")).await;
    let mut erin = erin.expect("erin accepted");
    erin.send(&raw::publish("hup/closed", 1, false, false, 1, b"denied-now")).await;
    assert_eq!(erin.recv().await, Pkt::PubAck(1));
    erin.send(&raw::publish("hup/open", 1, false, false, 2, b"open")).await;
    assert_eq!(erin.recv().await, Pkt::PubAck(2));
    assert_eq!(
        &alice.recv().await.payload[..],
        b"open",
        "alice kept her connection; hup/closed not delivered"
    );

    // A reload that fails keeps everything as it was and says so in one line.
    std::fs::write(f, "erin:not-a-hash\n").expect("corrupt passwd");
    // SAFETY: kill(2) on the broker's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    until_connack(port, "erin", "e", 0).await;
    alice.publish("hup/x", qos(1), false, "alive").await;
    assert_eq!(&alice.recv().await.payload[..], b"alive");
    erin.disconnect().await;
    alice.disconnect().await;
    let st = broker.stop();
    assert!(st.status.success(), "{st:?}");
    let lines: Vec<&str> = st.stderr.lines().filter(|l| l.contains("SIGHUP")).collect();
    assert_eq!(lines.len(), 2, "{}", st.stderr);
    assert!(lines[0].contains("reloaded password file") && lines[0].contains("(2 users)"), "{lines:?}");
    assert!(lines[1].contains("reload failed") && lines[1].contains("line 1"), "{lines:?}");
}
