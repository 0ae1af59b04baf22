//! Transports under MQTT: TLS (rustls, optional client certificates) and WebSocket (binary
//! frames, `mqtt` subprotocol). Each turns an accepted TCP stream into a byte stream the
//! connection task serves exactly like plain TCP.
//!
//! Handshakes run inside the connection's own task under a timeout, never in the accept
//! loop.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::config::{ListenerConfig, PeerCertUsername};

/// A listener's TLS settings could not be loaded; the broker refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A required file setting is missing.
    #[error("{0} is required for a TLS listener")]
    Missing(&'static str),
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// File.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration (for example a key that does not match).
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn pem_err(path: &Path, reason: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Pem { path: path.display().to_string(), reason: reason.to_string() }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| pem_err(path, e))?.collect::<Result<Vec<_>, _>>().map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Builds the TLS acceptor of a `tls` or `wss` listener (TLS 1.2 and 1.3).
pub fn tls_acceptor(listener: &ListenerConfig) -> Result<TlsAcceptor, TlsSetupError> {
    let certfile = listener.certfile.as_deref().ok_or(TlsSetupError::Missing("certfile"))?;
    let keyfile = listener.keyfile.as_deref().ok_or(TlsSetupError::Missing("keyfile"))?;
    let certs = load_certs(certfile)?;
    let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| pem_err(keyfile, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let builder = match listener.cacertfile.as_deref() {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| pem_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if listener.verify_peer { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsSetupError::Rustls(e.to_string()))?)
        }
        None if listener.verify_peer => return Err(TlsSetupError::Missing("cacertfile (for verify_peer)")),
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The user name a client certificate stands for, if the listener maps one.
pub fn cert_username(cert: &CertificateDer<'_>, mode: PeerCertUsername) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    match mode {
        PeerCertUsername::None => None,
        PeerCertUsername::Cn => parsed.subject().iter_common_name().next()?.as_str().ok().map(str::to_owned),
        PeerCertUsername::San => {
            let san = parsed.subject_alternative_name().ok().flatten()?;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(s) | x509_parser::extensions::GeneralName::RFC822Name(s) => {
                    Some((*s).to_owned())
                }
                _ => None,
            })
        }
    }
    // A certificate name becomes a user name only if it is a valid MQTT string.
    .filter(|name| !name.is_empty() && !name.contains('\0'))
}

/// A client's byte stream. [`ClientStream::connect_accepted`] lifts the limits that apply
/// only before CONNECT is accepted (the WebSocket transport's pre-CONNECT byte cap).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// CONNECT was accepted: the client may now send packets up to the full size.
    fn connect_accepted(&mut self) {}
}

impl ClientStream for tokio::net::TcpStream {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for tokio_rustls::server::TlsStream<S> {}
impl ClientStream for tokio::io::DuplexStream {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for WsIo<PreConnectCap<S>> {
    fn connect_accepted(&mut self) {
        self.ws.get_mut().open();
    }
}

/// Caps the raw bytes a WebSocket client may send before its CONNECT is accepted. The
/// WebSocket layer assembles a whole message before MQTT sees any of it, so without this a
/// client could make the broker buffer a message of the full packet size (1 MiB) per
/// connection before authenticating. Like the TCP path's bounded read, the cap pauses
/// reading (TCP pushes back on the client) rather than failing, so a client that sends
/// packets right behind its CONNECT loses nothing; a CONNECT that does not fit never
/// completes and the connect timeout closes the connection.
pub struct PreConnectCap<S> {
    inner: S,
    /// Bytes still allowed; `None` once CONNECT was accepted.
    left: Option<usize>,
    /// The reader paused at the cap, woken by [`PreConnectCap::open`].
    paused: Option<std::task::Waker>,
}

impl<S> PreConnectCap<S> {
    /// Allows `budget` bytes (the upgrade request, frame headers and the CONNECT) until
    /// [`PreConnectCap::open`].
    pub fn new(inner: S, budget: usize) -> PreConnectCap<S> {
        PreConnectCap { inner, left: Some(budget), paused: None }
    }

    /// Lifts the cap and resumes a paused reader.
    pub fn open(&mut self) {
        self.left = None;
        if let Some(waker) = self.paused.take() {
            waker.wake();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PreConnectCap<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(left) = this.left else { return Pin::new(&mut this.inner).poll_read(cx, buf) };
        if left == 0 {
            this.paused = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // Never more than the budget: read through a small buffer (only before CONNECT).
        let mut chunk = [0u8; 4096];
        let want = left.min(chunk.len()).min(buf.remaining());
        let mut limited = ReadBuf::new(&mut chunk[..want]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.put_slice(limited.filled());
        this.left = Some(left - n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PreConnectCap<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Room for the HTTP upgrade request and the frame headers beside the CONNECT itself.
const UPGRADE_ALLOWANCE: usize = 16 * 1024;

/// Accepts the WebSocket upgrade of an MQTT-over-WebSocket connection: the configured path,
/// the `mqtt` subprotocol echoed when offered, and the Origin allow-list (B33). Until
/// CONNECT is accepted the client may send no more than `max_connect` bytes of MQTT.
pub async fn accept_websocket<S>(
    stream: S,
    listener: &ListenerConfig,
    max_message: usize,
    max_connect: usize,
) -> Result<WsIo<PreConnectCap<S>>, io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = PreConnectCap::new(stream, max_connect.saturating_add(UPGRADE_ALLOWANCE));
    let path = listener.path.clone();
    let origins = listener.allowed_origins.clone();
    // The callback's signature, large error included, is tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        #[allow(clippy::result_large_err)]
        let refuse = |status: StatusCode| {
            let mut r = ErrorResponse::new(None);
            *r.status_mut() = status;
            Err(r)
        };
        if req.uri().path() != path {
            return refuse(StatusCode::NOT_FOUND);
        }
        if !origins.is_empty() {
            let origin = req.headers().get("origin").and_then(|o| o.to_str().ok()).unwrap_or("");
            if !origins.iter().any(|o| o == origin) {
                return refuse(StatusCode::FORBIDDEN);
            }
        }
        let offered = req.headers().get("sec-websocket-protocol").and_then(|p| p.to_str().ok()).unwrap_or("");
        if let Some(proto) = offered.split(',').map(str::trim).find(|p| matches!(*p, "mqtt" | "mqttv3.1")) {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(if proto == "mqtt" { "mqtt" } else { "mqttv3.1" }));
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default().max_message_size(Some(max_message)).max_frame_size(Some(max_message));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await.map_err(io::Error::other)?;
    Ok(WsIo { ws, pending: Bytes::new() })
}

/// MQTT bytes over WebSocket binary messages, as a plain byte stream. A message may hold
/// several packets or part of one; a text message is a protocol violation and ends the
/// stream with an error.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

impl<S> WsIo<S> {
    /// Wraps an established WebSocket (either side) as a byte stream.
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo { ws, pending: Bytes::new() }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "text frame on MQTT WebSocket")))
                }
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut this.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(io::Error::other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(io::Error::other)
    }
}
