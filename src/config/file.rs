//! The file layer: a TOML file read into its tables' `Given` keys (each table's `Raw` as serde reads it,
//! then every key checked by its row of the table), with every error one line naming the file, the key
//! and the line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Spanned, Value};

use super::keys::{auth, listener, persistence, top, Protocol};
use super::table::Kind;
use super::{ConfigError, Layer, ListenerConfig, Origin, PersistenceConfig};
use crate::tls::TlsFiles;

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes().get(..end).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()) + 1
}

/// The key that the line containing `offset` assigns or the table it opens, for serde errors that
/// name neither.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset.min(text.len()))?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next()?.trim();
    let key = if let Some(header) = line.strip_prefix('[') {
        header.trim_start_matches('[').split(']').next()?
    } else {
        line.split('=').next()?
    };
    let key = key.trim().trim_matches('"').trim_matches('\'');
    (!key.is_empty()).then(|| key.to_string())
}

/// Turns the file's values into checked settings, naming the file, key and line on error.
pub(crate) struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileCtx<'_> {
    fn origin(&self, key: &str, span: std::ops::Range<usize>) -> Origin {
        Origin::File {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            line: line_of(self.text, span.start),
        }
    }

    /// The value of key `prefix` + `name`, if the file sets it, checked by `kind`.
    pub(crate) fn value<T, K: Kind<T>>(
        &self,
        v: &Option<Spanned<Value>>,
        prefix: &str,
        name: &str,
        kind: &K,
    ) -> Result<Option<(T, Origin)>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let origin = self.origin(&format!("{prefix}{name}"), v.span());
        // Relative paths are relative to the config file, so that a config and its files can move together.
        let dir = self.path.parent().unwrap_or(Path::new(""));
        let value = kind.read_file(v.get_ref(), dir).map_err(|m| origin.error(m))?;
        Ok(Some((value, origin)))
    }

    /// Maps toml/serde's multi-line message (with its caret diagram) to one line.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let path = self.path.display();
        let msg = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        let at = e.span().map(|s| s.start);
        let line = at.map(|a| format!(" (line {})", line_of(self.text, a))).unwrap_or_default();
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or(rest);
            // serde's list of expected fields tells which table the key was in.
            let table = if rest.contains("`allow_anonymous`") { " in [[listener]]" } else { "" };
            return ConfigError(format!("config error in {path}: unknown key \"{key}\"{table}{line}"));
        }
        if msg.starts_with("invalid type") || msg.starts_with("invalid length") {
            if let Some(key) = at.and_then(|a| key_at(self.text, a)) {
                return ConfigError(format!("config error in {path}: key \"{key}\": {msg}{line}"));
            }
        }
        ConfigError(format!("config error in {path}: {msg}{line}"))
    }
}

/// Parses and checks the file's values (each on its own); cross-checks happen in `resolve`.
pub(crate) fn parse_file(text: &str, path: &Path) -> Result<Layer, ConfigError> {
    let ctx = FileCtx { path, text };
    let raw: top::Raw = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
    let mut layer = Layer {
        source: Some(path.to_path_buf()),
        top: top::Given::from_file(&raw, &ctx, "")?,
        ..Layer::default()
    };
    if let Some(table) = &raw.persistence {
        let keys = persistence::Given::from_file(table.get_ref(), &ctx, "persistence.")?.keys();
        if keys.enabled {
            let Some(data_dir) = keys.data_dir else {
                return Err(ctx
                    .origin("persistence", table.span())
                    .error("enabled = true needs data_dir = \"PATH\" (where the logs are kept)"));
            };
            layer.persistence = Some(PersistenceConfig {
                data_dir,
                fsync: keys.fsync,
                fsync_interval: Duration::from_millis(keys.fsync_interval_ms),
            });
        }
    }
    if let Some(table) = &raw.auth {
        layer.auth = auth::Given::from_file(table.get_ref(), &ctx, "auth.")?;
    }
    if let Some(tables) = &raw.listener {
        layer.listeners = Some(listeners(&ctx, tables)?);
    }
    Ok(layer)
}

/// The `[[listener]]` tables.
fn listeners(
    ctx: &FileCtx,
    tables: &Spanned<Vec<Spanned<listener::Raw>>>,
) -> Result<Vec<ListenerConfig>, ConfigError> {
    if tables.get_ref().is_empty() {
        return Err(ctx.origin("listener", tables.span()).error(
            "is empty; give at least one [[listener]] table, or leave the key out for 127.0.0.1:1883",
        ));
    }
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for (i, table) in tables.get_ref().iter().enumerate() {
        // Counted from 1, like the tables as a reader sees them in the file.
        let name = format!("listener[{}]", i + 1);
        let given = listener::Given::from_file(table.get_ref(), ctx, &format!("{name}."))?;
        let Some((bind, origin)) = &given.bind else {
            return Err(ctx.origin(&name, table.span()).error("missing key \"bind\" (HOST:PORT)"));
        };
        if let Some(j) = listeners.iter().position(|l| l.bind == *bind) {
            return Err(origin.error(format!("{bind} is already the bind of listener[{}]", j + 1)));
        }
        let keys = given.keys();
        let tls = listener_tls(ctx, &name, table.span(), &given)?;
        listeners.push(ListenerConfig {
            bind: *bind,
            allow_anonymous: keys.allow_anonymous,
            max_connections: keys.max_connections,
            tls,
        });
    }
    Ok(listeners)
}

/// The TLS part of one `[[listener]]`: `protocol`, and the `tls_*` keys `mqtts` needs. The files are read
/// and checked here, so a bad one stops the broker at startup.
fn listener_tls(
    ctx: &FileCtx,
    name: &str,
    span: std::ops::Range<usize>,
    given: &listener::Given,
) -> Result<Option<TlsFiles>, ConfigError> {
    let (cert, key, client_ca) = (&given.tls_cert, &given.tls_key, &given.tls_client_ca);
    let identity = &given.use_identity_as_username;
    if given.keys().protocol == Protocol::Mqtt {
        let stray = [("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)];
        if let Some((k, Some((_, origin)))) = stray.into_iter().find(|(_, f)| f.is_some()) {
            return Err(origin.error(format!("{k} needs protocol = \"mqtts\" in this listener")));
        }
        if let Some((true, origin)) = identity {
            return Err(origin.error("needs protocol = \"mqtts\" and tls_client_ca in this listener"));
        }
        return Ok(None);
    }
    let (Some((cert, origin)), Some((key, _))) = (cert, key) else {
        return Err(ctx.origin(name, span).error("protocol = \"mqtts\" needs tls_cert and tls_key"));
    };
    let use_identity_as_username = match identity {
        Some((true, o)) if client_ca.is_none() => {
            return Err(o.error("needs tls_client_ca: the identity is the client certificate's"))
        }
        Some((v, _)) => *v,
        None => false,
    };
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: client_ca.as_ref().map(|(p, _): &(PathBuf, Origin)| p.clone()),
        use_identity_as_username,
    };
    crate::tls::server_config(&files).map_err(|m| origin.error(m))?;
    Ok(Some(files))
}
