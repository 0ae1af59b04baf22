//! `raftmq ctl`: the admin API from the command line. Human tables by default, `--json`
//! for scripts. Address and credentials come from flags or `RAFTMQ_CTL_*` variables.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where and how to reach the admin API.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(long, env = "RAFTMQ_CTL_URL", default_value = "http://127.0.0.1:18083")]
    url: String,
    /// API key (sent as a bearer token).
    #[arg(long, env = "RAFTMQ_CTL_API_KEY")]
    api_key: Option<String>,
    /// User name for basic authentication.
    #[arg(long, env = "RAFTMQ_CTL_USERNAME")]
    username: Option<String>,
    /// Password for basic authentication.
    #[arg(long, env = "RAFTMQ_CTL_PASSWORD")]
    password: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Node information and statistics.
    Status,
    /// Exits 0 when the node answers `/healthz` (with `--ready`: `/readyz`) with 200; for
    /// container health checks (images without curl).
    Health {
        /// Ask `/readyz`: serving, and in a cluster with a Raft leader.
        #[arg(long)]
        ready: bool,
    },
    /// The nodes of the cluster and how this one sees them; join or leave.
    Cluster {
        #[command(subcommand)]
        action: Option<ClusterAction>,
    },
    /// Connected clients.
    Clients {
        #[command(subcommand)]
        action: ClientAction,
    },
    /// Sessions, online and offline.
    Sessions {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Subscriptions.
    Subscriptions {
        #[command(subcommand)]
        action: SubscriptionAction,
    },
    /// Retained messages.
    Retained {
        #[command(subcommand)]
        action: RetainedAction,
    },
    /// Bans.
    Bans {
        #[command(subcommand)]
        action: BanAction,
    },
    /// Change the node's log filter at run time (RUST_LOG syntax).
    LogLevel {
        /// New filter, for example `info,raftmq_node=debug`.
        filter: String,
    },
    /// Publish a message.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload (UTF-8).
        payload: String,
        /// QoS 0, 1 or 2.
        #[arg(long, default_value_t = 0)]
        qos: u8,
        /// Retain the message.
        #[arg(long)]
        retain: bool,
    },
}

#[derive(Debug, Args)]
struct Paging {
    /// Page number (from 1).
    #[arg(long)]
    page: Option<usize>,
    /// Entries per page.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum ClientAction {
    /// List connected clients.
    List {
        #[command(flatten)]
        paging: Paging,
        /// Only this user name.
        #[arg(long)]
        username: Option<String>,
        /// Only client ids starting with this.
        #[arg(long)]
        client_id: Option<String>,
    },
    /// Show one client.
    Show { client_id: String },
    /// Disconnect a client (its persistent session stays).
    Kick { client_id: String },
}

#[derive(Debug, Subcommand)]
enum ClusterAction {
    /// Links this node with the node at ADDR (its cluster address, host:port); a node
    /// that belongs to no Raft group yet joins that node's group.
    Join { address: String },
    /// Removes NODE (a node name) from the Raft group; stop that node first.
    Leave { node: String },
}

#[derive(Debug, Subcommand)]
enum SessionAction {
    /// List sessions.
    List {
        #[command(flatten)]
        paging: Paging,
    },
    /// Show one session.
    Show { client_id: String },
    /// End a session (disconnecting its client).
    Discard { client_id: String },
}

#[derive(Debug, Subcommand)]
enum SubscriptionAction {
    /// List subscriptions.
    List {
        #[command(flatten)]
        paging: Paging,
        /// Only this client.
        #[arg(long)]
        client_id: Option<String>,
        /// Only subscriptions matching this topic name.
        #[arg(long)]
        topic: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum RetainedAction {
    /// List retained messages.
    List {
        #[command(flatten)]
        paging: Paging,
        /// Topic filter (default `#`).
        #[arg(long)]
        filter: Option<String>,
    },
    /// Show the retained message of a topic.
    Show { topic: String },
    /// Delete the retained message of a topic.
    Delete { topic: String },
}

#[derive(Debug, Subcommand)]
enum BanAction {
    /// List bans.
    List,
    /// Ban `client:ID`, `user:NAME` or `ip:ADDRESS[/PREFIX]`.
    Add {
        who: String,
        /// Ban length in seconds (default: forever).
        #[arg(long = "for")]
        duration: Option<u64>,
    },
    /// Lift a ban.
    Delete { who: String },
}

/// Percent-encodes a path segment (keeping `/` when `keep_slash`).
fn encode(segment: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v, false)))).collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

struct Client {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
}

impl Client {
    fn new(args: &CtlArgs) -> Client {
        use base64::Engine;
        let config = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build();
        let auth = match (&args.api_key, &args.username, &args.password) {
            (Some(key), _, _) => Some(format!("Bearer {key}")),
            (None, Some(u), Some(p)) => Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))),
            _ => None,
        };
        Client { agent: config.into(), base: args.url.trim_end_matches('/').to_owned(), auth }
    }

    /// `GET` of a probe (`/healthz`, `/readyz`): its status and body.
    fn probe(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let auth = self.auth.clone().unwrap_or_default();
        let mut response =
            self.agent.get(&url).header("Authorization", &auth).call().with_context(|| format!("cannot reach {}", self.base))?;
        Ok((response.status().as_u16(), response.body_mut().read_to_string().unwrap_or_default()))
    }

    /// Calls the API; returns the JSON body (null for 204) or fails with the API's message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let auth = self.auth.clone().unwrap_or_default();
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            ("POST", Some(b)) => self.agent.post(&url).header("Authorization", &auth).send_json(&b),
            ("PUT", Some(b)) => self.agent.put(&url).header("Authorization", &auth).send_json(&b),
            _ => bail!("unsupported request {method} {path}"),
        };
        let mut response = response.with_context(|| format!("cannot reach {}", self.base))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let message = value.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| value.to_string());
            bail!("{} {}: {message}", status.as_u16(), status.canonical_reason().unwrap_or(""));
        }
        Ok(value)
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints rows of objects as an aligned table of `columns`.
fn table(rows: &[Value], columns: &[&str]) {
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| cell(&r[*c])).collect()).collect();
    let widths: Vec<usize> =
        columns.iter().enumerate().map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.len()]).max().unwrap_or(0)).collect();
    let line = |values: Vec<String>| {
        values.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    println!("{}", line(columns.iter().map(|c| c.to_uppercase()).collect()));
    for row in cells {
        println!("{}", line(row));
    }
}

fn fields(value: &Value) {
    if let Some(map) = value.as_object() {
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in map {
            println!("{k:<width$}  {}", cell(v));
        }
    }
}

/// How a response is shown without `--json`.
type Render = Box<dyn Fn(&Value)>;

/// Runs a `raftmq ctl` command.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let client = Client::new(&args);
    let paging = |p: &Paging| vec![("page", p.page.map(|v| v.to_string())), ("limit", p.limit.map(|v| v.to_string()))];
    let (value, render): (Value, Render) = match &args.command {
        CtlCommand::Status => (client.call("GET", "/status", None)?, Box::new(fields)),
        CtlCommand::Health { ready } => {
            let path = if *ready { "/readyz" } else { "/healthz" };
            let (status, body) = client.probe(path)?;
            if status != 200 {
                bail!("{path}: {status} {}", body.trim());
            }
            println!("{}", body.trim());
            return Ok(());
        }
        CtlCommand::Cluster { action: None } => {
            let cols = ["name", "address", "status", "raft_role", "raft_member", "routes", "forwarded_messages", "forward_queue"];
            (client.call("GET", "/cluster", None)?, Box::new(move |v| table(v["nodes"].as_array().map_or(&[], |a| a), &cols)))
        }
        CtlCommand::Cluster { action: Some(ClusterAction::Join { address }) } => {
            (client.call("POST", "/cluster/join", Some(json!({ "address": address })))?, Box::new(fields))
        }
        CtlCommand::Cluster { action: Some(ClusterAction::Leave { node }) } => {
            (client.call("DELETE", &format!("/cluster/nodes/{}", encode(node, false)), None)?, Box::new(fields))
        }
        CtlCommand::Clients { action } => match action {
            ClientAction::List { paging: p, username, client_id } => {
                let mut q = paging(p);
                q.push(("username", username.clone()));
                q.push(("client_id", client_id.clone()));
                let cols = ["client_id", "username", "ip_address", "proto_ver", "keepalive", "subscriptions", "inflight", "queued"];
                (
                    client.call("GET", &format!("/clients{}", query(&q)), None)?,
                    Box::new(move |v| table(v["data"].as_array().map_or(&[], |a| a), &cols)),
                )
            }
            ClientAction::Show { client_id } => {
                (client.call("GET", &format!("/clients/{}", encode(client_id, false)), None)?, Box::new(fields))
            }
            ClientAction::Kick { client_id } => {
                client.call("DELETE", &format!("/clients/{}", encode(client_id, false)), None)?;
                (json!({ "kicked": client_id }), Box::new(|v| println!("kicked {}", cell(&v["kicked"]))))
            }
        },
        CtlCommand::Sessions { action } => match action {
            SessionAction::List { paging: p } => {
                let cols =
                    ["client_id", "connected", "persistent", "expiry_interval_secs", "subscriptions", "queued", "inflight", "dropped"];
                (
                    client.call("GET", &format!("/sessions{}", query(&paging(p))), None)?,
                    Box::new(move |v| table(v["data"].as_array().map_or(&[], |a| a), &cols)),
                )
            }
            SessionAction::Show { client_id } => {
                (client.call("GET", &format!("/sessions/{}", encode(client_id, false)), None)?, Box::new(fields))
            }
            SessionAction::Discard { client_id } => {
                client.call("DELETE", &format!("/sessions/{}", encode(client_id, false)), None)?;
                (json!({ "discarded": client_id }), Box::new(|v| println!("discarded {}", cell(&v["discarded"]))))
            }
        },
        CtlCommand::Subscriptions { action: SubscriptionAction::List { paging: p, client_id, topic } } => {
            let mut q = paging(p);
            q.push(("client_id", client_id.clone()));
            q.push(("topic", topic.clone()));
            let cols = ["client_id", "topic", "qos", "no_local", "retain_as_published", "retain_handling", "subscription_identifier"];
            (
                client.call("GET", &format!("/subscriptions{}", query(&q)), None)?,
                Box::new(move |v| table(v["data"].as_array().map_or(&[], |a| a), &cols)),
            )
        }
        CtlCommand::Retained { action } => match action {
            RetainedAction::List { paging: p, filter } => {
                let mut q = paging(p);
                q.push(("filter", filter.clone()));
                let cols = ["topic", "qos", "size", "payload"];
                (
                    client.call("GET", &format!("/retained{}", query(&q)), None)?,
                    Box::new(move |v| table(v["data"].as_array().map_or(&[], |a| a), &cols)),
                )
            }
            RetainedAction::Show { topic } => (client.call("GET", &format!("/retained/{}", encode(topic, true)), None)?, Box::new(fields)),
            RetainedAction::Delete { topic } => {
                client.call("DELETE", &format!("/retained/{}", encode(topic, true)), None)?;
                (json!({ "deleted": topic }), Box::new(|v| println!("deleted {}", cell(&v["deleted"]))))
            }
        },
        CtlCommand::Bans { action } => match action {
            BanAction::List => {
                (client.call("GET", "/bans", None)?, Box::new(|v| table(v.as_array().map_or(&[], |a| a), &["who", "until"])))
            }
            BanAction::Add { who, duration } => {
                let until = duration.map(|d| raftmq_cluster::message::now_ms() / 1000 + d);
                (client.call("POST", "/bans", Some(json!({ "who": who, "until": until })))?, Box::new(fields))
            }
            BanAction::Delete { who } => {
                client.call("DELETE", &format!("/bans/{}", encode(who, false)), None)?;
                (json!({ "unbanned": who }), Box::new(|v| println!("unbanned {}", cell(&v["unbanned"]))))
            }
        },
        CtlCommand::LogLevel { filter } => (
            client.call("PUT", "/log_level", Some(json!({ "filter": filter })))?,
            Box::new(|v| println!("log filter now {}", cell(&v["filter"]))),
        ),
        CtlCommand::Publish { topic, payload, qos, retain } => {
            let body = json!({ "topic": topic, "payload": payload, "qos": qos, "retain": retain });
            (client.call("POST", "/publish", Some(body))?, Box::new(|v| println!("published, {} matching sessions", cell(&v["matched"]))))
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        render(&value);
    }
    Ok(())
}
