//! The admin API (the platform's API): JSON over HTTP/1.1 on its own listener, every call
//! behind `Authorization: Bearer <admin token>`.
//!
//! | call | answer |
//! | --- | --- |
//! | `POST /v1/devboxes` `{"id"?, "tunnel"?: {"auth_mode", options...}}` | 201 `{"id", "agent_token", "tunnel"?}` |
//! | `GET /v1/devboxes` | 200 `[{...}]` |
//! | `GET /v1/devboxes/{id}` | 200 `{"id", "created_at", "last_activity_ms", "agent": {...}, "tunnel": {...} or null}` |
//! | `POST /v1/devboxes/{id}/tunnel` `{"auth_mode", options...}` | 200 `{"tunnel_key", "auth_mode", options..., "create_time_ms", "auth_token"?, "url_template"}` |
//! | `POST /v1/devboxes/{id}/tunnel/rotate-token` | 200 the same, with `auth_token` |
//! | `POST /v1/devboxes/{id}/rotate-agent-token` | 200 `{"id", "agent_token"}` |
//! | `DELETE /v1/devboxes/{id}/tunnel` | 204 |
//! | `DELETE /v1/devboxes/{id}` | 204 |
//! | `GET /v1/openapi.json` | 200 the OpenAPI 3.1 document ([`crate::openapi`]) |
//! | `GET /v1/events` | 200 `text/event-stream`: every event from now on (see [`crate::platform`]) |
//! | `GET /v1/cluster` | 200 `{"node", "nodes": [{"node", "mesh_addr", "agents_addr", "last_seen_ms", "agents", "alive"}]}` (404 on a single edge) |
//!
//! The tunnel's options, each left out to keep its current value (a new tunnel's default in
//! brackets): `rewrite_host` (false), `raw_tcp` (false), `http_keep_alive` (true),
//! `wake_on_http` (false). `edge/src/openapi.json` is the whole contract.
//!
//! On an edge of a cluster the devbox view's `agent` also has `edges`: the live edges holding
//! a connection of its agent.
//!
//! A client whose calls keep failing authentication is refused with 429 for a while
//! (`limits.admin_failures` a minute), before its token is even looked at.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use burrow_protocol::AuthMode;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::auth;
use crate::body::{self, Body};
use crate::cluster::ClusterView;
use crate::limits::{self, Rate};
use crate::metrics::Metrics;
use crate::registry::{DevboxView, IssuedTunnel, Registry, RegistryError, TunnelSpec};
use crate::secret::TokenHash;
use crate::store::TunnelRecord;

/// Seconds a throttled admin client is told to wait.
const RETRY_AFTER_SECS: u32 = 10;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// Serves the admin API.
#[derive(Debug)]
pub struct Admin {
    registry: Arc<Registry>,
    cluster: Option<Arc<ClusterView>>,
    token: TokenHash,
    metrics: Arc<Metrics>,
    /// Failed authentications per client address.
    failures: Rate<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDevbox {
    id: Option<String>,
    tunnel: Option<EnableTunnel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableTunnel {
    auth_mode: String,
    rewrite_host: Option<bool>,
    raw_tcp: Option<bool>,
    http_keep_alive: Option<bool>,
    wake_on_http: Option<bool>,
}

impl EnableTunnel {
    fn spec(&self) -> Result<TunnelSpec, ApiError> {
        Ok(TunnelSpec {
            auth_mode: auth_mode(&self.auth_mode)?,
            rewrite_host: self.rewrite_host,
            raw_tcp: self.raw_tcp,
            http_keep_alive: self.http_keep_alive,
            wake_on_http: self.wake_on_http,
        })
    }
}

/// An API error: status and message.
struct ApiError(StatusCode, String);

/// A call's answer: status and JSON body.
type Reply = Result<(StatusCode, Option<Value>), ApiError>;

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(_) | RegistryError::NoTunnel(_) => {
                ApiError(StatusCode::NOT_FOUND, e.to_string())
            }
            RegistryError::OpenTunnel(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            RegistryError::Store(crate::store::StoreError::Exists(_)) => {
                ApiError(StatusCode::CONFLICT, e.to_string())
            }
            RegistryError::Store(ref store) if store.is_unavailable() => {
                warn!(error = %e, "admin call failed: the store is unavailable");
                ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => {
                warn!(error = %other, "admin call failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the edge's log".into(),
                )
            }
        }
    }
}

impl Admin {
    /// An admin API guarded by the token with this hash; a client gets `max_failures` failed
    /// authentications a minute.
    pub fn new(
        registry: Arc<Registry>,
        cluster: Option<Arc<ClusterView>>,
        token: TokenHash,
        metrics: Arc<Metrics>,
        max_failures: u32,
    ) -> Admin {
        let per_minute = f64::from(max_failures);
        Admin {
            registry,
            cluster,
            token,
            metrics,
            failures: Rate::new(per_minute / 60.0, per_minute),
        }
    }

    /// Answers one admin request from `client`.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        match self.route(req, limits::client_key(client.ip())).await {
            Ok(response) => response,
            Err(ApiError(status, message)) => {
                let mut r = json_response(status, Some(json!({ "error": message })));
                if status == StatusCode::UNAUTHORIZED {
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"burrow-admin\""),
                    );
                }
                if status == StatusCode::TOO_MANY_REQUESTS {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                }
                r
            }
        }
    }

    /// Checks the caller, then runs the call the method and path name.
    async fn route(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
    ) -> Result<Response<Body>, ApiError> {
        self.authorize(&req, client)?;
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let method = req.method().clone();
        let (status, body) = match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "events"]) => return Ok(self.registry.events().response(&req)),
            (&Method::POST, ["v1", "devboxes"]) => self.create(req).await,
            (&Method::GET, ["v1", "devboxes"]) => Ok(self.list()),
            (&Method::GET, ["v1", "devboxes", id]) => self.show(id),
            (&Method::DELETE, ["v1", "devboxes", id]) => self.delete(id).await,
            (&Method::POST, ["v1", "devboxes", id, "tunnel"]) => self.enable_tunnel(id, req).await,
            (&Method::POST, ["v1", "devboxes", id, "tunnel", "rotate-token"]) => {
                self.rotate_tunnel_token(id).await
            }
            (&Method::POST, ["v1", "devboxes", id, "rotate-agent-token"]) => {
                self.rotate_agent_token(id).await
            }
            (&Method::DELETE, ["v1", "devboxes", id, "tunnel"]) => self.disable_tunnel(id).await,
            (&Method::GET, ["v1", "cluster"]) => self.cluster(),
            (&Method::GET, ["v1", "openapi.json"]) => Ok(openapi()),
            (
                _,
                ["v1", "devboxes"]
                | ["v1", "devboxes", _]
                | ["v1", "devboxes", _, "tunnel"]
                | ["v1", "devboxes", _, "tunnel", "rotate-token"]
                | ["v1", "devboxes", _, "rotate-agent-token"]
                | ["v1", "events"]
                | ["v1", "cluster"]
                | ["v1", "openapi.json"],
            ) => Err(ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not supported on {path}"),
            )),
            _ => Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no such API path: {path}"),
            )),
        }?;
        Ok(json_response(status, body))
    }

    /// Lets a call with the admin token through. Guessing is throttled before the token is
    /// looked at, so a guess made while throttled tells nothing even when it is right.
    fn authorize(&self, req: &Request<Incoming>, client: IpAddr) -> Result<(), ApiError> {
        if !self.failures.has(&client) {
            self.metrics
                .limited
                .with_label_values(&["admin_failures"])
                .inc();
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed admin calls from this address; wait a minute".into(),
            ));
        }
        let authorized = auth::bearer(req.headers()).is_some_and(|t| self.token.matches(t));
        if !authorized {
            let _ = self.failures.take(&client);
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token: send `Authorization: Bearer <admin token>`".into(),
            ));
        }
        Ok(())
    }

    /// `POST /v1/devboxes`
    async fn create(&self, req: Request<Incoming>) -> Reply {
        let body: CreateDevbox = read_json(req).await?;
        if let Some(id) = &body.id {
            check_id(id)?;
        }
        let mode = body.tunnel.as_ref().map(EnableTunnel::spec).transpose()?;
        let (record, token, issued) = self.blocking(move |r| r.create(body.id, mode)).await?;
        info!(devbox = %record.id, "devbox registered");
        let mut out = json!({ "id": record.id, "agent_token": token.expose() });
        if let Some(issued) = issued {
            out["tunnel"] = self.issued_json(&issued);
        }
        Ok((StatusCode::CREATED, Some(out)))
    }

    /// `GET /v1/devboxes`
    fn list(&self) -> (StatusCode, Option<Value>) {
        let list: Vec<Value> = self
            .registry
            .list()
            .iter()
            .map(|d| self.devbox_json(d))
            .collect();
        (StatusCode::OK, Some(Value::Array(list)))
    }

    /// `GET /v1/devboxes/{id}`
    fn show(&self, id: &str) -> Reply {
        let view = self.registry.get(id).ok_or_else(|| not_found(id))?;
        Ok((StatusCode::OK, Some(self.devbox_json(&view))))
    }

    /// `DELETE /v1/devboxes/{id}`: the agent is told to go away and its connection closed.
    async fn delete(&self, id: &str) -> Reply {
        let target = id.to_owned();
        if let Some(session) = self.blocking(move |r| r.delete(&target)).await? {
            session.revoke("the devbox was deleted");
        }
        info!(devbox = %id, "devbox deleted");
        Ok((StatusCode::NO_CONTENT, None))
    }

    /// `POST /v1/devboxes/{id}/tunnel`
    async fn enable_tunnel(&self, id: &str, req: Request<Incoming>) -> Reply {
        let body: EnableTunnel = read_json(req).await?;
        let spec = body.spec()?;
        let target = id.to_owned();
        let issued = self
            .blocking(move |r| r.enable_tunnel(&target, spec))
            .await?;
        info!(
            devbox = %id,
            mode = issued.record.auth_mode.as_str(),
            rewrite_host = issued.record.rewrite_host,
            raw_tcp = issued.record.raw_tcp,
            "tunnel enabled"
        );
        Ok((StatusCode::OK, Some(self.issued_json(&issued))))
    }

    /// `POST /v1/devboxes/{id}/tunnel/rotate-token`
    async fn rotate_tunnel_token(&self, id: &str) -> Reply {
        let target = id.to_owned();
        let issued = self
            .blocking(move |r| r.rotate_tunnel_token(&target))
            .await?;
        info!(devbox = %id, "tunnel token rotated");
        Ok((StatusCode::OK, Some(self.issued_json(&issued))))
    }

    /// `POST /v1/devboxes/{id}/rotate-agent-token`
    async fn rotate_agent_token(&self, id: &str) -> Reply {
        let target = id.to_owned();
        let token = self
            .blocking(move |r| r.rotate_agent_token(&target))
            .await?;
        info!(devbox = %id, "agent token rotated");
        Ok((
            StatusCode::OK,
            Some(json!({ "id": id, "agent_token": token.expose() })),
        ))
    }

    /// `DELETE /v1/devboxes/{id}/tunnel`
    async fn disable_tunnel(&self, id: &str) -> Reply {
        let target = id.to_owned();
        self.blocking(move |r| r.disable_tunnel(&target)).await?;
        info!(devbox = %id, "tunnel disabled");
        Ok((StatusCode::NO_CONTENT, None))
    }

    /// Runs a registry change (SQLite, fsync) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let registry = self.registry.clone();
        match tokio::task::spawn_blocking(move || f(&registry)).await {
            Ok(result) => result.map_err(ApiError::from),
            Err(e) => {
                warn!(error = %e, "admin task failed");
                Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the edge's log".into(),
                ))
            }
        }
    }

    fn issued_json(&self, issued: &IssuedTunnel) -> Value {
        let mut out = self.tunnel_json(&issued.record);
        if let Some(token) = &issued.auth_token {
            out["auth_token"] = Value::String(token.expose().to_owned());
        }
        out
    }

    /// A tunnel as every answer shows it (its token only in [`Admin::issued_json`]).
    fn tunnel_json(&self, t: &TunnelRecord) -> Value {
        json!({
            "tunnel_key": t.key,
            "auth_mode": t.auth_mode.as_str(),
            "rewrite_host": t.rewrite_host,
            "raw_tcp": t.raw_tcp,
            "http_keep_alive": t.http_keep_alive,
            "wake_on_http": t.wake_on_http,
            "create_time_ms": t.created_ms,
            "url_template": self.registry.urls().template(&t.key),
        })
    }

    fn devbox_json(&self, view: &DevboxView) -> Value {
        let tunnel = view.record.tunnel.as_ref().map(|t| self.tunnel_json(t));
        let mut agent = json!({
            "connected": view.connected_since.is_some(),
            "since": view.connected_since.map(unix),
            "rtt_ms": view.rtt.map(|r| r.as_secs_f64() * 1000.0),
        });
        if let Some(cluster) = &self.cluster {
            agent["edges"] = json!(cluster.holders(&view.record.id));
        }
        json!({
            "id": view.record.id,
            "created_at": view.record.created_at,
            "last_activity_ms": view.last_activity_ms,
            "agent": agent,
            "tunnel": tunnel,
        })
    }

    /// `GET /v1/cluster`
    fn cluster(&self) -> Reply {
        let Some(cluster) = &self.cluster else {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                "this edge is not part of a cluster (`cluster.store` is not set)".into(),
            ));
        };
        let nodes: Vec<Value> = cluster
            .edges()
            .into_iter()
            .map(|e| {
                json!({
                    "node": e.node,
                    "mesh_addr": e.mesh_addr,
                    "agents_addr": e.agents_addr,
                    "last_seen_ms": u64::try_from(e.last_seen.as_millis()).unwrap_or(u64::MAX),
                    "agents": e.agents,
                    "alive": e.alive,
                })
            })
            .collect();
        Ok((
            StatusCode::OK,
            Some(json!({ "node": cluster.node, "nodes": nodes })),
        ))
    }
}

/// `GET /v1/openapi.json`: the document of this API.
fn openapi() -> (StatusCode, Option<Value>) {
    // openapi.rs's tests prove DOCUMENT is JSON.
    let document = serde_json::from_str(crate::openapi::DOCUMENT).unwrap_or(Value::Null);
    (StatusCode::OK, Some(document))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn not_found(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no devbox `{id}`"))
}

fn auth_mode(s: &str) -> Result<AuthMode, ApiError> {
    s.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("`auth_mode` must be \"open\" or \"authenticated\", not {s:?}"),
        )
    })
}

/// Devbox ids: 1-64 characters of letters, digits, `-`, `_` and `.`.
fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("`id` {id:?} must be 1-64 letters, digits, '-', '_' or '.'"),
        ))
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })?
        .to_bytes();
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    // The path names the field to fix (`tunnel.wake_on_http`), which serde_json alone does not.
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let message = match e.path().to_string().as_str() {
            "." => format!("bad JSON body: {}", e.inner()),
            path => format!("bad JSON body: `{path}`: {}", e.inner()),
        };
        ApiError(StatusCode::BAD_REQUEST, message)
    })?;
    de.end()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))?;
    Ok(value)
}

fn json_response(status: StatusCode, body: Option<Value>) -> Response<Body> {
    let mut r = match body {
        Some(v) => {
            let mut text = v.to_string();
            text.push('\n');
            let mut r = Response::new(body::full(text));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        None => Response::new(body::empty()),
    };
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
