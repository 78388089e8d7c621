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
use crate::protocol::{Delete, Edit, MessageState, Send, StatusQuery, Target};

const REFS: usize = 3;
const ROBOT: &str = "bot@xmpp.zoom.us";

#[derive(Debug, Clone)]
enum Step {
    Send { r: usize, to: usize },
    Edit { r: usize },
    Delete { r: usize },
    Claim,
    Answer { pick: usize, how: How },
    Crash { applied: bool },
}

#[derive(Debug, Clone, Copy)]
enum How {
    Applied,
    Refused,
    LostAfterApply,
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
        ]).prop_map(|(pick, how)| Step::Answer { pick, how }),
        1 => any::<bool>().prop_map(|applied| Step::Crash { applied }),
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
    /// Zoom answered a delete: nothing more may reach it.
    delete_answered: bool,
}

struct Harness {
    dir: tempfile::TempDir,
    queue: Option<Queue>,
    zoom: Vec<ZoomMessage>,
    expect: [Expect; REFS],
    in_flight: Vec<Job>,
    version: u32,
}

fn text_in(body: &[u8]) -> String {
    let body: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    body["content"]["head"]["text"]
        .as_str()
        .expect("the model's content")
        .to_string()
}

fn ref_in(text: &str) -> usize {
    text[1..2].parse().expect("text starts with r<digit>")
}

fn reference(r: usize) -> String {
    format!("ref-{r}")
}

fn content(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&serde_json::json!({"head": {"text": text}})).unwrap()
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _, _) = open(dir.path()).await;
        Harness {
            dir,
            queue: Some(queue),
            zoom: Vec::new(),
            expect: Default::default(),
            in_flight: Vec::new(),
            version: 0,
        }
    }

    fn queue(&self) -> &Queue {
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
                match (expect.known, expect.deleted) {
                    (_, true) => {
                        assert!(matches!(answer, Err(EnqueueError::Gone(_))), "{answer:?}")
                    }
                    (false, _) => {
                        assert!(
                            matches!(answer, Err(EnqueueError::NotFound(_))),
                            "{answer:?}"
                        )
                    }
                    _ => {
                        answer.expect("an edit of a known ref is accepted");
                        expect.last = Some(text);
                    }
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
                match (expect.known, expect.deleted) {
                    (_, true) => {
                        assert!(matches!(answer, Err(EnqueueError::Gone(_))), "{answer:?}")
                    }
                    (false, _) => {
                        assert!(
                            matches!(answer, Err(EnqueueError::NotFound(_))),
                            "{answer:?}"
                        )
                    }
                    _ => {
                        answer.expect("a delete of a known ref is accepted");
                        expect.deleted = true;
                    }
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

    /// What Zoom does with a request; returns a send's message id.
    fn apply(&mut self, job: &Job) -> Option<String> {
        match &job.call {
            Call::Send { body } => {
                let text = text_in(body);
                self.zoom.push(ZoomMessage {
                    r: ref_in(&text),
                    text,
                    deleted: false,
                });
                Some(format!("z{}", self.zoom.len() - 1))
            }
            Call::Edit { message_id } => {
                self.zoom[index_of(message_id)].text = text_in(&job.body);
                None
            }
            Call::Delete { message_id } => {
                self.zoom[index_of(message_id)].deleted = true;
                None
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

    /// Delivers everything, then checks the end state.
    async fn drain(&mut self) {
        for job in std::mem::take(&mut self.in_flight) {
            self.answer(job, How::Applied).await;
        }
        let mut rounds = 0;
        while let Some(requested) = self.claim().await {
            rounds += 1;
            assert!(rounds < 1000, "the queue does not drain");
            if requested {
                let job = self.in_flight.pop().expect("just claimed");
                self.answer(job, How::Applied).await;
            }
        }
        assert_eq!(self.queue().stats().pending, 0);
        for r in 0..REFS {
            self.check_end(r).await;
        }
    }

    async fn check_end(&self, r: usize) {
        let expect = &self.expect[r];
        let messages: Vec<&ZoomMessage> = self.zoom.iter().filter(|m| m.r == r).collect();
        let status = self
            .queue()
            .status(&StatusQuery {
                target: Target::Ref(reference(r)),
                account_id: "a".into(),
                robot_jid: ROBOT.into(),
                wait: None,
            })
            .await;
        if !expect.known {
            assert!(messages.is_empty());
            assert!(
                matches!(status, Err(EnqueueError::NotFound(_))),
                "{status:?}"
            );
            return;
        }
        if !expect.doubted {
            assert!(
                messages.len() <= 1,
                "ref {r} has {} messages",
                messages.len()
            );
        }
        let status = status.expect("a known ref has a status");
        if expect.deleted {
            assert_eq!(status.state, MessageState::Deleted);
            // The message zoomq knows is deleted (or it was never sent).
            if let Some(id) = &status.message_id {
                assert!(
                    self.zoom[index_of(id)].deleted,
                    "ref {r} not deleted at Zoom"
                );
            }
            if !expect.doubted {
                assert!(messages.iter().all(|m| m.deleted));
            }
            return;
        }
        assert_eq!(status.state, MessageState::Sent, "ref {r}");
        let id = status.message_id.expect("a sent message has an id");
        let shown = &self.zoom[index_of(&id)];
        assert_eq!(
            Some(&shown.text),
            expect.last.as_ref(),
            "ref {r} shows the last content"
        );
    }
}

fn ref_of_job(job: &Job) -> usize {
    let reference = super::refs::ref_of(&job.header.message_id).expect("jobs are named by ref");
    reference[4..].parse().unwrap()
}

fn index_of(message_id: &str) -> usize {
    message_id[1..].parse().expect("the model's ids are z<n>")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_message_lives_as_the_model_says(steps in proptest::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut harness = Harness::new().await;
            for step in &steps {
                harness.step(step).await;
            }
            harness.drain().await;
            close(harness.queue.take().expect("open")).await;
        });
    }
}
