//! The random faults of one request ([`Faults`]), drawn from the seeded generator, and the
//! precedence among them that [`Faults`] documents.

use std::time::Duration;

use axum::http::StatusCode;
use rand::Rng;

use super::reply::retry_after_value;
use super::Faults;

/// The random faults decided for one admitted request.
pub(crate) struct FaultDraw {
    /// Delay before the request is applied and answered.
    pub slow: Option<Duration>,
    pub outcome: FaultOutcome,
}

pub(crate) enum FaultOutcome {
    None,
    /// Close the connection; nothing is applied.
    Reset,
    /// Answer this status; nothing is applied.
    ServerError(StatusCode),
    /// Answer 429, with the `Retry-After` value if the configured form sends one; nothing is
    /// applied.
    Spurious429(Option<String>),
    /// Apply the request, then close the connection.
    ResetAfterApply,
    /// Apply the request, then answer this status.
    ServerErrorAfterApply(StatusCode),
}

impl FaultDraw {
    /// Always draws the same number of values, so the n-th request gets the same faults
    /// whatever the probabilities of earlier requests turned out to be.
    pub fn draw(faults: &Faults, rng: &mut impl Rng) -> FaultDraw {
        let reset: f64 = rng.random();
        let error_5xx: f64 = rng.random();
        let spurious_429: f64 = rng.random();
        let slow: f64 = rng.random();
        let slow_fraction: f64 = rng.random();
        let status_pick = rng.random_range(0..3usize);
        let reset_after_apply: f64 = rng.random();
        let error_5xx_after_apply: f64 = rng.random();

        let slow_span = faults.slow_max.saturating_sub(faults.slow_min);
        let outcome = if reset < faults.reset {
            FaultOutcome::Reset
        } else if error_5xx < faults.error_5xx {
            let statuses = [
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
            ];
            FaultOutcome::ServerError(statuses[status_pick])
        } else if spurious_429 < faults.spurious_429 {
            let retry_after = faults
                .spurious_429_retry_after
                .map(|form| retry_after_value(form, faults.spurious_429_delay));
            FaultOutcome::Spurious429(retry_after)
        } else if reset_after_apply < faults.reset_after_apply {
            FaultOutcome::ResetAfterApply
        } else if error_5xx_after_apply < faults.error_5xx_after_apply {
            // 503 says "not now", which a server that did the work would not say; a gateway
            // that passed the request on and then gave up says 502 or 504.
            let statuses = [
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::BAD_GATEWAY,
                StatusCode::GATEWAY_TIMEOUT,
            ];
            FaultOutcome::ServerErrorAfterApply(statuses[status_pick])
        } else {
            FaultOutcome::None
        };
        FaultDraw {
            slow: (slow < faults.slow).then(|| faults.slow_min + slow_span.mul_f64(slow_fraction)),
            outcome,
        }
    }
}
