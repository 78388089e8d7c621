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
