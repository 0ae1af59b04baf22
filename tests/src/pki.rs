//! Certificates generated at test time (rcgen): a CA, a server certificate for `localhost`
//! and 127.0.0.1, and a client certificate, written as PEM files, plus client connectors
//! for TLS and (secure) WebSocket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::DEADLINE;

/// PEM files of a throw-away PKI.
pub struct TestPki {
    _dir: tempfile::TempDir,
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate (CN = `client_cn`).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// Common Name of the client certificate.
    pub client_cn: String,
}

impl TestPki {
    /// Generates a CA and server and client certificates in a temporary directory.
    pub fn generate(client_cn: &str) -> anyhow::Result<TestPki> {
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "raftmq test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let server_key = KeyPair::generate()?;
        let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?.signed_by(&server_key, &ca)?;
        let client_key = KeyPair::generate()?;
        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params.distinguished_name.push(DnType::CommonName, client_cn);
        let client = client_params.signed_by(&client_key, &ca)?;
        let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        Ok(TestPki {
            ca: write("ca.pem", ca.pem())?,
            server_cert: write("server.pem", server.pem())?,
            server_key: write("server.key", server_key.serialize_pem())?,
            client_cert: write("client.pem", client.pem())?,
            client_key: write("client.key", client_key.serialize_pem())?,
            client_cn: client_cn.to_owned(),
            _dir: dir,
        })
    }

    /// A TLS client trusting the test CA, presenting the client certificate if asked.
    pub fn connector(&self, with_client_cert: bool) -> anyhow::Result<TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)? {
            roots.add(cert?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = if with_client_cert {
            let certs = CertificateDer::pem_file_iter(&self.client_cert)?.collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&self.client_key)?)?
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// Opens a TLS connection to `addr` as `localhost`.
    pub async fn tls(&self, addr: SocketAddr, with_client_cert: bool) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost")?;
        Ok(tokio::time::timeout(DEADLINE, self.connector(with_client_cert)?.connect(name, tcp)).await??)
    }
}

/// WebSocket upgrade over `stream` to `url`, offering the `mqtt` subprotocol and the given
/// Origin; returns the byte stream and the subprotocol the server chose.
pub async fn websocket<S>(
    stream: S,
    url: &str,
    origin: Option<&str>,
) -> anyhow::Result<(raftmq_node::net::transport::WsIo<S>, Option<String>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", HeaderValue::from_str(origin)?);
    }
    let (ws, response) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(request, stream)).await??;
    let proto = response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok((raftmq_node::net::transport::WsIo::new(ws), proto))
}
