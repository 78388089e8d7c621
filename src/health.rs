//! Liveness and readiness facts shared between the tasks that know them and the places that
//! report them (`/readyz`, `zoomq stats`, the systemd watchdog and STATUS line).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Shared health flags. Writers are the tasks named on each field.
#[derive(Debug, Default)]
pub struct Health {
    /// Set by `lib::run` once the producer socket is bound.
    socket_bound: AtomicBool,
    /// The last token error, set by the Zoom client and cleared by its next success.
    token_error: Mutex<Option<String>>,
    /// Bumped by the dispatcher on every loop turn; the watchdog pings only while it moves.
    dispatcher_turns: AtomicU64,
}

impl Health {
    pub fn set_socket_bound(&self, bound: bool) {
        self.socket_bound.store(bound, Ordering::Release);
    }
    pub fn socket_bound(&self) -> bool {
        self.socket_bound.load(Ordering::Acquire)
    }
    pub fn set_token_error(&self, error: Option<String>) {
        *self.token_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
    pub fn token_error(&self) -> Option<String> {
        self.token_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    pub fn dispatcher_turned(&self) {
        self.dispatcher_turns.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dispatcher_turns(&self) -> u64 {
        self.dispatcher_turns.load(Ordering::Relaxed)
    }
}
