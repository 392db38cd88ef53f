//! Command line and its resolution into a [`Plan`]: which connections exist, what each publishes
//! or subscribes to, and which publisher/subscriber streams the accounting expects.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use coremq::protocol::{ProtocolVersion, QoS};

use crate::stamp::STAMP_LEN;
use crate::tls::Tls;

/// Upper bound on `--connections` / `--subscribers`: a bounded run, and far more than the
/// machine's ephemeral ports or file descriptors allow anyway.
pub const MAX_CONNECTIONS: u32 = 1_000_000;
/// Most publishers a run can have: the stamp carries a 16-bit publisher id.
pub const MAX_PUBLISHERS: u32 = 1 << 16;
/// Upper bound on `--payload`: keeps a batch of publishes from eating gigabytes.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Upper bound on `--duration` and `--warmup`, one day.
pub const MAX_SECS: f64 = 86_400.0;

/// The load shapes the swarm can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// P publishers, each on its own topic, to subscribers on one wildcard filter.
    FanIn,
    /// One publisher to S subscribers of its topic.
    FanOut,
    /// N publisher/subscriber pairs, each on its own topic.
    Pairs,
    /// Publishers to a `$share/g/...` group of S subscribers: each message to one member.
    Shared,
    /// C connections opened as fast as possible, held `--duration`, closed.
    Storm,
    /// D devices publishing on `iot/<device>/telemetry`, K dashboards on `iot/+/telemetry`.
    Iot,
}

impl Scenario {
    /// The name used on the command line and in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::FanIn => "fan-in",
            Scenario::FanOut => "fan-out",
            Scenario::Pairs => "pairs",
            Scenario::Shared => "shared",
            Scenario::Storm => "storm",
            Scenario::Iot => "iot",
        }
    }
}

/// The command line, as clap parses it.
#[derive(Parser, Debug)]
#[command(
    name = "coremq-swarm",
    version,
    about = "Load-tests an MQTT 3.1.1 or 5.0 broker: throughput, loss, duplicates, ordering and end-to-end latency",
    after_help = "Exit status: 0 ok; 1 if a QoS 1/2 run lost a message, a QoS 2 run duplicated one, or \
                  connections failed; 2 for usage errors or an unreachable broker."
)]
pub struct Args {
    /// Scenario (same as --scenario).
    #[arg(value_enum, value_name = "SCENARIO")]
    pub scenario_pos: Option<Scenario>,
    /// Scenario to run.
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,
    /// Broker host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Connect over TLS, verifying the broker against the CA certificate(s) in this PEM file; the
    /// broker's certificate must name --host (an IP SAN for an address).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 16: publisher id, sequence number and send time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per second per publisher; 0 = as fast as the broker takes them.
    /// Default 0, except iot: 1.
    #[arg(long)]
    pub rate: Option<f64>,
    /// The scenario's main count: publishers (fan-in, shared), subscribers (fan-out), pairs,
    /// connections (storm) or devices (iot).
    #[arg(long)]
    pub connections: Option<u32>,
    /// Second count: subscribers of fan-in (default 1), shared group members (default 4),
    /// dashboards of iot (default 1); for fan-out, same as --connections.
    #[arg(long)]
    pub subscribers: Option<u32>,
    /// Measured seconds of load (storm: how long connections are held).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Swarm threads (default: the number of --cpus, else 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin swarm threads round-robin to these cpus, e.g. "0-3,6".
    #[arg(long)]
    pub cpus: Option<String>,
    /// Subscribers use persistent sessions (3.1.1 clean session = false; v5 session expiry 3600 s), so
    /// that a broker with persistence logs every QoS 1/2 delivery.
    #[arg(long)]
    pub persistent: bool,
    /// MQTT version of every connection: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    pub mqtt: String,
    /// Print only the JSON line on stdout (default: human summary, then the JSON line).
    #[arg(long)]
    pub json: bool,
}

/// One publishing connection.
#[derive(Clone, Debug)]
pub struct PubSpec {
    /// Publisher id carried in the stamp; index into [`Plan::publishers`].
    pub id: u32,
    /// Topic it publishes on.
    pub topic: String,
}

/// One subscribing connection.
#[derive(Clone, Debug)]
pub struct SubSpec {
    /// Index into [`Plan::subscriber_specs`].
    pub id: u32,
    /// Filter it subscribes to.
    pub filter: String,
    /// The publishers whose messages this subscription matches: `lo..hi`.
    pub pubs: (u32, u32),
    /// Shared-subscription group: members' trackers are merged and count as one receiver.
    pub group: Option<u32>,
}

/// Everything a run needs, validated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The scenario.
    pub scenario: Scenario,
    /// `host:port` to connect to.
    pub addr: String,
    /// TLS for every connection (`--tls-ca`), or plain TCP.
    pub tls: Option<Tls>,
    /// `--mqtt`: the protocol version of every connection.
    pub version: ProtocolVersion,
    /// `--persistent`: subscribers keep their sessions.
    pub persistent: bool,
    /// QoS of publishes and subscriptions.
    pub qos: QoS,
    /// Payload bytes per message.
    pub payload: usize,
    /// Messages per second per publisher; 0 = unlimited.
    pub rate: f64,
    /// The scenario's main count (publishers, subscribers, pairs, storm connections, devices).
    pub connections: u32,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Swarm threads.
    pub threads: usize,
    /// Cpus to pin the threads to, round-robin; empty = no pinning.
    pub cpus: Vec<usize>,
    /// JSON line only.
    pub json: bool,
    /// Publishing connections (empty for storm).
    pub publishers: Vec<PubSpec>,
    /// Subscribing connections (empty for storm).
    pub subscriber_specs: Vec<SubSpec>,
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    if !(0.0..=MAX_SECS).contains(&v) {
        return Err(format!("--{name} must be between 0 and {MAX_SECS} seconds, not {v}"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn count(name: &str, v: Option<u32>, default: u32) -> Result<u32, String> {
    let v = v.unwrap_or(default);
    if v == 0 || v > MAX_CONNECTIONS {
        return Err(format!("--{name} must be between 1 and {MAX_CONNECTIONS}, not {v}"));
    }
    Ok(v)
}

impl Args {
    /// Validates the arguments and builds the run's topology. Errors are one line, without the
    /// program name.
    pub fn plan(&self) -> Result<Plan, String> {
        let scenario = match (self.scenario_pos, self.scenario) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!("two scenarios given: {} and {}", a.name(), b.name()))
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => {
                return Err("no scenario given: fan-in, fan-out, pairs, shared, storm or iot".to_string())
            }
        };
        let version = match self.mqtt.as_str() {
            "3.1.1" | "4" => ProtocolVersion::V3_1_1,
            "5" | "5.0" => ProtocolVersion::V5,
            other => return Err(format!("unknown MQTT version \"{other}\": use 3.1.1 or 5")),
        };
        let qos = QoS::from_u8(self.qos).ok_or_else(|| format!("bad --qos {}", self.qos))?;
        if self.payload < STAMP_LEN || self.payload > MAX_PAYLOAD {
            return Err(format!(
                "--payload must be between {STAMP_LEN} and {MAX_PAYLOAD} bytes, not {}",
                self.payload
            ));
        }
        let rate = self.rate.unwrap_or(if scenario == Scenario::Iot { 1.0 } else { 0.0 });
        if !rate.is_finite() || !(0.0..=10_000_000.0).contains(&rate) {
            return Err(format!("--rate must be between 0 and 10000000 msgs/s, not {rate}"));
        }
        let tls = match &self.tls_ca {
            Some(ca) => Some(Tls::new(ca, &self.host)?),
            None => None,
        };
        let duration = secs("duration", self.duration)?;
        let warmup = secs("warmup", self.warmup)?;
        let cpus = match &self.cpus {
            Some(list) => coremq::cpus::parse_cpu_list(list)?,
            None => Vec::new(),
        };
        let threads = self.threads.unwrap_or(if cpus.is_empty() { 1 } else { cpus.len() });
        if threads == 0 || threads > 1024 {
            return Err(format!("--threads must be between 1 and 1024, not {threads}"));
        }

        let (connections, subscribers) = match scenario {
            Scenario::FanIn => {
                (count("connections", self.connections, 8)?, count("subscribers", self.subscribers, 1)?)
            }
            Scenario::FanOut => {
                let s = count("subscribers", self.subscribers.or(self.connections), 16)?;
                (s, s)
            }
            Scenario::Pairs => (count("connections", self.connections, 16)?, 0),
            Scenario::Shared => {
                (count("connections", self.connections, 8)?, count("subscribers", self.subscribers, 4)?)
            }
            Scenario::Storm => (count("connections", self.connections, 1000)?, 0),
            Scenario::Iot => {
                (count("connections", self.connections, 100)?, count("subscribers", self.subscribers, 1)?)
            }
        };

        let n_pubs = match scenario {
            Scenario::FanIn | Scenario::Pairs | Scenario::Shared | Scenario::Iot => connections,
            Scenario::FanOut => 1,
            Scenario::Storm => 0,
        };
        if n_pubs > MAX_PUBLISHERS {
            return Err(format!("at most {MAX_PUBLISHERS} publishers per run, not {n_pubs}"));
        }
        // Topics carry the pid so that concurrent or back-to-back runs on one broker never see
        // each other's traffic (the stamp's run tag catches whatever still gets through).
        let pid = std::process::id();
        let mut publishers = Vec::new();
        let mut subs = Vec::new();
        let mut add_sub = |filter: String, pubs: (u32, u32), group: Option<u32>| {
            let id = subs.len() as u32;
            subs.push(SubSpec { id, filter, pubs, group });
        };
        match scenario {
            Scenario::FanIn => {
                for p in 0..connections {
                    publishers.push(PubSpec { id: p, topic: format!("swarm/{pid}/fan-in/{p}") });
                }
                for _ in 0..subscribers {
                    add_sub(format!("swarm/{pid}/fan-in/+"), (0, connections), None);
                }
            }
            Scenario::FanOut => {
                publishers.push(PubSpec { id: 0, topic: format!("swarm/{pid}/fan-out") });
                for _ in 0..subscribers {
                    add_sub(format!("swarm/{pid}/fan-out"), (0, 1), None);
                }
            }
            Scenario::Pairs => {
                for p in 0..connections {
                    publishers.push(PubSpec { id: p, topic: format!("swarm/{pid}/pairs/{p}") });
                    add_sub(format!("swarm/{pid}/pairs/{p}"), (p, p + 1), None);
                }
            }
            Scenario::Shared => {
                for p in 0..connections {
                    publishers.push(PubSpec { id: p, topic: format!("swarm/{pid}/shared/{p}") });
                }
                for _ in 0..subscribers {
                    add_sub(format!("$share/g/swarm/{pid}/shared/+"), (0, connections), Some(0));
                }
            }
            Scenario::Storm => {}
            Scenario::Iot => {
                for d in 0..connections {
                    publishers.push(PubSpec { id: d, topic: format!("iot/swarm-{pid}-{d}/telemetry") });
                }
                for _ in 0..subscribers {
                    add_sub("iot/+/telemetry".to_string(), (0, connections), None);
                }
            }
        }
        Ok(Plan {
            scenario,
            addr: format!("{}:{}", self.host, self.port),
            tls,
            version,
            persistent: self.persistent,
            qos,
            payload: self.payload,
            rate,
            connections,
            duration,
            warmup,
            threads,
            cpus,
            json: self.json,
            publishers,
            subscriber_specs: subs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut v = vec!["coremq-swarm"];
        v.extend_from_slice(args);
        Args::try_parse_from(v).map_err(|e| e.to_string())?.plan()
    }

    #[test]
    fn scenario_positional_or_flag() {
        assert_eq!(plan(&["pairs"]).unwrap().scenario, Scenario::Pairs);
        assert_eq!(plan(&["--scenario", "fan-in"]).unwrap().scenario, Scenario::FanIn);
        assert!(plan(&["pairs", "--scenario", "fan-in"]).is_err());
        assert!(plan(&[]).is_err());
    }

    #[test]
    fn topologies() {
        let p = plan(&["fan-in", "--connections", "3"]).unwrap();
        assert_eq!(p.publishers.len(), 3);
        assert_eq!(p.subscriber_specs.len(), 1);
        assert_eq!(p.subscriber_specs[0].pubs, (0, 3));

        let p = plan(&["fan-out", "--subscribers", "5"]).unwrap();
        assert_eq!((p.publishers.len(), p.subscriber_specs.len()), (1, 5));

        let p = plan(&["pairs", "--connections", "4"]).unwrap();
        assert_eq!(p.subscriber_specs[2].pubs, (2, 3));
        assert_eq!(p.subscriber_specs[2].filter, p.publishers[2].topic);

        let p = plan(&["shared", "--connections", "2", "--subscribers", "3"]).unwrap();
        assert!(p.subscriber_specs.iter().all(|s| s.group == Some(0) && s.filter.starts_with("$share/g/")));

        let p = plan(&["iot", "--connections", "10"]).unwrap();
        assert_eq!(p.rate, 1.0);
        assert_eq!(p.publishers[7].topic, format!("iot/swarm-{}-7/telemetry", std::process::id()));
        assert!(plan(&["iot", "--connections", "65537"]).unwrap_err().contains("publishers"));

        let p = plan(&["storm", "--connections", "10"]).unwrap();
        assert!(p.publishers.is_empty() && p.subscriber_specs.is_empty());
    }

    #[test]
    fn usage_errors() {
        assert!(plan(&["pairs", "--payload", "15"]).unwrap_err().contains("--payload"));
        assert_eq!(plan(&["pairs", "--mqtt", "5"]).unwrap().version, ProtocolVersion::V5);
        assert!(plan(&["pairs", "--mqtt", "6"]).unwrap_err().contains("unknown MQTT version"));
        assert!(plan(&["pairs", "--qos", "3"]).is_err());
        assert!(plan(&["pairs", "--connections", "0"]).is_err());
        assert!(plan(&["pairs", "--cpus", "3-1"]).is_err());
        assert!(plan(&["pairs", "--rate", "-1"]).is_err());
        assert_eq!(plan(&["pairs", "--cpus", "0-2"]).unwrap().threads, 3);
        assert!(plan(&["pairs", "--tls-ca", "/nonexistent/ca.pem"]).unwrap_err().starts_with("--tls-ca "));
        assert!(plan(&["pairs"]).unwrap().tls.is_none());
    }
}
