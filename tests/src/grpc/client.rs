//! tonic's client for the echo service, over h2c or TLS.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::stream::Stream;
use http::Uri;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::client::Grpc;
use tonic::codec::Streaming;
use tonic::metadata::{Ascii, Binary, MetadataKey, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use super::{BytesCodec, MAX_MESSAGE, Method};

/// tonic's client for the echo service, on one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct EchoClient {
    grpc: Grpc<Channel>,
    bearer: Option<String>,
}

impl EchoClient {
    /// Connects over h2c to `url` (`http://{port}-{key}.tunnel.localhost:{edge port}`).
    pub async fn connect_h2c(url: &str) -> Result<EchoClient, tonic::transport::Error> {
        Self::connect_via(url, None, loopback(url)).await
    }

    /// Connects over TLS to `url` (`https://...`), trusting the CA `ca_pem` (ALPN `h2`).
    pub async fn connect_tls(
        url: &str,
        ca_pem: &[u8],
    ) -> Result<EchoClient, tonic::transport::Error> {
        Self::connect_via(url, Some(ca_pem), loopback(url)).await
    }

    /// Connects to `url` by dialing `addr`, over TLS with the CA `ca_pem` if given; the URL's
    /// host and port are the requests' `:authority` (and the TLS server name).
    pub async fn connect_via(
        url: &str,
        ca_pem: Option<&[u8]>,
        addr: SocketAddr,
    ) -> Result<EchoClient, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())?;
        if let Some(pem) = ca_pem {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint = endpoint.tls_config(tls)?;
        }
        let dial = tower::service_fn(move |_: Uri| async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(TokioIo::new(tcp))
        });
        let channel = endpoint.connect_with_connector(dial).await?;
        let grpc = Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(EchoClient { grpc, bearer: None })
    }

    /// Sends `authorization: Bearer {token}` with every call.
    pub fn with_bearer(mut self, token: &str) -> EchoClient {
        self.bearer = Some(token.to_owned());
        self
    }

    /// Calls `Unary` with `message`, metadata (a key ending `-bin` takes the value's bytes as
    /// binary metadata) and a deadline.
    pub async fn unary(
        &self,
        message: Bytes,
        metadata: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Result<Response<Bytes>, Status> {
        let request = self.request(message, metadata, timeout);
        let path = PathAndQuery::from_static(Method::Unary.path());
        self.ready().await?.unary(request, path, BytesCodec).await
    }

    /// Calls `ServerStream` for `count` messages of `size` bytes.
    pub async fn server_stream(
        &self,
        count: u64,
        size: u32,
        metadata: &[(&str, &str)],
    ) -> Result<Response<Streaming<Bytes>>, Status> {
        let mut body = Vec::with_capacity(12);
        body.put_u64(count);
        body.put_u32(size);
        let request = self.request(Bytes::from(body), metadata, None);
        let path = PathAndQuery::from_static(Method::ServerStream.path());
        let mut grpc = self.ready().await?;
        grpc.server_streaming(request, path, BytesCodec).await
    }

    /// Calls `ClientStream` with `messages`; the answer is [`summary`] of what arrived.
    pub async fn client_stream(
        &self,
        messages: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Result<Response<Bytes>, Status> {
        let request = self.request(messages, &[], None);
        let path = PathAndQuery::from_static(Method::ClientStream.path());
        let mut grpc = self.ready().await?;
        grpc.client_streaming(request, path, BytesCodec).await
    }

    /// Calls `Bidi` with `messages`; returns once the response headers have come.
    pub async fn bidi(
        &self,
        messages: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Result<Response<Streaming<Bytes>>, Status> {
        let request = self.request(messages, &[], None);
        let path = PathAndQuery::from_static(Method::Bidi.path());
        self.ready()
            .await?
            .streaming(request, path, BytesCodec)
            .await
    }

    /// Calls `Wait`, which ends only with the deadline (or when this future is dropped).
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<Response<Bytes>, Status> {
        let request = self.request(Bytes::new(), &[], timeout);
        let path = PathAndQuery::from_static(Method::Wait.path());
        self.ready().await?.unary(request, path, BytesCodec).await
    }

    /// A request with the token, `metadata` and `timeout` (as `grpc-timeout`).
    fn request<T>(
        &self,
        message: T,
        metadata: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Request<T> {
        let mut request = Request::new(message);
        let map = request.metadata_mut();
        if let Some(token) = &self.bearer {
            let value = format!("Bearer {token}").parse().expect("a token is ASCII");
            map.insert("authorization", value);
        }
        for (key, value) in metadata {
            if key.ends_with("-bin") {
                let key =
                    MetadataKey::<Binary>::from_bytes(key.as_bytes()).expect("a metadata key");
                map.append_bin(key, MetadataValue::from_bytes(value.as_bytes()));
            } else {
                let key = MetadataKey::<Ascii>::from_bytes(key.as_bytes()).expect("a metadata key");
                map.append(key, value.parse().expect("an ASCII metadata value"));
            }
        }
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        request
    }

    /// The client, once its connection can take a call.
    pub(super) async fn ready(&self) -> Result<Grpc<Channel>, Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
        Ok(grpc)
    }
}

/// `127.0.0.1:{port}` for a URL on a `*.localhost` host: loopback by RFC 6761, as curl and
/// browsers resolve it; the system resolver here does not.
fn loopback(url: &str) -> SocketAddr {
    let uri: Uri = url.parse().expect("a URL");
    let host = uri.host().expect("a URL with a host");
    assert!(
        host == "localhost" || host.ends_with(".localhost"),
        "{host} is not under localhost: dial it with EchoClient::connect_via"
    );
    let default = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    SocketAddr::from((Ipv4Addr::LOCALHOST, uri.port_u16().unwrap_or(default)))
}
