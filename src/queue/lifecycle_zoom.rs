//! The Zoom side of the lifecycle model: what Zoom does with each request, the drain at the
//! end of a case, and the end state every ref must be in.

use super::*;

impl Harness {
    /// What Zoom does with a request; returns a send's message id.
    pub(super) fn apply(&mut self, job: &Job) -> Option<String> {
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

    /// Delivers everything, then checks the end state.
    pub(super) async fn drain(&mut self) {
        for job in std::mem::take(&mut self.in_flight) {
            self.answer(job, How::Applied).await;
        }
        let mut rounds = 0;
        loop {
            while let Some(requested) = self.claim().await {
                rounds += 1;
                assert!(rounds < 1000, "the queue does not drain");
                if requested {
                    let job = self.in_flight.pop().expect("just claimed");
                    self.answer(job, How::Applied).await;
                }
            }
            // The operator retries every dead letter, and Zoom takes everything now.
            self.queue().settled().await.unwrap();
            let dead = self.queue().dead_letters(None).unwrap();
            if dead.is_empty() {
                break;
            }
            for letter in &dead {
                self.operator(letter, false).await;
            }
        }
        assert_eq!(self.queue().stats().pending, 0);
        assert_eq!(self.queue().stats().dead, 0);
        for r in 0..REFS {
            self.check_end(r).await;
        }
    }

    async fn check_end(&self, r: usize) {
        let expect = &self.expect[r];
        if expect.unchecked {
            return;
        }
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
            assert!(
                messages.is_empty() || expect.doubted || expect.orphan_ok,
                "ref {r}: {messages:?}"
            );
            assert!(
                matches!(status, Err(EnqueueError::NotFound(_))),
                "{status:?}"
            );
            return;
        }
        if !expect.doubted && !expect.orphan_ok {
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
            if !expect.doubted && !expect.orphan_ok {
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

pub(super) fn text_in(body: &[u8]) -> String {
    let body: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    body["content"]["head"]["text"]
        .as_str()
        .expect("the model's content")
        .to_string()
}

pub(super) fn ref_in(text: &str) -> usize {
    text[1..2].parse().expect("text starts with r<digit>")
}

pub(super) fn ref_of_job(job: &Job) -> usize {
    let reference = super::refs::ref_of(&job.header.message_id).expect("jobs are named by ref");
    reference[4..].parse().unwrap()
}

pub(super) fn index_of(message_id: &str) -> usize {
    message_id[1..].parse().expect("the model's ids are z<n>")
}

pub(super) fn unknown_outcome() -> DeadInfo {
    DeadInfo {
        reason: "outcome_unknown",
        status: None,
        zoom_code: None,
        detail: "lost".into(),
    }
}
