//! The HTTP clients we hand the S3 SDK instead of its own, each for one reason:
//!
//! - [`insecure`], behind `skip_verify = true`: TLS without certificate verification, for
//!   S3-compatible stores on private networks with self-signed certificates (Litestream's
//!   `skip-verify`). The SDK's own client cannot turn verification off (its TLS context only
//!   takes extra trust roots), so this adapts `reqwest`, already in the tree for the GCS target,
//!   to the SDK's `HttpClient` interface.
//! - [`quick_ack`], for plain `http://` endpoints (MinIO, s3s, Garage or Ceph on a private
//!   network): the SDK's hyper client, with the socket told to acknowledge every read at once
//!   (`TCP_QUICKACK`). A server that leaves Nagle's algorithm on (s3s-fs does: no `TCP_NODELAY`
//!   after `accept`) holds the tail of each response until our ACK of the previous segment,
//!   and Linux delays that ACK by up to 40 ms on a request/response connection: every ranged
//!   GET of a restore paid ~40 ms (a 2 MiB range from s3s-fs: 56 ms, with quick ACKs 14 ms).
//!   The SDK's connector does not expose its socket, hence a connector of our own. `https://`
//!   endpoints keep the SDK's client (TLS records would need the same wrapper under rustls;
//!   not measured, so not changed).
//!
//! Every other replica keeps the SDK's default client.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector as TcpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
struct InsecureConnector {
    client: reqwest::Client,
}

impl HttpConnector for InsecureConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        HttpConnectorFuture::new(async move {
            let req = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?;
            let req = reqwest::Request::try_from(req.map(reqwest::Body::wrap))
                .map_err(|e| ConnectorError::user(e.into()))?;
            let resp = client.execute(req).await.map_err(|e| {
                if e.is_timeout() {
                    ConnectorError::timeout(e.into())
                } else {
                    ConnectorError::io(e.into())
                }
            })?;
            let resp: http::Response<reqwest::Body> = resp.into();
            HttpResponse::try_from(resp.map(SdkBody::from_body_1_x))
                .map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// Timeouts of the cached connector.
type Timeouts = (Option<Duration>, Option<Duration>);

/// Caches its connector (and so its connection pool) across requests, as the SDK expects;
/// `build` makes the connector for a pair of timeouts.
struct Cached<F> {
    build: F,
    cached: std::sync::Mutex<Option<(Timeouts, SharedHttpConnector)>>,
}

impl<F> std::fmt::Debug for Cached<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached").finish_non_exhaustive()
    }
}

impl<F> HttpClient for Cached<F>
where
    F: Fn(&HttpConnectorSettings) -> SharedHttpConnector + Send + Sync,
{
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let key = (settings.connect_timeout(), settings.read_timeout());
        let mut cached = self.cached.lock().expect("connector cache");
        if let Some((k, c)) = cached.as_ref()
            && *k == key
        {
            return c.clone();
        }
        let connector = (self.build)(settings);
        *cached = Some((key, connector.clone()));
        connector
    }
}

fn cached<F>(build: F) -> SharedHttpClient
where
    F: Fn(&HttpConnectorSettings) -> SharedHttpConnector + Send + Sync + 'static,
{
    SharedHttpClient::new(Cached {
        build,
        cached: Default::default(),
    })
}

/// An HTTP client for the SDK that accepts any server certificate.
pub fn insecure() -> SharedHttpClient {
    cached(|settings| {
        let mut b = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(t) = settings.connect_timeout() {
            b = b.connect_timeout(t);
        }
        if let Some(t) = settings.read_timeout() {
            b = b.read_timeout(t);
        }
        let client = b.build().expect("a TLS client without verification builds");
        SharedHttpConnector::new(InsecureConnector { client })
    })
}

/// An HTTP client for the SDK, for `http://` endpoints, whose connections acknowledge every
/// read at once (see the module doc).
pub fn quick_ack() -> SharedHttpClient {
    cached(|settings| {
        let mut tcp = TcpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(settings.connect_timeout());
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(QuickAckConnector(tcp));
        SharedHttpConnector::new(QuickAckAdapter {
            client,
            read_timeout: settings.read_timeout(),
        })
    })
}

type HyperClient = hyper_util::client::legacy::Client<QuickAckConnector, SdkBody>;

struct QuickAckAdapter {
    client: HyperClient,
    /// Longest wait for a response's head, as the SDK's own connector applies it.
    read_timeout: Option<Duration>,
}

impl std::fmt::Debug for QuickAckAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuickAckAdapter")
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

impl HttpConnector for QuickAckAdapter {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let req = match request.try_into_http1x() {
            Ok(r) => r,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        let fut = self.client.request(req);
        let read_timeout = self.read_timeout;
        HttpConnectorFuture::new(async move {
            let resp = match read_timeout {
                Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
                    ConnectorError::timeout(format!("no response within {t:?}").into())
                })?,
                None => fut.await,
            }
            .map_err(classify)?;
            HttpResponse::try_from(resp.map(SdkBody::from_body_1_x))
                .map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// The SDK retries io and timeout errors; a request it built wrong is the user's.
fn classify(e: hyper_util::client::legacy::Error) -> ConnectorError {
    let hyper = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<hyper::Error>());
    match hyper {
        Some(h) if h.is_timeout() => ConnectorError::timeout(e.into()),
        Some(h) if h.is_user() => ConnectorError::user(e.into()),
        // A connect failure, a reset, a closed or cut-short response: the network's.
        _ => ConnectorError::io(e.into()),
    }
}

/// hyper-util's TCP connector, its connections wrapped in [`QuickAckIo`].
#[derive(Clone)]
struct QuickAckConnector(TcpConnector);

type ConnectFuture = Pin<
    Box<dyn Future<Output = Result<QuickAckIo, Box<dyn std::error::Error + Send + Sync>>> + Send>,
>;

impl tower_service::Service<http::Uri> for QuickAckConnector {
    type Response = QuickAckIo;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let fut = self.0.call(uri);
        Box::pin(async move { Ok(QuickAckIo(fut.await?)) })
    }
}

/// A TCP connection that turns delayed ACKs off before every read. `TCP_QUICKACK` does not
/// stick (the kernel goes back to delaying ACKs once the connection looks interactive, i.e.
/// after each request), so it is set on every read; one `setsockopt` per read, by hand because
/// neither tokio nor nix wraps this option.
struct QuickAckIo(TokioIo<TcpStream>);

fn quick_ack_now(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let one: nix::libc::c_int = 1;
    // SAFETY: a valid socket descriptor, a c_int option value and its size. A failure only
    // leaves delayed ACKs on, which is correct, merely slower.
    unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_QUICKACK,
            (&one as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        );
    }
}

impl hyper::rt::Read for QuickAckIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        quick_ack_now(self.0.inner());
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for QuickAckIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl Connection for QuickAckIo {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}
