//! Unit tests of the index: the cases worth naming; `model_tests.rs` covers the rest.

use super::*;

#[test]
fn coalesces_into_pending_but_not_in_flight() {
    let mut state = State::new(1);
    let Placed::New { seq: first, .. } = state.enqueue("m", "a", 0) else {
        panic!()
    };
    assert!(matches!(state.enqueue("m", "a", 0), Placed::Coalesced { seq, .. } if seq == first));
    let claim = state.claim("a").unwrap();
    assert_eq!(claim.seq, first);
    // In flight: a new edit is a new pending job, blocked behind the in-flight one.
    let Placed::New { seq: second, .. } = state.enqueue("m", "a", 0) else {
        panic!()
    };
    assert!(state.claim("a").is_none(), "blocked behind in-flight job");
    state.check();
    let finished = state.finish("m", first, 0);
    assert_eq!(finished.announce.as_deref(), Some("a"));
    assert_eq!(state.claim("a").unwrap().seq, second);
    state.check();
}

#[test]
fn order_is_first_enqueue() {
    let mut state = State::new(1);
    state.enqueue("m1", "a", 0);
    state.enqueue("m2", "a", 0);
    state.enqueue("m1", "a", 0); // coalesced: keeps its place
    let (m1, m2) = (state.key("m1"), state.key("m2"));
    assert_eq!(state.claim("a").unwrap().message, m1);
    assert_eq!(state.claim("a").unwrap().message, m2);
}

#[test]
fn requeue_waits_and_is_superseded_by_newer_pending() {
    let mut state = State::new(1);
    state.enqueue("m", "a", 0);
    let claim = state.claim("a").unwrap();
    assert!(
        !state
            .requeue("m", claim.seq, 1_000, 0, true, Stored::default())
            .unwrap()
            .superseded
    );
    assert!(state.claim("a").is_none());
    assert_eq!(state.next_due_ms(), Some(1_000));
    assert_eq!(state.promote_due(1_000), vec![Arc::<str>::from("a")]);
    let claim = state.claim("a").unwrap();
    state.enqueue("m", "a", 0);
    assert!(
        state
            .requeue("m", claim.seq, 5_000, 0, true, Stored::default())
            .unwrap()
            .superseded,
        "superseded"
    );
    assert_eq!(state.pending(), 1);
    assert_eq!(state.in_flight(), 0);
    state.check();
}

#[test]
fn restore_keeps_newest() {
    let mut state = State::new(1);
    let restore = |state: &mut State, seq| {
        let stored = Stored::default();
        let restored = state.restore("m", "a", seq, 0, stored, 0);
        restored.superseded.map(|(seq, _)| seq)
    };
    assert_eq!(restore(&mut state, 3), None);
    assert_eq!(restore(&mut state, 7), Some(3));
    assert_eq!(restore(&mut state, 5), Some(5));
    assert_eq!(state.claim("a").unwrap().seq, 7);
    assert_eq!(state.next_seq(), 8);
    state.check();
}

#[test]
fn accounts_are_released_when_idle() {
    let mut state = State::new(1);
    state.enqueue("m", "a", 0);
    let claim = state.claim("a").unwrap();
    state.finish("m", claim.seq, 0);
    assert_eq!(state.accounts(), 0);
    state.check();
}

#[test]
fn a_held_message_keeps_its_content_out_of_line_until_released() {
    let mut state = State::new(1);
    let key = state.key("m");
    state.enqueue("m", "a", 0);
    let send = state.claim("a").unwrap();
    let Placed::New { seq: waiting, .. } = state.enqueue("m", "a", 0) else {
        panic!()
    };
    // The send became a dead letter: not in flight any more, and its message held.
    state.hold_in_flight(key, send.seq);
    assert_eq!(state.in_flight(), 0);
    assert_eq!(state.jobs_of_key(key), (waiting, 0));
    assert!(state.claim("a").is_none(), "held content is not claimable");
    assert!(matches!(state.enqueue("m", "a", 0), Placed::Coalesced { seq, .. } if seq == waiting));
    assert!(
        state.finish_key(key, HELD, 0).announce.is_none(),
        "a hold is no job"
    );
    state.check();
    let released = state.release(key, 0);
    assert_eq!(released.announce.as_deref(), Some("a"));
    assert_eq!(state.claim("a").unwrap().seq, waiting);
    state.check();
}

#[test]
fn a_hold_found_at_the_open_blocks_what_recovery_restores() {
    let mut state = State::new(1);
    let key = state.key("m");
    state.hold(key, "a");
    state.check();
    let stored = Stored::default();
    state.restore("m", "a", 7, 0, stored, 0);
    assert!(state.claim("a").is_none());
    state.check();
    // Released with nothing pending, a hold leaves nothing behind.
    let other = state.key("n");
    state.hold(other, "b");
    assert!(state.release(other, 0).announce.is_none());
    assert_eq!(state.accounts(), 1);
    assert_eq!(state.release(key, 0).announce.as_deref(), Some("a"));
    assert_eq!(state.claim("a").unwrap().seq, 7);
    state.check();
}
