//! A TCP listener whose connections a request handler can reset without answering.
//!
//! axum gives a handler no way to drop its connection, yet the sandbox must simulate a peer
//! that vanishes mid-request. Each accepted stream is wrapped in a [`ResettableStream`] sharing
//! a [`ResetSwitch`] with the handler (through axum's `ConnectInfo`). Once a handler flips the
//! switch, every read and write on the stream fails, so hyper drops the connection before it
//! writes a byte of the response, and `SO_LINGER = 0` turns the close into a TCP RST. The
//! client sees a transport error, never an HTTP status.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The sandbox's listener: a `TcpListener` whose streams can be reset.
pub(crate) struct ResettableListener(pub TcpListener);

/// Shared between a connection and the handlers of its requests; flipping it kills the
/// connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct ResetSwitch(Arc<AtomicBool>);

impl ResetSwitch {
    pub fn reset(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_reset(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A TCP stream that fails every operation once its switch is flipped.
pub(crate) struct ResettableStream {
    stream: TcpStream,
    switch: ResetSwitch,
    /// Whether `SO_LINGER = 0` was already set, so it is set once.
    lingering_off: bool,
}

impl ResettableStream {
    /// `Some(error)` once the switch is flipped.
    fn check(&mut self) -> Option<io::Error> {
        if !self.switch.is_reset() {
            return None;
        }
        if !self.lingering_off {
            self.lingering_off = true;
            // Without it the close is a polite FIN; a reset is what a dead peer looks like.
            if let Err(error) = self.stream.set_zero_linger() {
                tracing::debug!(%error, "sandbox could not set SO_LINGER");
            }
        }
        Some(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "sandbox reset the connection",
        ))
    }
}

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let stream = ResettableStream {
                        stream,
                        switch: ResetSwitch::default(),
                        lingering_off: false,
                    };
                    return (stream, addr);
                }
                Err(error) => {
                    tracing::debug!(%error, "sandbox accept failed");
                    // Out of file descriptors and the like: don't spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for ResetSwitch {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        stream.io().switch.clone()
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}
