//! The HTTP client behind `skip_verify = true` for the `s3` target: TLS without certificate
//! verification, for S3-compatible stores on private networks with self-signed certificates
//! (Litestream's `skip-verify`). The SDK's own client cannot turn verification off (its TLS
//! context only takes extra trust roots), so this adapts `reqwest`, already in the tree for the
//! GCS target, to the SDK's `HttpClient` interface. It is used only when asked for: every other
//! replica keeps the SDK's verifying client.

use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;

#[derive(Debug, Clone)]
struct Connector {
    client: reqwest::Client,
}

impl HttpConnector for Connector {
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

/// Caches its connector (and so its connection pool) across requests, as the SDK expects.
#[derive(Debug, Default)]
struct Client {
    cached: std::sync::Mutex<Option<(Timeouts, SharedHttpConnector)>>,
}

impl HttpClient for Client {
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
        let connector = SharedHttpConnector::new(Connector { client });
        *cached = Some((key, connector.clone()));
        connector
    }
}

/// An HTTP client for the SDK that accepts any server certificate.
pub fn client() -> SharedHttpClient {
    SharedHttpClient::new(Client::default())
}
