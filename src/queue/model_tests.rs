//! Property test of the queue's index ([`State`]) against a model small enough to be obviously
//! right. proptest drives both with random sequences of enqueue, claim, finish, requeue, clock
//! and timer steps and restarts over a tiny universe (4 messages, 2 accounts, times in ms), and
//! compares them after every step; at the end it drains the queue and checks that every message
//! ends with its last enqueued version delivered.
//!
//! The model keeps, per message, at most one pending and one in-flight job, each with the
//! version of the content it carries (a job id alone does not tell contents apart: coalescing
//! keeps the id). A pending job is *claimable* when its message has nothing in flight and it is
//! not waiting for its retry time. It also plays the dispatcher's side of the announcements
//! (see `crate::dispatch`): how many times each account stands in the dispatcher's ring.
//!
//! What a restart sees is what the store would hold: every pending and in-flight job with its
//! account and due time, in job-id order, fed to [`State::restore`] exactly as `LocalQueue::open`
//! does.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::state::{Claim, Placed, State, Stored};

const MESSAGES: usize = 4;
const ACCOUNTS: usize = 2;
/// A time later than any due time the test produces: "promote everything".
const FOREVER_MS: u64 = u64::MAX;

/// Whether to check the announcements against the dispatcher's ring: an account with claimable
/// work is in the ring (else nothing ever claims it), and never twice. `State` fails both
/// today, so the checks are off until it is fixed; the shortest failing cases:
/// - lost announcement:
///   enqueue(m, a); claim(a); enqueue(m, a); requeue(m's in-flight job), which is superseded:
///   `requeue` calls `finish`, which makes the pending job ready and sets the account's
///   `announced` flag, but drops the `Finished { announce }` and returns `None`; nothing
///   announces the account again, so its ready jobs wait until a restart;
/// - double announcement: enqueue(m1, a); enqueue(m1, b) moves the job and releases `a`'s line
///   with its `announced` flag while `a` is still in the ring; enqueue(m2, a) announces `a`
///   again.
const CHECK_ANNOUNCEMENTS: bool = true;

/// One step of a test case. Indices are into the small universe; `pick` selects one of the
/// jobs in flight (modulo their number), so shrinking keeps cases meaningful.
#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        message: usize,
        account: usize,
    },
    Claim {
        account: usize,
    },
    /// The in-flight job was delivered.
    Finish {
        pick: usize,
    },
    /// The in-flight job failed and goes back, due `delay_ms` from now (0: back in line).
    Requeue {
        pick: usize,
        delay_ms: u64,
    },
    /// The clock moves; nothing else happens (the dispatcher's timer has not fired yet).
    Advance {
        ms: u64,
    },
    /// The dispatcher's timer fires: `promote_due(now)`.
    PromoteDue,
    /// The process dies and a new one rebuilds the index from the store.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..MESSAGES, 0..ACCOUNTS)
            .prop_map(|(message, account)| Op::Enqueue { message, account }),
        4 => (0..ACCOUNTS).prop_map(|account| Op::Claim { account }),
        3 => (0..4usize).prop_map(|pick| Op::Finish { pick }),
        2 => (0..4usize, prop_oneof![Just(0u64), 1..60u64])
            .prop_map(|(pick, delay_ms)| Op::Requeue { pick, delay_ms }),
        2 => (1..40u64).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::PromoteDue),
        1 => Just(Op::Restart),
    ]
}

/// A job as the model (and the store) knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    seq: u64,
    /// Which enqueue's content the job carries (global counter, 1-based).
    version: u64,
    account: usize,
    due_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    job: Job,
    /// In the timer set: placed (or re-placed) while its due time was still ahead, and not
    /// promoted since.
    waiting: bool,
    /// Its content was sent and failed (requeued), and no newer edit replaced it since.
    failed: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Message {
    pending: Option<Pending>,
    in_flight: Option<Job>,
}

impl Message {
    /// Claimable: pending, nothing in flight, not waiting for its retry time.
    fn ready(&self) -> Option<Job> {
        match (self.pending, self.in_flight) {
            (Some(pending), None) if !pending.waiting => Some(pending.job),
            _ => None,
        }
    }
    /// The account the index files the message under.
    fn account(&self) -> Option<usize> {
        self.pending
            .map(|p| p.job.account)
            .or(self.in_flight.map(|j| j.account))
    }
}

/// The model, plus the checks' bookkeeping.
struct Model {
    now_ms: u64,
    messages: [Message; MESSAGES],
    /// The highest job id handed out so far.
    max_seq: u64,
    next_version: u64,
    last_enqueued: [Option<u64>; MESSAGES],
    last_delivered: [Option<u64>; MESSAGES],
    /// How many times each account stands in the dispatcher's ring: once per announcement,
    /// until a claim reports it empty.
    ring: [usize; ACCOUNTS],
}

impl Model {
    /// Puts a pending job that is not blocked where `State::place` would: waiting if its due
    /// time is still ahead, else ready.
    fn place(&mut self, message: usize) {
        let now_ms = self.now_ms;
        let slot = &mut self.messages[message];
        if let (Some(pending), None) = (&mut slot.pending, slot.in_flight) {
            pending.waiting = pending.job.due_ms > now_ms;
        }
    }

    fn ready_of(&self, account: usize) -> Vec<(u64, usize)> {
        let mut ready: Vec<(u64, usize)> = (0..MESSAGES)
            .filter_map(|m| self.messages[m].ready().map(|job| (job.seq, m)))
            .filter(|&(_, m)| self.messages[m].account() == Some(account))
            .collect();
        ready.sort();
        ready
    }

    /// Jobs in flight, in job-id order, as (message, job).
    fn in_flight(&self) -> Vec<(usize, Job)> {
        let mut jobs: Vec<(usize, Job)> = (0..MESSAGES)
            .filter_map(|m| self.messages[m].in_flight.map(|job| (m, job)))
            .collect();
        jobs.sort_by_key(|(_, job)| job.seq);
        jobs
    }

    /// What the store holds: every pending and in-flight job, in job-id order.
    fn stored(&self) -> Vec<(usize, Job)> {
        let mut jobs: Vec<(usize, Job)> = Vec::new();
        for (m, slot) in self.messages.iter().enumerate() {
            jobs.extend(slot.pending.map(|p| (m, p.job)));
            jobs.extend(slot.in_flight.map(|job| (m, job)));
        }
        jobs.sort_by_key(|(_, job)| job.seq);
        jobs
    }
}

fn message_name(m: usize) -> String {
    format!("m{m}")
}
fn account_name(a: usize) -> String {
    format!("a{a}")
}
fn account_index(name: &str) -> usize {
    name.strip_prefix('a')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unknown account {name:?}"))
}

/// The state machine under test, the model, and the comparison of the two.
struct Harness {
    state: State,
    model: Model,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            state: State::new(1),
            model: Model {
                now_ms: 1_000,
                messages: [Message::default(); MESSAGES],
                max_seq: 0,
                next_version: 1,
                last_enqueued: [None; MESSAGES],
                last_delivered: [None; MESSAGES],
                ring: [0; ACCOUNTS],
            },
        }
    }

    fn step(&mut self, op: &Op) {
        let now_ms = self.model.now_ms;
        match *op {
            Op::Enqueue { message, account } => self.enqueue(message, account),
            Op::Claim { account } => {
                self.claim(account);
            }
            Op::Finish { pick } => {
                let jobs = self.model.in_flight();
                if let Some(&(message, job)) = jobs.get(pick % jobs.len().max(1)) {
                    self.finish(message, job);
                }
            }
            Op::Requeue { pick, delay_ms } => {
                let jobs = self.model.in_flight();
                if let Some(&(message, job)) = jobs.get(pick % jobs.len().max(1)) {
                    self.requeue(message, job, now_ms.saturating_add(delay_ms));
                }
            }
            Op::Advance { ms } => self.model.now_ms = now_ms.saturating_add(ms),
            Op::PromoteDue => {
                let announced = self.state.promote_due(now_ms);
                for slot in &mut self.model.messages {
                    if let Some(pending) = &mut slot.pending {
                        if pending.waiting && pending.job.due_ms <= now_ms {
                            pending.waiting = false;
                        }
                    }
                }
                for account in announced {
                    self.announced(Some(account));
                }
            }
            Op::Restart => self.restart(),
        }
        self.compare();
    }

    fn enqueue(&mut self, message: usize, account: usize) {
        let model = &mut self.model;
        let version = model.next_version;
        model.next_version += 1;
        model.last_enqueued[message] = Some(version);
        let fresh_seq = self.state.next_seq();
        let placed =
            self.state
                .enqueue(&message_name(message), &account_name(account), model.now_ms);
        let announce = match model.messages[message].pending {
            // Coalesced: same job id (so same place in line), newest content; it follows the
            // account the edit names.
            Some(pending) => {
                let Placed::Coalesced {
                    seq,
                    moved_from,
                    announce,
                } = placed
                else {
                    panic!(
                        "message {message} has pending job {pending:?}, enqueue gave {placed:?}"
                    );
                };
                assert_eq!(seq, pending.job.seq, "coalescing keeps the job id");
                let old_account = pending.job.account;
                assert_eq!(
                    moved_from.as_deref().map(account_index),
                    (old_account != account).then_some(old_account),
                    "moved_from"
                );
                let pending = model.messages[message].pending.as_mut().expect("pending");
                pending.job.version = version;
                pending.failed = false;
                if old_account != account {
                    pending.job.account = account;
                    model.place(message);
                }
                announce
            }
            None => {
                let Placed::New { seq, announce } = placed else {
                    panic!("message {message} has no pending job, enqueue gave {placed:?}");
                };
                assert_eq!(seq, fresh_seq, "a new job takes the next id");
                assert!(seq > model.max_seq, "job ids are never reused");
                model.max_seq = seq;
                model.messages[message].pending = Some(Pending {
                    job: Job {
                        seq,
                        version,
                        account,
                        due_ms: 0,
                    },
                    waiting: false,
                    failed: false,
                });
                announce
            }
        };
        self.announced(announce);
    }

    /// Claims as the dispatcher does, and returns the job claimed.
    fn claim(&mut self, account: usize) -> Option<(usize, Job)> {
        let ready = self.model.ready_of(account);
        let in_flight_before: Vec<Option<u64>> = (0..MESSAGES)
            .map(|m| self.state.in_flight_of(&message_name(m)))
            .collect();
        let claim = self.state.claim(&account_name(account));
        let expected = ready.first().map(|&(seq, message)| Claim {
            seq,
            message: self.state.key(&message_name(message)),
            stored: Stored::default(),
            more: ready.len() > 1,
        });
        // Where the job is stored is the ledger's business, not the index's.
        let claim = claim.map(|c| Claim {
            stored: Stored::default(),
            ..c
        });
        assert_eq!(
            claim, expected,
            "claim({account}) takes the lowest-id ready job"
        );
        // The dispatcher takes the account out of its ring to claim, and puts it back only if
        // the claim said there is more. (The test also claims for accounts not in the ring.)
        let in_ring = &mut self.model.ring[account];
        if *in_ring > 0 && !claim.as_ref().is_some_and(|c| c.more) {
            *in_ring -= 1;
        }
        let &(seq, message) = ready.first()?;
        assert_eq!(
            in_flight_before[message], None,
            "claimed a job of a message with one in flight"
        );
        let slot = &mut self.model.messages[message];
        let job = slot.pending.take().expect("ready job is pending").job;
        assert_eq!(job.seq, seq);
        slot.in_flight = Some(job);
        Some((message, job))
    }

    /// The in-flight `job` was delivered.
    fn finish(&mut self, message: usize, job: Job) {
        let finished = self
            .state
            .finish(&message_name(message), job.seq, self.model.now_ms);
        let delivered = &mut self.model.last_delivered[message];
        assert!(
            delivered.is_none_or(|last| last < job.version),
            "message {message}: delivered version {} after version {delivered:?}",
            job.version
        );
        *delivered = Some(job.version);
        self.model.messages[message].in_flight = None;
        self.model.place(message);
        self.announced(finished.announce);
    }

    fn requeue(&mut self, message: usize, job: Job, due_ms: u64) {
        let requeued = self.state.requeue(
            &message_name(message),
            job.seq,
            due_ms,
            self.model.now_ms,
            true,
            Stored::default(),
        );
        let slot = &mut self.model.messages[message];
        slot.in_flight = None;
        let superseded = slot.pending.is_some();
        if !superseded {
            slot.pending = Some(Pending {
                job: Job { due_ms, ..job },
                waiting: false,
                failed: true,
            });
        }
        self.model.place(message);
        let requeued = requeued.expect("the job was in flight");
        assert_eq!(
            requeued.superseded, superseded,
            "requeue is superseded exactly when the message has a pending job"
        );
        self.announced(requeued.announce);
    }

    fn restart(&mut self) {
        let model = &mut self.model;
        let stored = model.stored();
        let mut state = State::new(self.state.next_seq());
        model.ring = [0; ACCOUNTS];
        let mut announces = Vec::new();
        let mut expected = [Message::default(); MESSAGES];
        for &(message, job) in &stored {
            let restored = state.restore(
                &message_name(message),
                &account_name(job.account),
                job.seq,
                job.due_ms,
                Stored::default(),
                model.now_ms,
            );
            let (superseded, announce) =
                (restored.superseded.map(|(seq, _)| seq), restored.announce);
            announces.extend(announce);
            // Jobs come in id order, so a second job of a message is the newer one and wins.
            let older = expected[message].pending.map(|p| p.job.seq);
            assert_eq!(superseded, older, "restore of job {} of {message}", job.seq);
            // Whether the content failed is not stored: after a restart it never has.
            expected[message].pending = Some(Pending {
                job,
                waiting: job.due_ms > model.now_ms,
                failed: false,
            });
        }
        // Every stored job became pending; of two for one message, the newer one.
        for (m, slot) in model.messages.iter().enumerate() {
            let newest = slot
                .pending
                .map(|p| p.job)
                .into_iter()
                .chain(slot.in_flight)
                .max_by_key(|job| job.seq);
            assert_eq!(expected[m].pending.map(|p| p.job), newest);
        }
        model.messages = expected;
        self.state = state;
        for account in announces {
            self.announced(Some(account));
        }
    }

    /// The dispatcher receives an announcement: it puts the account in its ring.
    fn announced(&mut self, account: Option<Arc<str>>) {
        let Some(account) = account else { return };
        let account = account_index(&account);
        assert!(
            !CHECK_ANNOUNCEMENTS || self.model.ring[account] == 0,
            "account {account} announced while already in the dispatcher's ring"
        );
        self.model.ring[account] += 1;
    }

    /// Everything the state exposes agrees with the model.
    fn compare(&self) {
        let state = &self.state;
        let model = &self.model;
        state.check();
        let mut n_pending = 0;
        let mut n_in_flight = 0;
        let mut accounts: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        for (m, slot) in model.messages.iter().enumerate() {
            let name = message_name(m);
            assert_eq!(
                state.pending_of(&name),
                slot.pending.map(|p| p.job.seq),
                "pending of {name}"
            );
            assert_eq!(
                state.in_flight_of(&name),
                slot.in_flight.map(|j| j.seq),
                "in flight of {name}"
            );
            if let Some(pending) = slot.pending {
                assert_eq!(
                    state.is_waiting(&name, pending.job.seq),
                    pending.waiting,
                    "{name} waiting for its retry time"
                );
            }
            assert_eq!(
                state.pending_failed(&name),
                slot.pending.is_some_and(|p| p.failed),
                "{name}'s pending content failed before"
            );
            n_pending += u64::from(slot.pending.is_some());
            n_in_flight += u64::from(slot.in_flight.is_some());
            if let Some(account) = slot.account() {
                *accounts
                    .entry(Arc::from(account_name(account)))
                    .or_default() += usize::from(slot.ready().is_some());
            }
        }
        // One pending and one in-flight job at most per message: the counters count jobs.
        assert_eq!(state.pending(), n_pending, "pending counter");
        assert_eq!(state.in_flight(), n_in_flight, "in-flight counter");
        assert_eq!(state.accounts(), accounts.len(), "accounts with work");
        let top: BTreeMap<Arc<str>, usize> = state.top_accounts(usize::MAX).into_iter().collect();
        assert_eq!(top, accounts, "ready jobs per account");
        let next_due = model
            .messages
            .iter()
            .filter_map(|s| s.pending.filter(|p| p.waiting).map(|p| p.job.due_ms))
            .min();
        assert_eq!(state.next_due_ms(), next_due, "next due time");
        assert!(state.next_seq() > model.max_seq, "next id is fresh");
        // Liveness: an account with claimable work is in the dispatcher's ring, or nobody
        // would ever claim it.
        for a in 0..ACCOUNTS {
            assert!(
                !CHECK_ANNOUNCEMENTS || model.ready_of(a).is_empty() || model.ring[a] > 0,
                "account {a} has ready jobs but is not in the dispatcher's ring {:?}",
                model.ring
            );
        }
    }

    /// Delivers everything: finishes what is in flight, then promotes every timer and claims
    /// and delivers until the queue is empty.
    fn drain(&mut self) {
        self.step(&Op::Advance { ms: FOREVER_MS });
        for _ in 0..=2 * MESSAGES + 1 {
            while let Some(&(message, job)) = self.model.in_flight().first() {
                self.finish(message, job);
                self.compare();
            }
            self.step(&Op::PromoteDue);
            for account in 0..ACCOUNTS {
                while let Some((message, job)) = self.claim(account) {
                    self.compare();
                    self.finish(message, job);
                    self.compare();
                }
            }
            if self.state.pending() == 0 && self.state.in_flight() == 0 {
                break;
            }
        }
        assert_eq!(
            (self.state.pending(), self.state.in_flight()),
            (0, 0),
            "drained"
        );
        assert_eq!(self.state.accounts(), 0, "no account lines left");
    }
}

proptest! {
    #[test]
    fn state_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.step(op);
        }
        harness.drain();
        // End to end: each message's last delivery is its last enqueued content.
        prop_assert_eq!(harness.model.last_delivered, harness.model.last_enqueued);
    }
}
