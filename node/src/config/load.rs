//! Reading the configuration: the file, then `RAFTMQ_*` variables, then validation.

use std::path::Path;

use super::{Config, ConfigError};

const ENV_PREFIX: &str = "RAFTMQ_";

impl Config {
    /// Builds the configuration from an optional file and `RAFTMQ_*` variables in `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut root = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let mut ignored = Vec::new();
        for (key, value) in env {
            let Some(path) = key.strip_prefix(ENV_PREFIX) else { continue };
            // Variables read by the CLI itself (`RAFTMQ_CONFIG`, `RAFTMQ_CTL_*`), not keys.
            if path == "CONFIG" || path.starts_with("CTL_") {
                continue;
            }
            let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            let value = parse_env_value(&value);
            // Kubernetes puts `RAFTMQ_PORT`, `RAFTMQ_SERVICE_HOST`, ... into every pod of a
            // namespace with a Service named `raftmq`: a variable that names no key is
            // skipped (and reported), one that names a key with a bad value stops the start.
            if !names_a_key(&segments, &value) {
                ignored.push(key);
                continue;
            }
            set_path(&mut root, &segments, value).map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))?;
        }
        let mut config: Config = toml::Value::Table(root).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        ignored.sort();
        config.ignored_env = ignored;
        Ok(config)
    }

    /// Rejects values that would make the broker misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        if !(64..=268_435_460).contains(&m.max_packet_size) {
            return bad("mqtt.max_packet_size must be between 64 and 268435460");
        }
        if m.max_connect_packet_size < 64 {
            return bad("mqtt.max_connect_packet_size must be at least 64");
        }
        if m.max_inflight == 0 || m.receive_maximum == 0 {
            return bad("mqtt.max_inflight and mqtt.receive_maximum must be at least 1");
        }
        if m.max_client_id_len < 23 {
            return bad("mqtt.max_client_id_len must be at least 23 (MQTT-3.1.3-5)");
        }
        if m.max_topic_levels == 0 {
            return bad("mqtt.max_topic_levels must be at least 1");
        }
        if !(m.keepalive_multiplier >= 1.0 && m.keepalive_multiplier <= 10.0) {
            return bad("mqtt.keepalive_multiplier must be between 1.0 and 10.0");
        }
        if m.connect_timeout_secs == 0 || m.write_timeout_secs == 0 || m.takeover_timeout_secs == 0 {
            return bad("mqtt timeouts must be at least 1 second");
        }
        if m.max_connections == 0 || m.max_sessions == 0 {
            return bad("mqtt.max_connections and mqtt.max_sessions must be at least 1");
        }
        if m.packet_timeout_secs == 0 {
            return bad("mqtt.packet_timeout_secs must be at least 1");
        }
        self.cluster.validate().map_err(ConfigError::Invalid)?;
        if self.auth.verify_workers == Some(0) {
            return bad("auth.verify_workers must be at least 1");
        }
        for (name, value) in [("username", &self.admin.username), ("password", &self.admin.password), ("api_key", &self.admin.api_key)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                // An empty credential would let anyone in (`Basic Og==`).
                return bad(&format!("admin.{name} must not be empty"));
            }
        }
        for l in &self.listeners {
            if l.is_tls() && (l.certfile.is_none() || l.keyfile.is_none()) {
                return bad("tls and wss listeners need certfile and keyfile");
            }
            if !l.path.starts_with('/') {
                return bad("a WebSocket listener path must start with '/'");
            }
        }
        if self.flapping.enabled && (self.flapping.max_count == 0 || self.flapping.window_secs == 0) {
            return bad("flapping.max_count and flapping.window_secs must be at least 1");
        }
        if self.node_name.is_empty() || self.node_name.contains(['/', '+', '#']) {
            return bad("node_name must be non-empty and contain no '/', '+' or '#'");
        }
        Ok(())
    }
}

/// Whether a variable's key path is a configuration key: its parent is a section (a table
/// holding only an empty parent deserializes), and a table holding only the key
/// deserializes or fails for any reason but an unknown field (a bad value).
fn names_a_key(segments: &[String], value: &toml::Value) -> bool {
    let deserializes = |path: &[String], value: toml::Value| -> Result<(), String> {
        let mut table = toml::Table::new();
        set_path(&mut table, path, value)?;
        toml::Value::Table(table).try_into::<Config>().map(drop).map_err(|e| e.to_string())
    };
    if let Some((_, parent)) = segments.split_last().filter(|(_, parent)| !parent.is_empty()) {
        if deserializes(parent, toml::Value::Table(toml::Table::new())).is_err() {
            return false;
        }
    }
    match deserializes(segments, value.clone()) {
        Ok(()) => true,
        Err(e) => !e.contains("unknown field") && !e.contains("empty key"),
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [leaf] => {
            table.insert(leaf.clone(), value);
            Ok(())
        }
        [head, rest @ ..] => {
            let entry = table.entry(head.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(format!("{head} is not a section")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn defaults_work_without_a_file() {
        let c = Config::load(None, Vec::new()).ok();
        assert_eq!(c, Some(Config::default()));
    }

    #[test]
    fn env_overrides_file_and_nested_keys() {
        let dir = std::env::temp_dir().join(format!("raftmq-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let file = dir.join("raftmq.toml");
        std::fs::write(&file, "node_name = \"a\"\n[mqtt]\nmax_inflight = 8\n").ok();
        let env = vec![
            ("RAFTMQ_MQTT__MAX_INFLIGHT".to_string(), "64".to_string()),
            ("RAFTMQ_DATA_DIR".to_string(), "/tmp/x".to_string()),
            ("OTHER".to_string(), "1".to_string()),
        ];
        let c = Config::load(Some(&file), env).ok();
        assert_eq!(c.as_ref().map(|c| c.mqtt.max_inflight), Some(64));
        assert_eq!(c.as_ref().map(|c| c.node_name.as_str()), Some("a"));
        assert_eq!(c.as_ref().map(|c| c.data_dir.clone()), Some(PathBuf::from("/tmp/x")));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Issue 10, defect 15: Kubernetes' service variables do not stop the start.
    #[test]
    fn variables_naming_no_key_are_skipped_and_listed() {
        let env = vec![
            ("RAFTMQ_PORT".to_string(), "tcp://10.0.0.1:1883".to_string()),
            ("RAFTMQ_SERVICE_HOST".to_string(), "10.0.0.1".to_string()),
            ("RAFTMQ_PORT_1883_TCP_ADDR".to_string(), "10.0.0.1".to_string()),
            ("RAFTMQ_BIN".to_string(), "/usr/bin/raftmq".to_string()),
            ("RAFTMQ_MQTT__NO_SUCH_KEY".to_string(), "1".to_string()),
            ("RAFTMQ_LOG__LEVEL".to_string(), "debug".to_string()),
            ("RAFTMQ_MQTT__MAX_INFLIGHT".to_string(), "64".to_string()),
        ];
        let c = Config::load(None, env);
        assert!(c.is_ok(), "{c:?}");
        let c = c.unwrap_or_default();
        assert_eq!(c.mqtt.max_inflight, 64);
        assert_eq!(
            c.ignored_env,
            [
                "RAFTMQ_BIN",
                "RAFTMQ_LOG__LEVEL",
                "RAFTMQ_MQTT__NO_SUCH_KEY",
                "RAFTMQ_PORT",
                "RAFTMQ_PORT_1883_TCP_ADDR",
                "RAFTMQ_SERVICE_HOST"
            ]
        );
    }

    #[test]
    fn bad_values_are_refused_with_a_message() {
        let err = Config::load(None, vec![("RAFTMQ_MQTT__MAX_INFLIGHT".into(), "0".into())]).err();
        assert!(err.is_some_and(|e| e.to_string().contains("max_inflight")));
        let err = Config::load(None, vec![("RAFTMQ_MQTT__MAX_INFLIGHT".into(), "many".into())]).err();
        assert!(err.is_some_and(|e| e.to_string().contains("max_inflight")));
        let err = Config::load(Some(Path::new("/nonexistent/raftmq.toml")), Vec::new()).err();
        assert!(matches!(err, Some(ConfigError::Read { .. })));
    }
}
