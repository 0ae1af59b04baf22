//! raftmq-bench: an MQTT load generator in the spirit of emqtt-bench, for raftmq or any
//! other broker (docs/benchmarks.md runs it against raftmq and Mosquitto side by side).
//!
//! Scenarios: `conn` (connect N clients, optionally subscribe and hold them), `pub`, `sub`,
//! and the paired `p2p` (N publishers -> N subscribers, one topic each), `fanout`
//! (1 publisher -> N subscribers), `fanin` (N publishers -> one shared subscription group),
//! `latency` (one paced publisher, one subscriber). Publishers run closed-loop (a window of
//! unacknowledged QoS 1/2 messages, or batches of QoS 0) or paced at `--rate`. Every payload
//! carries its send time, so subscribers measure one-way latency into an HDR histogram.
//!
//! Bounded: at most 100,000 clients and 600 seconds, to the address given (loopback by
//! default). Progress is printed once a second; `--json` prints the summary as one line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;
use raftmq_node::codec::{self, Connect, Packet, Properties, Protocol, PubKind, PubResponse, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const MAX_CLIENTS: usize = 100_000;
const MAX_SECONDS: u64 = 600;

#[derive(Debug, Parser)]
#[command(name = "raftmq-bench", about = "MQTT load generator")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Broker address (publishers, and subscribers unless `--sub-brokers` is given).
    #[arg(long, global = true, default_value = "127.0.0.1:1883")]
    broker: SocketAddr,
    /// Addresses the subscribers connect to instead, in turn (nodes of a cluster:
    /// publishers on one node, subscribers spread over others).
    #[arg(long, global = true, value_delimiter = ',')]
    sub_brokers: Vec<SocketAddr>,
    /// QoS of publishes and subscriptions.
    #[arg(long, global = true, default_value_t = 0)]
    qos: u8,
    /// Payload size in bytes (at least 8: the send timestamp).
    #[arg(long, global = true, default_value_t = 64)]
    size: usize,
    /// Measured duration in seconds.
    #[arg(long, global = true, default_value_t = 10)]
    duration: u64,
    /// Messages per second per publisher (default: as fast as the window allows).
    #[arg(long, global = true)]
    rate: Option<u64>,
    /// Unacknowledged QoS 1/2 messages per publisher, or QoS 0 messages per write.
    #[arg(long, global = true, default_value_t = 64)]
    window: usize,
    /// MQTT version: 4 (3.1.1) or 5.
    #[arg(long = "mqtt", global = true, default_value_t = 4)]
    version: u8,
    /// Print the summary as one JSON line.
    #[arg(long, global = true)]
    json: bool,
    /// Subscribers get persistent sessions (MQTT 5 only: a fresh session with an expiry of
    /// 300 s), so every delivery is written to the broker's store before the publisher is
    /// acknowledged: the price of durability.
    #[arg(long, global = true)]
    persistent: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Connect N clients, optionally subscribe each, hold them open, report the rate.
    Conn {
        /// Clients.
        #[arg(short = 'c', long, default_value_t = 1000)]
        count: usize,
        /// Connections opened at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Subscribe each client to its own topic.
        #[arg(long)]
        subscribe: bool,
        /// Subscribe each client to this many distinct filters of its own (subscription
        /// memory).
        #[arg(long, default_value_t = 0)]
        filters: usize,
        /// Seconds to hold the connections open after all connected.
        #[arg(long, default_value_t = 0)]
        hold: u64,
    },
    /// N publishers to one topic.
    Pub {
        /// Publishers.
        #[arg(short = 'c', long, default_value_t = 1)]
        count: usize,
        /// Topic.
        #[arg(long, default_value = "bench/t")]
        topic: String,
    },
    /// N subscribers to one filter, counting what arrives.
    Sub {
        /// Subscribers.
        #[arg(short = 'c', long, default_value_t = 1)]
        count: usize,
        /// Topic filter.
        #[arg(long, default_value = "bench/#")]
        topic: String,
    },
    /// N publishers -> N subscribers, one topic per pair.
    P2p {
        /// Pairs.
        #[arg(short = 'c', long, default_value_t = 16)]
        count: usize,
    },
    /// 1 publisher -> N subscribers on one topic.
    Fanout {
        /// Subscribers.
        #[arg(short = 'c', long, default_value_t = 100)]
        count: usize,
    },
    /// N publishers -> one shared subscription group of M members.
    Fanin {
        /// Publishers.
        #[arg(short = 'c', long, default_value_t = 16)]
        count: usize,
        /// Group members.
        #[arg(long, default_value_t = 4)]
        members: usize,
    },
    /// Route convergence: clients on the subscriber node(s) each subscribe to new topics one
    /// after another; after every SUBACK a client on `--broker` publishes to the new topic at
    /// once and the message must arrive. Latency is SUBSCRIBE to SUBACK (in a cluster the
    /// SUBACK waits for every peer, so it is the time until the route is deliverable
    /// everywhere); `received` counts the probes that arrived.
    Routes {
        /// Subscriptions in all.
        #[arg(short = 'c', long, default_value_t = 2000)]
        count: usize,
        /// Subscribing clients working at once.
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// One paced publisher (default 1000 msg/s) and one subscriber: one-way latency.
    Latency {
        /// Run both clients in one thread that spins on non-blocking sockets instead of
        /// sleeping, so the generator adds no wake-up latency of its own (uses a whole core).
        #[arg(long)]
        busy_poll: bool,
    },
}

/// Microseconds since the generator started: the clock carried in payloads.
fn clock_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    protocol: Protocol,
}

impl Conn {
    async fn open(c: &Common, client_id: &str) -> anyhow::Result<Conn> {
        Conn::open_with(c, client_id, None).await
    }

    /// Opens a connection; `expiry` asks for a persistent MQTT 5 session.
    async fn open_with(c: &Common, client_id: &str, expiry: Option<u32>) -> anyhow::Result<Conn> {
        let protocol = if c.version == 5 { Protocol::V5 } else { Protocol::V311 };
        let stream = TcpStream::connect(c.broker).await.with_context(|| format!("connecting to {}", c.broker))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Conn { rd, wr, buf: BytesMut::with_capacity(16 * 1024), protocol };
        conn.send(&connect_packet(protocol, client_id, expiry)).await?;
        match conn.next().await? {
            Some(Packet::ConnAck(a)) if a.code == 0 => Ok(conn),
            other => bail!("{client_id}: CONNECT refused: {other:?}"),
        }
    }

    async fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        codec::encode(p, self.protocol, &mut out);
        self.wr.write_all(&out).await?;
        Ok(())
    }

    /// A packet already received, without reading.
    fn buffered(&mut self) -> anyhow::Result<Option<Packet>> {
        Ok(codec::decode(&mut self.buf, Some(self.protocol), usize::MAX)?)
    }

    /// Next packet; `None` when the broker closed.
    async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.protocol), usize::MAX)? {
                return Ok(Some(p));
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let opts = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![(filter.to_owned(), opts)],
        }))
        .await?;
        match self.next().await? {
            Some(Packet::SubAck(s)) if s.codes.first().is_some_and(|c| *c < 0x80) => Ok(()),
            other => bail!("SUBSCRIBE {filter} refused: {other:?}"),
        }
    }
}

/// The CONNECT every generated client sends: clean start, keep alive 300 s; with an
/// expiry, the session outlives the connection (MQTT 5).
fn connect_packet(protocol: Protocol, client_id: &str, expiry: Option<u32>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: true,
        keep_alive: 300,
        properties: Properties { session_expiry_interval: expiry, ..Properties::default() },
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    }))
}

fn payload(size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64(clock_us());
    b.resize(size.max(8), b'x');
    b.freeze()
}

/// A PUBLISH carrying its send time, with the next packet id (QoS 1/2) after `last_id`.
fn timed_publish(topic: &str, qos: QoS, last_id: &mut u16, size: usize) -> Publish {
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        *last_id = last_id.checked_add(1).unwrap_or(1);
        *last_id
    };
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        packet_id,
        properties: Properties::default(),
        payload: payload(size),
    }
}

/// Publishes to `topic` until `until`, closed-loop or paced; returns the time from each
/// QoS 1/2 PUBLISH to its PUBACK / PUBCOMP.
async fn publisher(c: Common, id: String, topic: String, until: Instant, counters: Arc<Counters>) -> anyhow::Result<Histogram<u64>> {
    let mut conn = Conn::open(&c, &id).await?;
    let mut acked = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    // Send time per packet id.
    let mut sent_at = vec![0u64; usize::from(u16::MAX) + 1];
    let qos = QoS::from_u8(c.qos).unwrap_or(QoS::AtMostOnce);
    let window = c.window.clamp(1, 60_000);
    let mut next_id: u16 = 0;
    let mut outstanding = 0usize;
    let pace = c.rate.map(|r| Duration::from_secs_f64(1.0 / r.max(1) as f64));
    let mut next_send = Instant::now();
    let mut out = BytesMut::with_capacity(64 * 1024);
    while Instant::now() < until {
        // Fill the window (or a batch of QoS 0 messages).
        let mut batch = 0;
        while batch < window && (qos == QoS::AtMostOnce || outstanding < window) {
            if let Some(p) = pace {
                let now = Instant::now();
                if now < next_send {
                    if batch == 0 {
                        tokio::time::sleep_until(next_send.into()).await;
                    } else {
                        break;
                    }
                }
                next_send += p;
            }
            let publish = timed_publish(&topic, qos, &mut next_id, c.size);
            sent_at[usize::from(publish.packet_id)] = clock_us();
            codec::encode(&Packet::Publish(publish), conn.protocol, &mut out);
            batch += 1;
            if qos != QoS::AtMostOnce {
                outstanding += 1;
            }
            if pace.is_some() {
                break;
            }
        }
        conn.wr.write_all(&out).await?;
        out.clear();
        counters.sent.fetch_add(batch as u64, Ordering::Relaxed);
        // Collect acknowledgements until the window has room again, taking every one already
        // received, so the refill goes out in one write rather than one per acknowledgement.
        while qos != QoS::AtMostOnce && outstanding >= window {
            let Some(first) = conn.next().await? else { bail!("{id}: broker closed the connection") };
            let mut next = Some(first);
            while let Some(packet) = next {
                if let Packet::PubResponse(r) = packet {
                    match r.kind {
                        PubKind::PubAck | PubKind::PubComp => {
                            outstanding -= 1;
                            let _ = acked.record(clock_us().saturating_sub(sent_at[usize::from(r.packet_id)]).max(1));
                        }
                        PubKind::PubRec => {
                            codec::encode(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, r.packet_id, 0)), conn.protocol, &mut out)
                        }
                        PubKind::PubRel => {}
                    }
                }
                next = conn.buffered()?;
            }
            if outstanding >= window && !out.is_empty() {
                conn.wr.write_all(&out).await?;
                out.clear();
            }
        }
    }
    Ok(acked)
}

/// Connects and subscribes; the returned future counts deliveries until `until` + grace.
async fn subscriber(c: Common, id: String, filter: String) -> anyhow::Result<Conn> {
    let mut conn = Conn::open_with(&c, &id, c.persistent.then_some(300)).await?;
    conn.subscribe(&filter, QoS::from_u8(c.qos).unwrap_or(QoS::AtMostOnce)).await?;
    Ok(conn)
}

async fn consume(mut conn: Conn, until: Instant, counters: Arc<Counters>) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut acks = BytesMut::new();
    let stop = tokio::time::sleep_until(until.into());
    tokio::pin!(stop);
    loop {
        // Decode everything buffered, then read more. Everything in one read arrived at the
        // same moment: one clock read and one counter update per batch.
        let now = clock_us();
        let mut received = 0;
        while let Some(p) = codec::decode(&mut conn.buf, Some(conn.protocol), usize::MAX)? {
            match p {
                Packet::Publish(p) => {
                    received += 1;
                    if p.payload.len() >= 8 {
                        let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or_default());
                        let _ = hist.record(now.saturating_sub(sent).max(1));
                    }
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            codec::encode(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0)), conn.protocol, &mut acks)
                        }
                        QoS::ExactlyOnce => {
                            codec::encode(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, p.packet_id, 0)), conn.protocol, &mut acks)
                        }
                    }
                }
                Packet::PubResponse(r) if r.kind == PubKind::PubRel => {
                    codec::encode(&Packet::PubResponse(PubResponse::new(PubKind::PubComp, r.packet_id, 0)), conn.protocol, &mut acks)
                }
                _ => {}
            }
        }
        counters.received.fetch_add(received, Ordering::Relaxed);
        if !acks.is_empty() {
            conn.wr.write_all(&acks).await?;
            acks.clear();
        }
        tokio::select! {
            r = conn.rd.read_buf(&mut conn.buf) => if r? == 0 { return Ok(hist) },
            _ = &mut stop => return Ok(hist),
        }
    }
}

fn progress(counters: Arc<Counters>, label: &'static str, quiet: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = (0, 0);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        for second in 1.. {
            tick.tick().await;
            let now = (counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
            if !quiet {
                eprintln!("{label} t={second}s sent/s={} recv/s={}", now.0 - last.0, now.1 - last.1);
            }
            last = now;
        }
    })
}

struct Summary {
    scenario: &'static str,
    sent: u64,
    received: u64,
    seconds: f64,
    latency: Option<Histogram<u64>>,
    conn_per_sec: Option<f64>,
    /// PUBLISH to PUBACK / PUBCOMP, at the publishers.
    ack_latency: Option<Histogram<u64>>,
}

fn report(s: &Summary, json: bool) {
    let rate = s.received as f64 / s.seconds;
    let pct = |q: f64| s.latency.as_ref().filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(q));
    let ack = |q: f64| s.ack_latency.as_ref().filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(q));
    if json {
        let line = serde_json::json!({
            "scenario": s.scenario, "sent": s.sent, "received": s.received, "seconds": s.seconds,
            "msgs_per_sec": rate, "conn_per_sec": s.conn_per_sec,
            "latency_us": { "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": s.latency.as_ref().map(|h| h.max()) },
            "ack_latency_us": { "p50": ack(0.5), "p99": ack(0.99) },
        });
        println!("{line}");
        return;
    }
    println!("scenario      {}", s.scenario);
    if let Some(c) = s.conn_per_sec {
        println!("connections/s {c:.0}");
        return;
    }
    println!("sent          {}", s.sent);
    println!("received      {} in {:.1} s = {:.0} msg/s", s.received, s.seconds, rate);
    if let (Some(p50), Some(p99)) = (pct(0.5), pct(0.99)) {
        println!("latency us    p50 {p50}  p90 {}  p99 {p99}  max {}", pct(0.9).unwrap_or(0), s.latency.as_ref().map_or(0, |h| h.max()));
    }
    if let (Some(p50), Some(p99)) = (ack(0.5), ack(0.99)) {
        println!("ack us        p50 {p50}  p99 {p99}");
    }
}

/// Runs publishers and subscribers: subscribers first, then `duration` seconds of traffic.
async fn paired(c: &Common, scenario: &'static str, pubs: Vec<String>, subs: Vec<String>) -> anyhow::Result<Summary> {
    let counters = Arc::new(Counters::default());
    let mut conns = Vec::new();
    for (i, filter) in subs.iter().enumerate() {
        let at = if c.sub_brokers.is_empty() { c.broker } else { c.sub_brokers[i % c.sub_brokers.len()] };
        conns.push(subscriber(Common { broker: at, ..c.clone() }, format!("bench-sub-{i}"), filter.clone()).await?);
    }
    let duration = Duration::from_secs(c.duration.min(MAX_SECONDS));
    let start = Instant::now();
    let until = start + duration;
    let drain = until + Duration::from_secs(2);
    let consumers: Vec<_> = conns.into_iter().map(|conn| tokio::spawn(consume(conn, drain, Arc::clone(&counters)))).collect();
    let ticker = progress(Arc::clone(&counters), scenario, c.json);
    let publishers: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, topic)| tokio::spawn(publisher(c.clone(), format!("bench-pub-{i}"), topic, until, Arc::clone(&counters))))
        .collect();
    tokio::time::sleep_until(until.into()).await;
    // Throughput counts what was delivered within the measured duration.
    let received = counters.received.load(Ordering::Relaxed);
    let mut ack_latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for p in publishers {
        ack_latency.add(p.await??)?;
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for h in consumers {
        latency.add(h.await??)?;
    }
    ticker.abort();
    Ok(Summary {
        scenario,
        sent: counters.sent.load(Ordering::Relaxed),
        received,
        seconds: duration.as_secs_f64(),
        latency: Some(latency),
        conn_per_sec: None,
        ack_latency: Some(ack_latency),
    })
}

async fn conn_scenario(
    c: &Common,
    count: usize,
    concurrency: usize,
    subscribe: bool,
    filters: usize,
    hold: u64,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&c, &format!("bench-conn-{i}")).await?;
            if subscribe {
                conn.subscribe(&format!("bench/conn/{i}"), QoS::from_u8(c.qos).unwrap_or(QoS::AtMostOnce)).await?;
            }
            for f in 0..filters {
                conn.subscribe(&format!("bench/filters/{i}/sensor-{f}/+"), QoS::from_u8(c.qos).unwrap_or(QoS::AtMostOnce)).await?;
            }
            drop(permit);
            anyhow::Ok(conn)
        }));
    }
    let mut conns = Vec::with_capacity(count);
    for t in tasks {
        conns.push(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    // A line the benchmark script waits for before it samples the broker's memory.
    eprintln!("connected {count} in {seconds:.2} s");
    if hold > 0 {
        tokio::time::sleep(Duration::from_secs(hold.min(MAX_SECONDS))).await;
    }
    drop(conns);
    Ok(Summary {
        scenario: "conn",
        sent: 0,
        received: count as u64,
        seconds,
        latency: None,
        conn_per_sec: Some(count as f64 / seconds),
        ack_latency: None,
    })
}

/// Subscribes one topic at a time per client and proves each route deliverable from
/// `--broker` right after its SUBACK.
async fn routes_scenario(c: &Common, count: usize, clients: usize) -> anyhow::Result<Summary> {
    let per_client = count.div_ceil(clients.max(1));
    let probe_wait = Duration::from_secs(2);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients.max(1) {
        let at = if c.sub_brokers.is_empty() { c.broker } else { c.sub_brokers[i % c.sub_brokers.len()] };
        let sub_common = Common { broker: at, ..c.clone() };
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut sub = Conn::open(&sub_common, &format!("bench-routes-sub-{i}")).await?;
            let mut probe = Conn::open(&c, &format!("bench-routes-pub-{i}")).await?;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut arrived = 0u64;
            for k in 0..per_client {
                let topic = format!("bench/routes/{i}/{k}");
                let asked = Instant::now();
                sub.subscribe(&topic, QoS::AtMostOnce).await?;
                let _ = hist.record((asked.elapsed().as_micros() as u64).max(1));
                let mut unused = 0;
                probe.send(&Packet::Publish(timed_publish(&topic, QoS::AtMostOnce, &mut unused, c.size))).await?;
                let deadline = tokio::time::Instant::now() + probe_wait;
                loop {
                    match tokio::time::timeout_at(deadline, sub.next()).await {
                        Ok(Ok(Some(Packet::Publish(p)))) if p.topic == topic => {
                            arrived += 1;
                            break;
                        }
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None)) => bail!("the broker closed {topic}'s subscriber"),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => break,
                    }
                }
            }
            anyhow::Ok((hist, per_client as u64, arrived))
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut sent, mut received) = (0, 0);
    for t in tasks {
        let (h, s, r) = t.await??;
        latency.add(h)?;
        sent += s;
        received += r;
    }
    Ok(Summary {
        scenario: "routes",
        sent,
        received,
        seconds: started.elapsed().as_secs_f64(),
        latency: Some(latency),
        conn_per_sec: None,
        ack_latency: None,
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let c = cli.common;
    if c.size < 8 {
        bail!("--size must be at least 8 (the timestamp)");
    }
    if c.persistent && c.version != 5 {
        bail!("--persistent needs --mqtt 5 (a fresh session that outlives its connection)");
    }
    let count = match &cli.scenario {
        Scenario::Conn { count, .. }
        | Scenario::Pub { count, .. }
        | Scenario::Sub { count, .. }
        | Scenario::P2p { count }
        | Scenario::Fanout { count } => *count,
        Scenario::Fanin { count, members } => count + members,
        Scenario::Latency { .. } => 2,
        Scenario::Routes { clients, .. } => 2 * clients,
    };
    if count == 0 || count > MAX_CLIENTS {
        bail!("between 1 and {MAX_CLIENTS} clients");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        clock_us();
        let summary = match cli.scenario {
            Scenario::Conn { count, concurrency, subscribe, filters, hold } => {
                conn_scenario(&c, count, concurrency, subscribe, filters, hold).await?
            }
            Scenario::Pub { count, topic } => paired(&c, "pub", vec![topic; count], vec![]).await?,
            Scenario::Sub { count, topic } => paired(&c, "sub", vec![], vec![topic; count]).await?,
            Scenario::P2p { count } => {
                paired(
                    &c,
                    "p2p",
                    (0..count).map(|i| format!("bench/p2p/{i}")).collect(),
                    (0..count).map(|i| format!("bench/p2p/{i}")).collect(),
                )
                .await?
            }
            Scenario::Fanout { count } => paired(&c, "fanout", vec!["bench/fanout".into()], vec!["bench/fanout".into(); count]).await?,
            Scenario::Fanin { count, members } => {
                paired(
                    &c,
                    "fanin",
                    (0..count).map(|i| format!("bench/fanin/{i}")).collect(),
                    vec!["$share/bench/bench/fanin/+".into(); members],
                )
                .await?
            }
            Scenario::Routes { count, clients } => routes_scenario(&c, count, clients).await?,
            Scenario::Latency { busy_poll: true } => {
                let c = c.clone();
                tokio::task::spawn_blocking(move || busy::latency(&c, c.rate.unwrap_or(1000))).await??
            }
            Scenario::Latency { busy_poll: false } => {
                let c = Common { rate: Some(c.rate.unwrap_or(1000)), ..c.clone() };
                paired(&c, "latency", vec!["bench/latency".into()], vec!["bench/latency".into()]).await?
            }
        };
        report(&summary, c.json);
        anyhow::Ok(())
    })
}

/// The busy-polling latency scenario: blocking-free std sockets in one spinning thread.
mod busy {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;

    use super::*;

    /// A client on a std socket, non-blocking once connected.
    struct SyncConn {
        stream: TcpStream,
        buf: BytesMut,
        protocol: Protocol,
    }

    impl SyncConn {
        fn open(c: &Common, client_id: &str) -> anyhow::Result<SyncConn> {
            let protocol = if c.version == 5 { Protocol::V5 } else { Protocol::V311 };
            let stream = TcpStream::connect(c.broker).with_context(|| format!("connecting to {}", c.broker))?;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            let mut conn = SyncConn { stream, buf: BytesMut::new(), protocol };
            conn.send(&connect_packet(protocol, client_id, None))?;
            match conn.next_within(Duration::from_secs(10))? {
                Some(Packet::ConnAck(a)) if a.code == 0 => Ok(conn),
                other => bail!("{client_id}: CONNECT refused: {other:?}"),
            }
        }

        fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
            let mut out = BytesMut::new();
            codec::encode(p, self.protocol, &mut out);
            let mut rest = &out[..];
            while !rest.is_empty() {
                match self.stream.write(rest) {
                    Ok(0) => bail!("broker closed the connection"),
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        }

        /// A packet already received, or what one non-blocking read brings.
        fn poll(&mut self, scratch: &mut [u8]) -> anyhow::Result<Option<Packet>> {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.protocol), usize::MAX)? {
                return Ok(Some(p));
            }
            match self.stream.read(scratch) {
                Ok(0) => bail!("broker closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            Ok(codec::decode(&mut self.buf, Some(self.protocol), usize::MAX)?)
        }

        fn next_within(&mut self, limit: Duration) -> anyhow::Result<Option<Packet>> {
            let until = Instant::now() + limit;
            let mut scratch = [0u8; 4096];
            while Instant::now() < until {
                if let Some(p) = self.poll(&mut scratch)? {
                    return Ok(Some(p));
                }
                std::hint::spin_loop();
            }
            Ok(None)
        }
    }

    /// One publisher paced at `rate`, one subscriber, both polled by this thread.
    pub(super) fn latency(c: &Common, rate: u64) -> anyhow::Result<Summary> {
        let qos = QoS::from_u8(c.qos).unwrap_or(QoS::AtMostOnce);
        let topic = "bench/latency";
        let mut sub = SyncConn::open(c, "bench-latency-sub")?;
        let opts = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
        let filters = vec![(topic.to_owned(), opts)];
        sub.send(&Packet::Subscribe(Subscribe { packet_id: 1, properties: Properties::default(), filters }))?;
        match sub.next_within(Duration::from_secs(10))? {
            Some(Packet::SubAck(s)) if s.codes.first().is_some_and(|c| *c < 0x80) => {}
            other => bail!("SUBSCRIBE refused: {other:?}"),
        }
        let mut publ = SyncConn::open(c, "bench-latency-pub")?;
        let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let start = Instant::now();
        let until = start + Duration::from_secs(c.duration.min(MAX_SECONDS));
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let (mut sent, mut received) = (0u64, 0u64);
        let mut next_send = start;
        let mut next_id: u16 = 0;
        let mut scratch = vec![0u8; 64 * 1024];
        // Stragglers get a short grace after the last send.
        while Instant::now() < until + Duration::from_millis(200) && (received < sent || Instant::now() < until) {
            let now = Instant::now();
            if now < until && now >= next_send {
                let publish = timed_publish(topic, qos, &mut next_id, c.size);
                publ.send(&Packet::Publish(publish))?;
                sent += 1;
                next_send += period;
            }
            while let Some(p) = sub.poll(&mut scratch)? {
                let p = match p {
                    Packet::Publish(p) => p,
                    Packet::PubResponse(r) if r.kind == PubKind::PubRel => {
                        sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubComp, r.packet_id, 0)))?;
                        continue;
                    }
                    _ => continue,
                };
                received += 1;
                if p.payload.len() >= 8 {
                    let at = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or_default());
                    let _ = hist.record(clock_us().saturating_sub(at).max(1));
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0)))?,
                    QoS::ExactlyOnce => sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, p.packet_id, 0)))?,
                }
            }
            // Acknowledgements to the publisher are read and dropped (QoS 2 is completed).
            while let Some(p) = publ.poll(&mut scratch)? {
                if let Packet::PubResponse(r) = p {
                    if r.kind == PubKind::PubRec {
                        publ.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, r.packet_id, 0)))?;
                    }
                }
            }
            std::hint::spin_loop();
        }
        Ok(Summary {
            scenario: "latency",
            sent,
            received,
            seconds: c.duration as f64,
            latency: Some(hist),
            conn_per_sec: None,
            ack_latency: None,
        })
    }
}
