//! Framed reads and batched writes over one client byte stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::ConnectionError;
use crate::broker::Broker;
use crate::codec::{self, Packet, Protocol};
use crate::telemetry::stats::DropReason;

/// Framed reads and batched writes over one byte stream.
pub(super) struct Framed<S> {
    pub(super) stream: S,
    /// For the byte counters.
    pub(super) broker: Arc<Broker>,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) protocol: Option<Protocol>,
    pub(super) max_in: usize,
    /// The client's Maximum Packet Size: nothing larger is ever sent [MQTT-3.1.2-25].
    pub(super) max_out: usize,
}

/// Buffers above this size are released once empty, so an idle connection stays small.
pub(super) const BUF_KEEP: usize = 16 * 1024;

/// Writes smaller than this do not keep their buffer: a client that only gets the odd
/// acknowledgement or PINGRESP holds no write buffer between them.
pub(super) const WBUF_SMALL: usize = 512;

/// Size of the per-thread read buffer: the most one read takes from a socket.
pub(super) const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    /// Sockets are read into this per-worker buffer and only the bytes read are copied into
    /// the connection's own buffer, so an idle connection holds no read buffer at all.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Reads the next packet; `Ok(None)` at a clean end of stream. Cancellation safe.
    pub(super) async fn read_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        loop {
            if let Some(packet) = self.buffered_packet()? {
                return Ok(Some(packet));
            }
            if self.fill().await? == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    /// Reads what the socket has (up to [`SCRATCH_LEN`]) onto the end of the read buffer;
    /// 0 at end of stream. Cancellation safe: bytes are moved within one poll.
    pub(super) async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    pub(super) fn poll_fill(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<usize>> {
        // Before CONNECT, read no further than the largest first packet allowed.
        let limit =
            if self.protocol.is_none() { self.max_in.saturating_add(5).saturating_sub(self.rbuf.len()).max(1) } else { SCRATCH_LEN };
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => self.poll_read_into(cx, &mut scratch[..limit.min(SCRATCH_LEN)]),
            // Only if a stream's poll_read re-entered this function on the same thread.
            Err(_) => self.poll_read_into(cx, &mut [0; 4096][..limit.min(4096)]),
        })
    }

    pub(super) fn poll_read_into(
        &mut self,
        cx: &mut std::task::Context<'_>,
        scratch: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut buf = tokio::io::ReadBuf::new(scratch);
        std::task::ready!(std::pin::Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.rbuf.extend_from_slice(buf.filled());
        self.broker.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
        std::task::Poll::Ready(Ok(n))
    }

    /// Whether a whole packet is waiting in the read buffer.
    pub(super) fn has_packet(&self) -> bool {
        codec::pending_len(&self.rbuf).is_some_and(|len| len <= self.rbuf.len())
    }

    /// The next packet if it is already complete in the read buffer (no I/O).
    pub(super) fn buffered_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        let packet = codec::decode(&mut self.rbuf, self.protocol, self.max_in)?;
        if let Some(p) = &packet {
            self.broker.stats.packets_received[usize::from(p.kind())].fetch_add(1, Ordering::Relaxed);
        }
        Ok(packet)
    }

    /// Lets go of an emptied read buffer: its memory is shared with the payloads just
    /// decoded, and an idle connection should not keep it.
    pub(super) fn release_read_buffer(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
    }

    /// Encodes `packet` for sending. A packet over the client's Maximum Packet Size loses
    /// its Reason String and User Properties; if it still does not fit it is not sent
    /// [MQTT-3.1.2-25] and false is returned.
    pub(super) fn send(&mut self, packet: &Packet) -> bool {
        let protocol = self.protocol.unwrap_or(Protocol::V311);
        let start = self.wbuf.len();
        codec::encode(packet, protocol, &mut self.wbuf);
        if self.wbuf.len() - start > self.max_out {
            self.wbuf.truncate(start);
            if let Some(slim) = packet.without_diagnostics() {
                codec::encode(&slim, protocol, &mut self.wbuf);
            }
            if self.wbuf.len() - start > self.max_out || self.wbuf.len() == start {
                self.wbuf.truncate(start);
                self.broker.stats.drop(DropReason::TooLarge, 1);
                return false;
            }
        }
        self.broker.stats.packets_sent[usize::from(packet.kind())].fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Writes everything buffered. The socket usually takes it all at once; only a write
    /// that would block waits, bounded by the write timeout, in a boxed future: the
    /// connection's own future carries no timer for it.
    pub(super) async fn flush(&mut self) -> Result<(), ConnectionError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let written = self.wbuf.len();
        if !std::future::poll_fn(|cx| std::task::Poll::Ready(self.write_now(cx))).await? {
            let write_timeout = Duration::from_secs(self.broker.config.mqtt.write_timeout_secs);
            let rest = async {
                self.stream.write_all(&self.wbuf).await?;
                self.stream.flush().await
            };
            Box::pin(tokio::time::timeout(write_timeout, rest)).await.map_err(|_| ConnectionError::Timeout)??;
        }
        self.broker.stats.bytes_sent.fetch_add(written as u64, Ordering::Relaxed);
        if written < WBUF_SMALL || self.wbuf.capacity() > BUF_KEEP {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Writes what the socket takes without waiting; true once everything is written and
    /// flushed.
    pub(super) fn write_now(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<bool> {
        use std::task::Poll;
        while !self.wbuf.is_empty() {
            match std::pin::Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => bytes::Buf::advance(&mut self.wbuf, n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        match std::pin::Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(result) => result.map(|()| true),
            Poll::Pending => Ok(false),
        }
    }
}
