//! The dispatcher: drains the queue to Zoom as fast as each account's limiter allows and no
//! faster. It owns the per-account [`Limiters`], serves accounts with ready work round-robin,
//! runs up to `delivery.concurrency` requests at once, and turns each Zoom [`Outcome`] into a
//! queue transition (complete, retry later, dead letter, or put back).
//!
//! It is one task with one loop ("event-driven": it sleeps until an account gets ready work, a
//! request finishes, a limiter or retry timer expires, or shutdown), plus one short-lived task
//! per request. Only this loop touches the limiters, so they need no lock.
//!
//! Accounts the limiter holds back wait in a timer heap (`waiting`), keyed by when their limiter
//! allows the next request, instead of in the ring: a turn of the loop looks only at accounts
//! that may send now, so with thousands of accounts each paced at a few requests per second a
//! wake-up costs O(log n), not a scan of every account.
//!
//! Here: the loop, the dispatch round and shutdown; `outcome` turns Zoom's answers into queue
//! transitions and limiter feedback; `housekeeping` does the once-a-second chores (gauges, the
//! per-account rows of `stats`).
//!
//! **Invariant:** an account in `ring` or `waiting` has been announced by the queue and not yet
//! reported empty by a claim; it is in exactly one of the two, so each account appears at most
//! once, and one account's backlog or pause only ever costs the others one skipped turn.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod housekeeping;
mod outcome;

use crate::backend::Queue;
use crate::health::Health;
use crate::limiter::Limiters;
use crate::metrics::Metrics;
use crate::queue::{now_ms, Call, Claimed, Head, Job};
use crate::retry::RetryPolicy;
use crate::zoom::{Outcome, ZoomClient};

/// Settings of the dispatcher, from `[delivery]`.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub max_age: Duration,
    /// On shutdown, how long in-flight requests may still take before they are abandoned
    /// (see [`crate::shutdown_grace`]).
    pub shutdown_grace: Duration,
    pub per_account_series: usize,
    /// What to do with a send whose outcome is unknown (`delivery.send_in_doubt`).
    pub send_in_doubt: crate::config::SendInDoubt,
}

/// A delete's query parameters, as its job stores them.
#[derive(Default, serde::Deserialize)]
struct DeleteParams {
    account_id: Option<String>,
    robot_jid: Option<String>,
    user_jid: Option<String>,
}

/// A finished request, reported back to the loop.
struct Finished {
    job: Job,
    /// When the account's limiter granted the request.
    granted: Instant,
    outcome: Outcome,
}

/// How long to hold all sending after the token could not be obtained.
const NO_TOKEN_PAUSE_MIN: Duration = Duration::from_secs(1);
const NO_TOKEN_PAUSE_MAX: Duration = Duration::from_secs(60);
/// The longest an account waits in the timer heap before its limiter is asked again.
const MAX_HELD: Duration = Duration::from_secs(60);

pub struct Dispatcher {
    queue: Queue,
    /// Accounts that just got ready work (from the queue).
    ready_rx: mpsc::UnboundedReceiver<Arc<str>>,
    zoom: ZoomClient,
    limiters: Limiters,
    settings: DispatchSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Accounts with ready work that may send now, served round-robin.
    ring: VecDeque<Arc<str>>,
    /// Accounts with ready work that their limiter holds until the instant given; the `u64`
    /// keeps accounts due at the same instant in the order they were held.
    waiting: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    waiting_seq: u64,
    /// Request slots; a task holds one while its request is in flight.
    slots: Arc<Semaphore>,
    /// Sends claimed before a rate-limit slot (see [`Head::ClaimFirst`]): each waits for its
    /// in-doubt mark to be committed, then for its account's limiter, and leaves the moment
    /// it gets a slot, so that the pacer's log holds the time it really left.
    parked: Vec<(Arc<str>, Job)>,
    /// While set, nothing is sent: the token could not be obtained.
    no_token_until: Option<Instant>,
    no_token_pause: Duration,
    finished_tx: mpsc::UnboundedSender<Finished>,
    finished_rx: mpsc::UnboundedReceiver<Finished>,
    /// While a token request runs on the dispatcher's behalf, its result arrives here.
    token_fetch: Option<tokio::task::JoinHandle<Result<(), String>>>,
    requests: TaskTracker,
    /// Cancelled when shutdown gives up on the requests still in flight.
    abandon: CancellationToken,
    last_housekeeping: Instant,
    /// Deliveries since the last summary log line (one line per busy period, none when idle).
    delivered_since_log: u64,
    last_summary: Instant,
}

impl Dispatcher {
    pub fn new(
        queue: Queue,
        ready_rx: mpsc::UnboundedReceiver<Arc<str>>,
        zoom: ZoomClient,
        limiters: Limiters,
        settings: DispatchSettings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Dispatcher {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Dispatcher {
            queue,
            ready_rx,
            zoom,
            limiters,
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            parked: Vec::new(),
            settings,
            metrics,
            health,
            ring: VecDeque::new(),
            waiting: BinaryHeap::new(),
            waiting_seq: 0,
            no_token_until: None,
            no_token_pause: NO_TOKEN_PAUSE_MIN,
            finished_tx,
            finished_rx,
            token_fetch: None,
            requests: TaskTracker::new(),
            abandon: CancellationToken::new(),
            last_housekeeping: Instant::now(),
            delivered_since_log: 0,
            last_summary: Instant::now(),
        }
    }

    /// Runs until `cancel` fires, then claims nothing more, lets in-flight requests finish
    /// for at most `shutdown_grace`, records their outcomes and abandons the rest.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            self.health.dispatcher_turned();
            while let Ok(account) = self.ready_rx.try_recv() {
                self.ring.push_back(account);
            }
            while let Ok(finished) = self.finished_rx.try_recv() {
                self.handle(finished);
            }
            self.queue.promote_due(now_ms());
            while let Ok(account) = self.ready_rx.try_recv() {
                self.ring.push_back(account);
            }
            let (limiter_wait, not_durable) = self.dispatch_round();
            self.housekeeping();

            let wake_in = [
                limiter_wait,
                self.queue
                    .next_due_ms()
                    .map(|due| Duration::from_millis(due.saturating_sub(now_ms()))),
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match wake_in {
                    Some(wait) => tokio::time::sleep(wait.max(Duration::from_millis(1))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(account) = self.ready_rx.recv() => self.ring.push_back(account),
                Some(finished) = self.finished_rx.recv() => self.handle(finished),
                fetched = token_fetched(&mut self.token_fetch) => {
                    self.token_fetch = None;
                    match fetched {
                        // Fetched, or a refresh ahead of expiry failed while the current token
                        // is still good: keep sending.
                        _ if self.zoom.token_ready() => self.no_token_pause = NO_TOKEN_PAUSE_MIN,
                        // A token that is unusable at once (expiring as it came) is no token.
                        Ok(()) => self.hold_for_token("the new access token expired on arrival"),
                        Err(detail) => self.hold_for_token(&detail),
                    }
                }
                _ = sleep => {}
                _ = self.queue.timer_changed() => {}
                _ = self.queue.committed(), if not_durable => {}
                // Periodic turn so housekeeping and the watchdog's progress counter move
                // even when idle.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => break,
            }
        }
        self.drain().await;
    }

    /// One pass over the ring: every account gets at most one request. Returns how long
    /// until a throttled account may send again (if any is throttled), and whether an account
    /// waits for its oldest job to become durable (then the next commit wakes the loop).
    fn dispatch_round(&mut self) -> (Option<Duration>, bool) {
        let now = Instant::now();
        if let Some(until) = self.no_token_until {
            if until > now {
                return (Some(until - now), false);
            }
            self.no_token_until = None;
        }
        let has_work = !self.ring.is_empty() || !self.waiting.is_empty() || !self.parked.is_empty();
        if has_work && self.token_fetch.is_none() && self.zoom.token_wanted() {
            // Fetch (or refresh ahead of expiry) on the dispatcher's behalf, so that no edit
            // waits for a token while holding a rate-limit slot. The result wakes the loop.
            let zoom = self.zoom.clone();
            self.token_fetch = Some(tokio::spawn(async move { zoom.fetch_token().await }));
        }
        // No slot is taken while no token is at hand: a request waiting for one would leave
        // late, and crowd the next ones into one second at Zoom.
        if has_work && !self.zoom.token_ready() {
            return (None, false);
        }
        // Accounts whose limiter wait is over join the ring, earliest first.
        while let Some(Reverse((due, _, _))) = self.waiting.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((_, _, account))) = self.waiting.pop() else {
                break;
            };
            self.ring.push_back(account);
        }
        let (mut not_durable, mut parked_wait) = self.send_parked();
        for _ in 0..self.ring.len() {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break; // a finishing request wakes the loop
            };
            let Some(account) = self.ring.pop_front() else {
                break;
            };
            // Look before taking a rate-limit slot, so that a slot is never spent on nothing.
            let claimed = match self.queue.head(&account) {
                Head::Ready => None,
                Head::ClaimFirst => {
                    let claimed = self.queue.claim(&account);
                    if let Some(job) = self.claimed(&account, claimed, &mut not_durable) {
                        self.park(account, job, &mut not_durable);
                    }
                    continue;
                }
                Head::NotDurable => {
                    not_durable = true;
                    self.ring.push_back(account);
                    continue;
                }
                // Lets the queue know the account left the ring; it is announced again when it
                // has ready work. A producer may have added some since the look, though.
                Head::Empty => {
                    let claimed = self.queue.claim(&account);
                    match self.claimed(&account, claimed, &mut not_durable) {
                        Some(job) if job.marked_batch.is_some() => {
                            self.park(account, job, &mut not_durable);
                            continue;
                        }
                        Some(job) => Some(job),
                        None => continue,
                    }
                }
            };
            let granted = match self.limiters.try_acquire(&account, SystemTime::now()) {
                Ok(granted) => granted,
                Err(until_allowed) => {
                    if let Some(job) = claimed {
                        self.put_back(&job);
                    }
                    self.hold(account, until_allowed);
                    continue;
                }
            };
            let claimed = match claimed {
                Some(job) => Ok(Claimed::Job(job)),
                None => self.queue.claim(&account),
            };
            if let Some(job) = self.claimed(&account, claimed, &mut not_durable) {
                if job.more {
                    // Back in line once its limiter allows; the heap's wake-up makes sure the
                    // loop asks again then, whatever else happens meanwhile.
                    self.hold(account, Duration::ZERO);
                }
                self.start(job, granted, permit);
            }
        }
        let wait = self
            .waiting
            .peek()
            .map(|Reverse((due, _, _))| due.saturating_duration_since(Instant::now()));
        if let Some(held) = parked_wait.take() {
            return (Some(wait.map_or(held, |w| w.min(held))), not_durable);
        }
        (wait, not_durable)
    }

    /// Parks a claimed send until its mark is on disk (see `parked`).
    fn park(&mut self, account: Arc<str>, job: Job, not_durable: &mut bool) {
        if job.more {
            self.hold(account.clone(), Duration::ZERO);
        }
        self.parked.push((account, job));
        *not_durable = true;
    }

    /// What a claim leaves to do: the job, if there is one; otherwise the account is put
    /// where it belongs (back in the ring, in the timer heap, or nowhere: the queue announces
    /// it again when it has ready work) and `not_durable` set when a commit should wake the
    /// loop.
    fn claimed(
        &mut self,
        account: &Arc<str>,
        claimed: Result<Claimed, crate::queue::StoreError>,
        not_durable: &mut bool,
    ) -> Option<Job> {
        match claimed {
            Ok(Claimed::Job(job)) => return Some(job),
            // No request needed (a slot taken for it goes unused, which is always safe).
            Ok(Claimed::Skipped { more: true }) => self.hold(account.clone(), Duration::ZERO),
            Ok(Claimed::Skipped { more: false }) | Ok(Claimed::Empty) => {}
            // A producer's edit replaced the head between the look and the claim.
            Ok(Claimed::NotDurable) => {
                *not_durable = true;
                self.ring.push_back(account.clone());
            }
            Err(e) => {
                // The queue put the job back (or dropped an unreadable one); keep the account
                // in the ring: a claim that finds nothing ready removes it.
                tracing::error!(account = %account, error = %e, "cannot read a claimed job");
                self.ring.push_back(account.clone());
            }
        }
        None
    }

    /// Sends the parked sends whose mark is on disk and whose limiter allows. Returns whether
    /// one still waits for a commit, and how long until a limiter may allow one.
    fn send_parked(&mut self) -> (bool, Option<Duration>) {
        let mut waiting_commit = false;
        let mut wait: Option<Duration> = None;
        for (account, job) in std::mem::take(&mut self.parked) {
            // Its queue was fenced off (cluster mode: the partition moved): the new owner
            // has the job; this daemon must not send it.
            if job.fence.is_cancelled() {
                continue;
            }
            let durable = self.queue.is_durable(&job);
            if !durable {
                waiting_commit = true;
                self.parked.push((account, job));
                continue;
            }
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.parked.push((account, job)); // a finishing request wakes the loop
                continue;
            };
            match self.limiters.try_acquire(&account, SystemTime::now()) {
                Ok(granted) => self.start(job, granted, permit),
                Err(until_allowed) => {
                    wait = Some(wait.map_or(until_allowed, |w| w.min(until_allowed)));
                    self.parked.push((account, job));
                }
            }
        }
        (waiting_commit, wait)
    }

    /// Puts `account` in the timer heap for `wait`. Waits on the wall clock (a Retry-After, the
    /// daily cap's 00:00 UTC) are re-asked at least once a minute, so a wall clock that steps
    /// or a machine that sleeps never holds an account much past its time.
    fn hold(&mut self, account: Arc<str>, wait: Duration) {
        self.waiting_seq += 1;
        let due = Instant::now() + wait.min(MAX_HELD);
        self.waiting.push(Reverse((due, self.waiting_seq, account)));
    }

    /// Sends a claimed job, unless it is a send whose earlier attempt's outcome is unknown
    /// and `delivery.send_in_doubt` says not to risk a duplicate.
    fn start(&mut self, job: Job, granted: Instant, permit: tokio::sync::OwnedSemaphorePermit) {
        let detail = "an earlier attempt's outcome is unknown (the daemon stopped, or the \
                      answer was lost)";
        if job.in_doubt
            && (self.settings.send_in_doubt == crate::config::SendInDoubt::Dead || job.doubt_new)
            && self.send_in_doubt(&job, detail)
        {
            return;
        }
        self.spawn_request(job, granted, permit);
    }

    fn spawn_request(&self, job: Job, granted: Instant, permit: tokio::sync::OwnedSemaphorePermit) {
        if job.fence.is_cancelled() {
            return; // see `send_parked`
        }
        let zoom = self.zoom.clone();
        let queue = self.queue.clone();
        let finished_tx = self.finished_tx.clone();
        let abandon = self.abandon.clone();
        self.requests.spawn(async move {
            let request = async {
                match &job.call {
                    Call::Send { body } => {
                        // Only once the send is recorded as under way (see `Job::marked_batch`).
                        queue.durable(&job).await;
                        zoom.send_message(body).await
                    }
                    Call::Edit { message_id } => zoom.edit(message_id, &job.body).await,
                    Call::Delete { message_id } => {
                        let params: DeleteParams =
                            serde_json::from_slice(&job.body).unwrap_or_default();
                        let account = params
                            .account_id
                            .as_deref()
                            .unwrap_or(&job.header.account_id);
                        zoom.delete(
                            message_id,
                            account,
                            params.robot_jid.as_deref().unwrap_or(""),
                            params.user_jid.as_deref(),
                        )
                        .await
                    }
                }
            };
            // Shutdown gave up on this request (dropping it closes its connection): the job
            // stays as the claim left it, its records untouched on disk, so after the restart
            // it is pending again and sent again. Cluster mode, the fence: this daemon gave up
            // or lost the job's partition; its new owner sends the job again, after waiting
            // out this one's window. Both are polled first: a request must not even start
            // once its queue is fenced off.
            let outcome = tokio::select! {
                biased;
                _ = job.fence.cancelled() => return,
                _ = abandon.cancelled() => return,
                outcome = request => outcome,
            };
            drop(permit);
            let _ = finished_tx.send(Finished {
                job,
                granted,
                outcome,
            });
        });
    }

    /// Shutdown: nothing more is claimed; in-flight requests get `shutdown_grace` to finish
    /// and their outcomes are recorded; those still running then are abandoned. Abandoning
    /// loses nothing: a claim writes nothing (but a send's in-doubt mark), so an abandoned
    /// job's records are on disk as they were before it was sent, and the restart makes it
    /// pending again (an abandoned send in doubt, as it may have reached Zoom). Waiting longer
    /// would only save sending it twice (Zoom edits are idempotent), at the price of a stop
    /// that lasts as long as Zoom hangs.
    async fn drain(mut self) {
        self.requests.close();
        // Never sent: back in line, no longer in doubt.
        for (_, job) in std::mem::take(&mut self.parked) {
            self.put_back(&job);
        }
        // A token request (against a token endpoint that may hang) serves no one now.
        if let Some(fetch) = self.token_fetch.take() {
            fetch.abort();
        }
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_grace;
        loop {
            tokio::select! {
                Some(finished) = self.finished_rx.recv() => self.handle(finished),
                _ = self.requests.wait() => break,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        in_flight = self.requests.len(),
                        grace_ms = self.settings.shutdown_grace.as_millis() as u64,
                        "abandoning the requests to Zoom still in flight; their edits stay \
                         queued and are sent again after the restart"
                    );
                    self.abandon.cancel();
                    // Each task returns at its next poll, without reporting.
                    self.requests.wait().await;
                    break;
                }
            }
        }
        // Outcomes reported just before the end: recorded, so they are not sent again.
        while let Ok(finished) = self.finished_rx.try_recv() {
            self.handle(finished);
        }
    }
}

/// The result of the dispatcher's token request, when there is one; never, otherwise.
async fn token_fetched(
    fetch: &mut Option<tokio::task::JoinHandle<Result<(), String>>>,
) -> Result<(), String> {
    match fetch.as_mut() {
        Some(fetch) => fetch.await.unwrap_or_else(|e| Err(e.to_string())),
        None => std::future::pending().await,
    }
}
