//! systemd notifications through sd-notify. Every call is a no-op without `NOTIFY_SOCKET`, so
//! the daemon behaves the same under systemd, in a container and in tests; a failure to send is
//! logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` in one datagram, as `Type=notify-reload` requires.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading configuration"),
        ]),
        Err(e) => debug!(error = %e, "cannot read CLOCK_MONOTONIC"),
    }
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: final sync of every database"),
    ]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

pub fn extend_timeout(by: Duration) {
    let usec = by.as_micros().min(u32::MAX as u128) as u32;
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// The watchdog interval systemd asked for, if any (`WATCHDOG_USEC`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
