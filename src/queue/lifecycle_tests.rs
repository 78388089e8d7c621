//! Property test of a message's life through the real queue (sled in a temporary directory)
//! against a model of Zoom. proptest drives random sequences of sends, edits and deletes by
//! ref, claims, Zoom's answers (applied; refused, as a 429; applied with the answer lost) and
//! crashes over three refs of one account, playing the dispatcher's side with
//! `delivery.send_in_doubt = "retry"`. After every step it checks what Zoom saw:
//! - never two requests for one message at once, never an edit or delete of a message before
//!   its send, nothing after Zoom answered its delete;
//! - a second send of a ref only after a send whose outcome was unknown;
//! - every answer to a producer is the model's (`gone` after a delete, `not_found` for a ref
//!   never sent);
//!
//! and after draining: each live ref shows its last acknowledged content on the message zoomq
//! knows, a ref without an unknown outcome has exactly one message, a deleted ref's message is
//! deleted (or was never sent), and `status` says so.
//!
//! A crash here is a stop without the in-flight answers: whatever was in flight may or may
//! not have reached Zoom, and the restart finds those jobs pending again. (SIGKILL at any
//! moment is the crash campaign's job, in `tests/it/crash.rs`.)

use proptest::prelude::*;

use super::tests::{close, open};
use super::*;
use crate::protocol::{Delete, Edit, MessageState, Selector, Send, StatusQuery, Target};

const REFS: usize = 3;
/// The ref of Zoom's messages whose ref was purged and forgotten.
const FORGOTTEN: usize = usize::MAX;
const ROBOT: &str = "bot@xmpp.zoom.us";

#[derive(Debug, Clone)]
enum Step {
    Send {
        r: usize,
        to: usize,
    },
    Edit {
        r: usize,
    },
    Delete {
        r: usize,
    },
    Claim,
    Answer {
        pick: usize,
        how: How,
    },
    Crash {
        applied: bool,
    },
    /// An operator retries (or purges) one of the dead letters.
    Operator {
        pick: usize,
        purge: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum How {
    Applied,
    Refused,
    LostAfterApply,
    /// Zoom refused it for good (a 400): a dead letter.
    Rejected,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..REFS, 0..2usize).prop_map(|(r, to)| Step::Send { r, to }),
        4 => (0..REFS).prop_map(|r| Step::Edit { r }),
        1 => (0..REFS).prop_map(|r| Step::Delete { r }),
        4 => Just(Step::Claim),
        4 => (0..3usize, prop_oneof![
            4 => Just(How::Applied),
            1 => Just(How::Refused),
            1 => Just(How::LostAfterApply),
            1 => Just(How::Rejected),
        ]).prop_map(|(pick, how)| Step::Answer { pick, how }),
        1 => any::<bool>().prop_map(|applied| Step::Crash { applied }),
        1 => (0..3usize, any::<bool>()).prop_map(|(pick, purge)| Step::Operator { pick, purge }),
    ]
}

/// A message as Zoom holds it.
#[derive(Debug, Clone)]
struct ZoomMessage {
    r: usize,
    text: String,
    deleted: bool,
}

/// What the producer side of the model expects per ref.
#[derive(Debug, Default, Clone)]
struct Expect {
    /// A send was acknowledged (the ref is known).
    known: bool,
    /// A delete was acknowledged.
    deleted: bool,
    /// The last acknowledged content.
    last: Option<String>,
    /// A send's outcome was unknown at least once: a second message is allowed.
    doubted: bool,
    /// A send may have posted a message zoomq cannot name (its outcome was unknown, and it
    /// became a dead letter): one more message at Zoom is allowed, never sent to again.
    orphan_ok: bool,
    /// Zoom answered a delete: nothing more may reach it.
    delete_answered: bool,
    /// A dead letter of its content or delete was purged: what Zoom ends up showing is not
    /// the last acknowledged request (still checked: order, one in flight, no second send).
    unchecked: bool,
}

#[path = "lifecycle_zoom.rs"]
mod zoom;
use zoom::{index_of, ref_of_job, unknown_outcome};

struct Harness {
    dir: tempfile::TempDir,
    queue: Option<LocalQueue>,
    zoom: Vec<ZoomMessage>,
    expect: [Expect; REFS],
    in_flight: Vec<Job>,
    version: u32,
    /// `delivery.send_in_doubt = "dead"`: a send whose outcome is unknown becomes a dead
    /// letter instead of being sent again.
    dead_policy: bool,
}

/// Checks a producer's answer naming an existing ref: `gone` once deleted, `not_found` before
/// it was sent, else accepted (returned).
fn accepted<T: std::fmt::Debug>(expect: &Expect, answer: &Result<T, EnqueueError>) -> bool {
    match (expect.known, expect.deleted) {
        (_, true) => assert!(matches!(answer, Err(EnqueueError::Gone(_))), "{answer:?}"),
        (false, _) => assert!(
            matches!(answer, Err(EnqueueError::NotFound(_))),
            "{answer:?}"
        ),
        _ => {
            assert!(
                answer.is_ok(),
                "a request naming a known ref is accepted: {answer:?}"
            );
            return true;
        }
    }
    false
}

fn reference(r: usize) -> String {
    format!("ref-{r}")
}

fn content(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&serde_json::json!({"head": {"text": text}})).unwrap()
}

impl Harness {
    async fn new(dead_policy: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _, _) = open(dir.path()).await;
        Harness {
            dir,
            queue: Some(queue),
            zoom: Vec::new(),
            expect: Default::default(),
            in_flight: Vec::new(),
            version: 0,
            dead_policy,
        }
    }

    fn queue(&self) -> &LocalQueue {
        self.queue.as_ref().expect("open")
    }

    fn next_text(&mut self, r: usize) -> String {
        self.version += 1;
        format!("r{r}v{}", self.version)
    }

    async fn step(&mut self, step: &Step) {
        match *step {
            Step::Send { r, to } => {
                let text = self.next_text(r);
                let send = Send {
                    reference: reference(r),
                    account_id: "a".into(),
                    robot_jid: ROBOT.into(),
                    to_jid: format!("channel-{to}"),
                    user_jid: None,
                    visible_to_user: None,
                    reply_to: None,
                    is_markdown_support: None,
                    content: content(&text),
                };
                let answer = self.queue().send(&send).await;
                let expect = &mut self.expect[r];
                if expect.deleted {
                    assert!(matches!(answer, Err(EnqueueError::Gone(_))), "{answer:?}");
                } else {
                    answer.expect("a send is accepted");
                    expect.known = true;
                    expect.last = Some(text);
                }
            }
            Step::Edit { r } => {
                let text = self.next_text(r);
                let edit = Edit {
                    target: Target::Ref(reference(r)),
                    account_id: "a".into(),
                    robot_jid: ROBOT.into(),
                    user_jid: None,
                    is_markdown_support: None,
                    content: content(&text),
                };
                let answer = self.queue().enqueue(&edit).await;
                let expect = &mut self.expect[r];
                if accepted(expect, &answer) {
                    expect.last = Some(text);
                }
            }
            Step::Delete { r } => {
                let delete = Delete {
                    target: Target::Ref(reference(r)),
                    account_id: "a".into(),
                    robot_jid: ROBOT.into(),
                    user_jid: None,
                };
                let answer = self.queue().delete(&delete).await;
                let expect = &mut self.expect[r];
                if accepted(expect, &answer) {
                    expect.deleted = true;
                }
            }
            Step::Claim => {
                self.claim().await;
            }
            Step::Answer { pick, how } => {
                if self.in_flight.is_empty() {
                    return;
                }
                let job = self.in_flight.remove(pick % self.in_flight.len());
                self.answer(job, how).await;
            }
            Step::Crash { applied } => {
                for job in std::mem::take(&mut self.in_flight) {
                    if applied {
                        self.apply(&job);
                    }
                    // A send was marked under way: after the restart it is in doubt.
                    if matches!(job.call, Call::Send { .. }) {
                        self.expect[ref_of_job(&job)].doubted = true;
                    }
                }
                close(self.queue.take().expect("open")).await;
                let (queue, _, _) = open(self.dir.path()).await;
                self.queue = Some(queue);
            }
            Step::Operator { pick, purge } => {
                self.queue().settled().await.unwrap();
                let dead = self.queue().dead_letters(None).unwrap();
                if dead.is_empty() {
                    return;
                }
                let letter = &dead[pick % dead.len()];
                self.operator(letter, purge).await;
            }
        }
    }

    /// Retries or purges one dead letter, as `zoomq dead retry|purge JOB_ID` does.
    async fn operator(&mut self, letter: &crate::protocol::DeadLetter, purge: bool) {
        let seq: u64 = letter.job_id.parse().unwrap();
        let r: usize = letter.reference.as_deref().expect("named by ref")[4..]
            .parse()
            .unwrap();
        if purge {
            self.queue().dead_purge(&Selector::One(seq)).await.unwrap();
            let expect = &mut self.expect[r];
            if letter.op == "send" && !expect.deleted {
                // The ref is forgotten with what waited for it: free for a new message. A
                // send whose outcome was unknown may have left one at Zoom.
                expect.known = false;
                expect.last = None;
                // What it may have posted belongs to nobody now (a new send of the ref is a
                // new message).
                for message in self.zoom.iter_mut().filter(|m| m.r == r) {
                    message.r = FORGOTTEN;
                }
            } else {
                expect.unchecked = true;
            }
        } else {
            if letter.op == "send" && letter.reason == "outcome_unknown" {
                // Sent again knowing it may have been posted.
                self.expect[r].doubted = true;
            }
            self.queue().dead_retry(&Selector::One(seq)).await.unwrap();
        }
    }

    /// Claims the account's next job, checking what Zoom would receive: `None` when nothing
    /// is ready, else whether a request is now in flight (a claim may need none).
    async fn claim(&mut self) -> Option<bool> {
        loop {
            self.queue().settled().await.unwrap();
            match self.queue().claim("a").unwrap() {
                Claimed::NotDurable => continue,
                Claimed::Empty => return None,
                Claimed::Skipped { .. } => return Some(false),
                Claimed::Job(job) => {
                    let r = ref_of_job(&job);
                    assert!(
                        self.in_flight.iter().all(|j| ref_of_job(j) != r),
                        "two requests for ref {r} at once"
                    );
                    let expect = &self.expect[r];
                    assert!(
                        !expect.delete_answered,
                        "a request after the delete: {job:?}"
                    );
                    match &job.call {
                        Call::Send { .. } if job.in_doubt && self.dead_policy => {
                            // The dispatcher would not send it: a dead letter holds the ref.
                            let commit = self.queue().dead_letter(&job, unknown_outcome());
                            wait(commit).await.unwrap();
                            return Some(false);
                        }
                        Call::Send { .. } => {
                            let sent_before = self.zoom.iter().any(|m| m.r == r);
                            assert!(
                                !sent_before || expect.doubted,
                                "a second send of ref {r} without an unknown outcome"
                            );
                        }
                        Call::Edit { message_id } => {
                            let message = &self.zoom[index_of(message_id)];
                            assert_eq!(message.r, r, "an edit of another ref's message");
                            assert!(!message.deleted, "an edit of a deleted message");
                        }
                        // A delete whose answer was lost may be repeated (Zoom answers 404/8001,
                        // which is done).
                        Call::Delete { message_id } => {
                            assert_eq!(self.zoom[index_of(message_id)].r, r);
                        }
                    }
                    self.in_flight.push(job);
                    return Some(true);
                }
            }
        }
    }

    async fn answer(&mut self, mut job: Job, how: How) {
        let r = ref_of_job(&job);
        let commit = match how {
            How::Applied => {
                let message_id = self.apply(&job);
                if matches!(job.call, Call::Delete { .. }) {
                    self.expect[r].delete_answered = true;
                }
                let sent = message_id.map(|message_id| SentMessage {
                    message_id,
                    sent_time: None,
                });
                self.queue().complete(&job, sent)
            }
            How::Refused => {
                job.header.next_attempt_ms = 0;
                self.queue().retry_later(&job, false).1
            }
            How::Rejected => self.queue().dead_letter(
                &job,
                DeadInfo {
                    reason: "rejected",
                    status: Some(400),
                    zoom_code: Some(7001),
                    detail: "bad".into(),
                },
            ),
            How::LostAfterApply if self.dead_policy && matches!(job.call, Call::Send { .. }) => {
                self.apply(&job);
                self.expect[r].orphan_ok = true;
                self.queue().dead_letter(&job, unknown_outcome())
            }
            How::LostAfterApply => {
                self.apply(&job);
                if matches!(job.call, Call::Send { .. }) {
                    job.outcome_unknown = true;
                    self.expect[r].doubted = true;
                }
                job.header.attempts += 1;
                job.header.first_failure_ms.get_or_insert(now_ms());
                job.header.next_attempt_ms = 0;
                self.queue().retry_later(&job, true).1
            }
        };
        wait(commit).await.unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_message_lives_as_the_model_says(
        steps in proptest::collection::vec(step(), 1..40),
        dead_policy in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut harness = Harness::new(dead_policy).await;
            for step in &steps {
                harness.step(step).await;
            }
            harness.drain().await;
            close(harness.queue.take().expect("open")).await;
        });
    }
}
