//! A local HTTP/1 server for the harness's stand-ins (the fake GitHub API,
//! the OIDC issuer): one runtime thread of its own, every connection served
//! by `answer` with the stand-in's shared state, until the runtime is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A stand-in's server: its runtime (the server lives as long as it does) and
/// its base URL.
#[derive(Debug)]
pub struct Local {
    pub runtime: tokio::runtime::Runtime,
    pub url: String,
}

/// Serves `answer(request, state)` on a fresh loopback port, the state made
/// by `state` from the server's URL.
pub fn serve<S, F, Fut>(state: impl FnOnce(&str) -> S, answer: F) -> (Local, Arc<S>)
where
    S: Send + Sync + 'static,
    F: Fn(Request<Incoming>, Arc<S>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(state(&url));
    let shared = state.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let state = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(req, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (Local { runtime, url }, state)
}
