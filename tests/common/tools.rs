//! Helpers running the mosquitto command-line clients with bounded waits.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;

use super::WAIT;

/// Output of a finished command-line client.
#[derive(Debug)]
pub struct ToolOutput {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

/// Runs `mosquitto_pub -h 127.0.0.1 -p PORT <args>` and waits (≤ 10 s) for it to exit.
pub async fn mosquitto_pub(port: u16, args: &[&str]) -> ToolOutput {
    mosquitto_pub_env(port, &[], args).await
}

/// A running `mosquitto_sub` that has received its SUBACK.
pub struct Sub {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

/// Marker put in front of every received message by the `-F` format.
const MSG: &str = "MSG ";

/// Starts `mosquitto_sub -d -F 'MSG %t %p' <args>` and waits until it reports its SUBACK, so
/// that anything published afterwards is guaranteed to be routed to it.
pub async fn mosquitto_sub(port: u16, args: &[&str]) -> Sub {
    // stdbuf: mosquitto_sub block-buffers stdout into a pipe, which would hide the SUBACK
    // line and the messages until it exits.
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port.to_string(), "-d", "-F", "MSG %t %p"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mosquitto_sub");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let wait = async {
        while let Some(l) = lines.next_line().await.expect("read mosquitto_sub") {
            if l.contains("SUBACK") {
                return;
            }
        }
        panic!("mosquitto_sub exited before SUBACK");
    };
    timeout(WAIT, wait).await.expect("mosquitto_sub: no SUBACK");
    Sub { child, lines }
}

impl Sub {
    /// Next received message as "topic payload".
    pub async fn recv(&mut self) -> String {
        let next = async {
            while let Some(l) = self.lines.next_line().await.expect("read mosquitto_sub") {
                if let Some(m) = l.strip_prefix(MSG) {
                    return m.to_string();
                }
            }
            panic!("mosquitto_sub exited while waiting for a message");
        };
        timeout(WAIT, next).await.expect("mosquitto_sub: no message")
    }

    /// Waits (bounded) for the process to exit (e.g. after `-C N`) and returns its code.
    pub async fn wait(mut self) -> Option<i32> {
        timeout(WAIT, self.child.wait())
            .await
            .expect("mosquitto_sub did not exit")
            .expect("wait mosquitto_sub")
            .code()
    }
}

/// Like [`mosquitto_pub`], with extra environment variables for the process (e.g. `OPENSSL_CONF`,
/// which is the only way to cap the TLS version: `--tls-version tlsv1.2` only sets a minimum).
pub async fn mosquitto_pub_env(port: u16, env: &[(&str, &str)], args: &[&str]) -> ToolOutput {
    let child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mosquitto_pub");
    let out = timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("mosquitto_pub did not exit within 10 s")
        .expect("mosquitto_pub output");
    ToolOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Sub {
    /// Next received message as "topic payload" if one arrives within `within`; None on silence or
    /// if the process exited. For showing that something was *not* delivered.
    pub async fn try_recv(&mut self, within: Duration) -> Option<String> {
        let next = async {
            while let Ok(Some(l)) = self.lines.next_line().await {
                if let Some(m) = l.strip_prefix(MSG) {
                    return Some(m.to_string());
                }
            }
            None
        };
        timeout(within, next).await.ok().flatten()
    }
}
