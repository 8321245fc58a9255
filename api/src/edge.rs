//! The edge: who may reach the server, and how much of it a client may hold.
//!
//! - **Host**: a request is answered only when its `Host` names the server — its listen
//!   address (any IP address when it listens on all of them; `localhost` too on a
//!   loopback address or all of them) or a name in `ANNALS_ALLOWED_HOSTS` — else 421 `unknown-host`. A
//!   page on another name that DNS rebinding points at this machine reads nothing.
//! - **Origin**: a request that changes state (any method but GET, HEAD and OPTIONS)
//!   sent by a browser from another origin than the server's own, or one listed in
//!   `ANNALS_ALLOWED_ORIGINS`, is refused (403 `cross-origin`): a page open on the same
//!   machine cannot drive the server.
//! - **Connections** (`serve_connections`, HTTP/1.1): header reads, idle keep-alive
//!   connections, clients that stop reading their answer and the number of open
//!   connections are bounded, and so is the wait for
//!   requests in flight at shutdown; `Bounds` holds the settings.
//!
//! Invariant: every refusal here is a problem+json answer, and none reads a body.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::error::ApiError;

/// The names a request's `Host` may give.
#[derive(Debug, Clone)]
pub struct Hosts {
    listen: IpAddr,
    /// Lower-cased names from `ANNALS_ALLOWED_HOSTS`; `*` admits every host.
    names: Vec<String>,
}

impl Hosts {
    /// The listen address's, and `names` (host names, without a port).
    pub fn new(listen: IpAddr, names: &[String]) -> Self {
        Hosts {
            listen,
            names: names
                .iter()
                .map(|n| n.trim().to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a `Host` value (`name`, `name:port`, `1.2.3.4:80`, `[::1]:80`) names this
    /// server. The port is not compared: a proxy or a container may map it, and no
    /// rebinding can change an address written as digits.
    pub fn admits(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if self.names.iter().any(|n| n == "*" || *n == name) {
            return true;
        }
        match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => ip == self.listen || self.listen.is_unspecified(),
            Err(_) => {
                name == "localhost" && (self.listen.is_loopback() || self.listen.is_unspecified())
            }
        }
    }
}

/// The name part of a `Host` value: without its port, a bracketed IPv6 address kept whole.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Who may reach the server: the hosts it answers to, and the browser origins besides its
/// own that may change state.
#[derive(Debug, Clone)]
pub struct Admission {
    pub hosts: Hosts,
    /// Origins as browsers send them (`https://crm.example.com`), lower-cased.
    pub origins: Vec<String>,
}

impl Admission {
    pub fn new(hosts: Hosts, origins: &[String]) -> Self {
        Admission {
            hosts,
            origins: origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    fn check(&self, request: &Request) -> Result<(), ApiError> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        let Some(host) = host.filter(|h| self.hosts.admits(h)) else {
            return Err(ApiError::UnknownHost);
        };
        if matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS
        ) {
            return Ok(());
        }
        let Some(origin) = request.headers().get(header::ORIGIN) else {
            // Not sent by a browser's page (a browser sends Origin with every request
            // that may change state).
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("null").to_ascii_lowercase();
        // The server's own pages (the origin's host and port are the request's Host).
        let own = origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host));
        if own || self.origins.contains(&origin) {
            Ok(())
        } else {
            Err(ApiError::CrossOrigin(origin))
        }
    }
}

/// Outermost but for the observation: the Host and the Origin (see the module's doc).
pub async fn admit(
    State(admission): State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    match admission.check(&request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// How much of the server a client may hold.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// How long a client may take to send a request's headers, from the connection's
    /// start or from the end of its previous answer: a keep-alive connection idle this
    /// long is closed too, and so is one whose client stops reading its answer for as
    /// long (`ANNALS_HEADER_READ_TIMEOUT`).
    pub header_read_timeout: Duration,
    /// How many connections may be open at once; more wait to be accepted
    /// (`ANNALS_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// At shutdown, how long requests in flight may take to finish before their
    /// connections are closed (`ANNALS_SHUTDOWN_GRACE`).
    pub shutdown_grace: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` within `bounds` until `shutdown` completes; then stops
/// accepting, lets requests in flight finish for up to the grace, and closes whatever
/// connection is left.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let open = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // A connection past the cap waits in the listen queue, never taking a descriptor.
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was accepted:
                    // the listener itself is fine.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = serve_one(stream, peer, router.clone(), bounds);
        let watched = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(error) = watched.await {
                // A client that hung up, sent garbage or was too slow with its headers.
                tracing::debug!(%peer, %error, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("no longer accepting connections; finishing the requests in flight");
    if tokio::time::timeout(bounds.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?bounds.shutdown_grace,
            "requests still in flight after the shutdown grace; their connections are closed"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// One HTTP/1.1 connection under the header-read bound, which also bounds how long a
/// keep-alive connection may stay idle (the wait for the next request's headers starts
/// when the previous answer has been written).
fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    bounds: Bounds,
) -> impl hyper_util::server::graceful::GracefulConnection<Error = hyper::Error> {
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            router.clone().oneshot(request)
        });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_read_timeout)
        .keep_alive(true)
        .serve_connection(
            TokioIo::new(Reading::new(stream, bounds.header_read_timeout)),
            service,
        )
}

/// A connection whose client must keep reading: a write that cannot go on for `limit`
/// (the client stopped reading its answer, its window shut) fails, and the connection
/// is closed, so a client that never reads cannot hold a connection for ever.
struct Reading<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Reading<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Reading {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a write step: the stall's clock runs while it is pending, and an error ends
    /// it once the limit passes.
    fn watch<R>(&mut self, cx: &mut Context<'_>, step: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if step.is_ready() {
            self.stalled = None;
            return step;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its answer",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Reading<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Reading<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let step = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, step)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let step = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, step)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let step = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, step)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let step = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, step)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
