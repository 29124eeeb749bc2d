//! Every answer from the API server is size-capped as it streams in.
//!
//! kube's client collects a body whole and splits a watch into lines with
//! no limit, so a hostile or broken server could make gpuprov hold any
//! amount: a 1 GiB Node answer, a watch line that never ends. A layer under
//! the client counts the bytes of each answer (each line of a watch) and
//! fails the request once they pass `ANSWER_CAP`, before they are kept.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body, Frame};

/// The most bytes one answer (or one watch event) may have. etcd keeps no
/// object over 1.5 MiB, and gpuprov's lists (the pods on its node) are a
/// few hundred KiB; 16 MiB is far above any real answer and keeps a run
/// well within its memory.
pub const ANSWER_CAP: usize = 16 << 20;

/// An answer (or a watch event) larger than `ANSWER_CAP`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the API server's {what} passed {} MiB, far more than any real object: it was dropped unread",
    ANSWER_CAP >> 20
)]
pub struct AnswerTooLarge {
    what: &'static str,
}

/// What an error says when it is (or was caused by) an answer over the
/// cap: that alone, without kube's wrappers around it.
pub fn too_large(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(cap) = e.downcast_ref::<AnswerTooLarge>() {
            return Some(cap.to_string());
        }
        // kube hands body errors on inside `io::Error`s (a watch's lines).
        if let Some(cap) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<AnswerTooLarge>())
        {
            return Some(cap.to_string());
        }
        current = e.source();
    }
    None
}

/// A kube client whose answers are capped.
pub fn client(config: ::kube::Config) -> Result<::kube::Client, ::kube::Error> {
    Ok(::kube::client::ClientBuilder::try_from(config)?
        .with_layer(&CapLayer)
        .build())
}

#[derive(Clone, Copy)]
struct CapLayer;

impl<S> tower::Layer<S> for CapLayer {
    type Service = Capped<S>;
    fn layer(&self, inner: S) -> Capped<S> {
        Capped { inner }
    }
}

#[derive(Clone)]
struct Capped<S> {
    inner: S,
}

impl<S, B, ReqBody> tower::Service<Request<ReqBody>> for Capped<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<CappedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // A watch is one answer that never ends: its cap is per line.
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| CappedBody {
                inner: Box::pin(body),
                watch,
                counted: 0,
            }))
        })
    }
}

/// A body that fails once it passes the cap: the whole body, or for a
/// watch the bytes since its last newline.
pub struct CappedBody<B> {
    inner: Pin<Box<B>>,
    watch: bool,
    counted: usize,
}

impl<B> Body for CappedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match std::task::ready!(self.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let newlines = (
                data.iter().position(|b| *b == b'\n'),
                data.iter().rposition(|b| *b == b'\n'),
            );
            // The line a newline ends counts too, not only what follows.
            let ended = match newlines.0 {
                Some(first) if self.watch => self.counted.saturating_add(first),
                _ => 0,
            };
            self.counted = match (self.watch, newlines.1) {
                (true, Some(last)) => data.len() - last - 1,
                _ => self.counted.saturating_add(data.len()),
            };
            if self.counted.max(ended) > ANSWER_CAP {
                let what = if self.watch { "watch event" } else { "answer" };
                return Poll::Ready(Some(Err(Box::new(AnswerTooLarge { what }))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
