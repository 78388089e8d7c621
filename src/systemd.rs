//! systemd integration: inherited listening sockets (socket activation), `sd_notify` state
//! messages and the watchdog. Every helper here logs its failures and never fails the daemon:
//! outside systemd they are no-ops.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use sd_notify::NotifyState;

/// Takes the listening socket systemd passed (LISTEN_FDS), if any. Must run before the tokio
/// runtime starts any thread, because it reads and unsets process-wide environment variables.
pub fn take_inherited_listener() -> Option<UnixListener> {
    // SAFETY: called from `main` before any other thread exists, so nothing reads the
    // environment concurrently while `listen_fds_and_unset_env` removes LISTEN_* from it.
    #[allow(unsafe_code)]
    let fds = match unsafe { sd_notify::listen_fds_and_unset_env() } {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("zoomq: ignoring invalid LISTEN_FDS: {e}");
            return None;
        }
    };
    let mut fds = fds.into_iter();
    let fd = fds.next()?;
    if fds.len() > 0 {
        eprintln!("zoomq: systemd passed several sockets; using the first");
    }
    use std::os::fd::FromRawFd;
    // SAFETY: systemd hands us ownership of this descriptor (SD_LISTEN_FDS_START onwards);
    // nothing else in the process refers to it.
    #[allow(unsafe_code)]
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    Some(listener)
}

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// READY=1 with a first STATUS line.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

pub fn notify_watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// The watchdog interval systemd expects pings at (WATCHDOG_USEC), if enabled for us.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
