//! One MQTT connection: the CONNECT handshake, then a loop over incoming packets and
//! queued deliveries that also notices kicks (takeover, admin, keep-alive expiry, shutdown)
//! left in the session slot.
//!
//! Generic over the byte stream so TCP, TLS and WebSocket share this code path. The loop's
//! `select!` is cancellation safe: a read moves bytes into the connection's buffer within
//! one poll, and writes happen outside the `select!`. The connected state is kept small
//! (see the "idle connection is small" invariant in docs/ARCHITECTURE.md).

mod client;
mod framed;
mod handshake;
mod inbound;
mod outbound;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::broker::{Broker, EndKind};
use crate::codec::{reason, DecodeError, Disconnect, Packet};
use crate::net::transport::ClientStream;
use crate::session::SessionSlot;
use crate::telemetry::printable::Printable;
use crate::telemetry::sys::{self, ClientEvent};

use client::Client;
use framed::Framed;
use handshake::handshake;
use inbound::{handle_packet, handle_quick};
use outbound::{pump, wait_drained};

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Socket error or unexpected end of stream.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes that are not a valid packet.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A valid packet that breaks a rule; carries the MQTT 5 reason code.
    #[error("protocol violation {reason:#04x}: {what}")]
    Violation {
        /// Reason code for DISCONNECT.
        reason: u8,
        /// What went wrong.
        what: &'static str,
    },
    /// No CONNECT, or a write, within its deadline.
    #[error("timed out")]
    Timeout,
    /// The session store failed.
    #[error("store: {0}")]
    Store(#[from] raftmq_cluster::StoreError),
}

impl ConnectionError {
    fn reason_code(&self) -> u8 {
        match self {
            ConnectionError::Decode(e) => e.reason_code(),
            ConnectionError::Violation { reason, .. } => *reason,
            ConnectionError::Store(_) => reason::IMPLEMENTATION_SPECIFIC_ERROR,
            ConnectionError::Io(_) | ConnectionError::Timeout => reason::UNSPECIFIED_ERROR,
        }
    }
}

fn violation(reason: u8, what: &'static str) -> ConnectionError {
    ConnectionError::Violation { reason, what }
}

/// A connection past its handshake: only what the connected loop needs, so an idle client
/// costs little memory. The handshake's state (the decoded CONNECT, authentication) lives in
/// its own boxed future and is freed before the loop starts.
struct Connection<S> {
    framed: Framed<S>,
    client: Client,
    slot: Arc<SessionSlot>,
}

/// Serves one accepted connection to its end. `cert_user` is the user name a verified
/// client certificate stands for, when the listener maps one.
///
/// The arguments go straight into the boxed handshake, so the returned future (the task's
/// memory for the connection's whole life) holds the connected state and little else.
pub fn serve<S>(broker: Arc<Broker>, stream: S, peer: SocketAddr, cert_user: Option<String>) -> impl Future<Output = ()> + Send
where
    S: ClientStream,
{
    let handshake = Box::pin(handshake(broker, stream, peer, cert_user));
    async move {
        let Some(mut conn) = handshake.await else { return };
        let c = &mut conn;
        let broker = Arc::clone(&c.framed.broker);
        let result = connected_loop(&broker, &c.slot, &mut c.client, &mut c.framed).await;
        Box::pin(close(conn, result)).await;
    }
}

/// Ends a connection: the DISCONNECT for a protocol error, the session detached (will,
/// expiry), the disconnected event.
async fn close<S: AsyncRead + AsyncWrite + Unpin + Send>(conn: Connection<S>, result: Result<EndKind, ConnectionError>) {
    let Connection { mut framed, mut client, slot } = conn;
    let broker = Arc::clone(&framed.broker);
    let peer = client.owner.peer;
    let why = match &result {
        Ok(EndKind::Normal) => "normal".to_owned(),
        Ok(EndKind::PublishWill) => "closed without a normal DISCONNECT".to_owned(),
        Ok(EndKind::TakenOver) => "session taken over".to_owned(),
        Err(e) => e.to_string(),
    };
    let end = match &result {
        Ok(end) => *end,
        Err(e) => {
            tracing::debug!(%peer, client_id = %Printable(&client.client_id), error = %e, "connection closed with error");
            if !matches!(e, ConnectionError::Io(_) | ConnectionError::Timeout) {
                broker.stats.protocol_error(e.reason_code());
                if let Some(suppressed) = broker.log_limits.protocol_error.allow() {
                    tracing::warn!(%peer, client_id = %Printable(&client.client_id), error = %e, suppressed, "connection closed for a protocol error");
                }
                // Answers to the valid packets before the bad one still go out.
                if client.protocol.is_v5() {
                    let mut d = Disconnect::new(e.reason_code());
                    d.properties.reason_string = Some(e.to_string());
                    framed.send(&Packet::Disconnect(d));
                }
                let _ = framed.flush().await;
            }
            EndKind::PublishWill
        }
    };
    let _ = framed.stream.shutdown().await;
    broker.stats.connections.fetch_sub(1, Ordering::Relaxed);
    let will = client.will.take().map(|w| *w);
    Box::pin(broker.detach(&slot, client.conn_id, end, will)).await;
    let event = ClientEvent::Disconnected { username: client.owner.identity.username.as_deref(), reason: &why };
    Box::pin(sys::client_event(&broker, &client.client_id, event)).await;
    tracing::debug!(%peer, client_id = %Printable(&client.client_id), ?end, "disconnected");
}

/// Counts a connection in [`Broker::handling`] from the moment its socket had data until
/// it has handled the packets read.
struct Handling<'a>(&'a Broker);

impl<'a> Handling<'a> {
    fn start(broker: &'a Broker) -> Handling<'a> {
        broker.handling.fetch_add(1, Ordering::AcqRel);
        Handling(broker)
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One wake-up of the connection loop.
enum Event {
    Read(std::io::Result<usize>),
    Wake,
}

/// What the synchronous packet handler left for the asynchronous one. Lives for one
/// statement; boxing the packet would cost an allocation per packet.
#[allow(clippy::large_enum_variant)]
enum Handled {
    Done,
    End(EndKind),
    Async(Packet),
}

async fn connected_loop<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
) -> Result<EndKind, ConnectionError> {
    let v5 = client.protocol.is_v5();
    // No timer here: the broker's sweeper kicks a client silent for longer than its keep
    // alive allows (`SessionSlot::sweep`), so an idle connection costs no timer entry.
    let mut got_packet = false;
    loop {
        let kick = pump(broker, slot, client, framed, std::mem::take(&mut got_packet));
        if let Some(code) = kick.or_else(|| broker.shutdown.is_cancelled().then_some(reason::SERVER_SHUTTING_DOWN)) {
            // Takeovers and kicks end without the will; keep-alive expiry and shutdown
            // publish it [MQTT-3.1.2-8].
            let end = match code {
                reason::SERVER_SHUTTING_DOWN | reason::KEEP_ALIVE_TIMEOUT => EndKind::PublishWill,
                _ => EndKind::TakenOver,
            };
            if v5 {
                framed.send(&Packet::Disconnect(Disconnect::new(code)));
            }
            let _ = framed.flush().await;
            return Ok(end);
        }
        framed.flush().await?;
        let event = tokio::select! {
            biased;
            r = framed.fill() => Event::Read(r),
            _ = slot.wake.notified() => Event::Wake,
        };
        let Event::Read(read) = event else { continue };
        let _handling = Handling::start(broker);
        if read? == 0 {
            if framed.rbuf.is_empty() {
                // Closed without DISCONNECT: the will is published.
                return Ok(EndKind::PublishWill);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got_packet = framed.has_packet();
        client.may_yield = true;
        // Handle every packet already buffered before pumping and writing, so a burst of
        // acknowledgements or publishes costs one write, not one each. No packet-sized
        // temporary may live across the await below: the loop's future is the
        // per-connection memory (checked by a unit test).
        loop {
            let Some(packet) = framed.buffered_packet()? else { break };
            let packet = match handle_quick(broker, slot, client, framed, packet)? {
                Handled::Done => continue,
                Handled::End(end) => return Ok(end),
                Handled::Async(packet) => packet,
            };
            Box::pin(handle_packet(broker, slot, client, framed, packet)).await?;
            if let Some(congested) = client.congested.take() {
                // Backpressure: the acknowledgements so far go out, the rest of the burst
                // and the socket wait until the subscriber catches up (bounded).
                framed.flush().await?;
                let max = Duration::from_millis(broker.config.mqtt.publish_backpressure_ms);
                Box::pin(wait_drained(congested, max, Duration::from_micros(broker.stall_us()))).await;
            }
            // A fair share: a publisher whose socket always has more to read yields to the
            // subscribers it feeds every so many packets instead of filling their queues
            // until they overflow.
            tokio::task::coop::consume_budget().await;
        }
        if !client.deferred.is_empty() {
            Box::pin(inbound::settle_deferred(broker, slot, client, framed)).await?;
        }
        if !client.pending_rel.is_empty() {
            Box::pin(inbound::send_recorded_pubrels(slot, client, framed)).await?;
        }
        framed.release_read_buffer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection task is the dominant per-client memory cost; keep it small.
    #[tokio::test]
    async fn connection_task_future_is_small() -> Result<(), crate::security::SecurityError> {
        let broker = Broker::new(crate::config::Config::default(), crate::security::enhanced::AuthMethods::default())?;
        let (stream, _other) = tokio::io::duplex(64);
        let fut = serve(broker, stream, SocketAddr::from(([127, 0, 0, 1], 1)), None);
        let size = std::mem::size_of_val(&fut);
        println!("serve future: {size} bytes");
        assert!(size <= 640, "the connection task grew to {size} bytes");
        Ok(())
    }
}
