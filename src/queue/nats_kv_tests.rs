//! How a commit is cut into JetStream batches: never splitting a write, in order.

use super::*;
use proptest::prelude::*;

/// Writes of `sizes` messages, each message named `w<write>.<place in it>`.
fn writes(sizes: &[usize]) -> Vec<Vec<Message>> {
    sizes
        .iter()
        .enumerate()
        .map(|(w, &n)| {
            (0..n)
                .map(|i| (format!("w{w}.{i}"), HeaderMap::new(), Bytes::new()))
                .collect()
        })
        .collect()
}

fn write_of(subject: &str) -> usize {
    subject[1..].split_once('.').unwrap().0.parse().unwrap()
}

/// 990 one-message writes, then a value in 20 parts, which would straddle the end of the
/// first batch: it starts the second one, whole.
#[test]
fn a_write_that_does_not_fit_starts_the_next_batch() {
    let mut sizes = vec![1; 990];
    sizes.push(20);
    sizes.extend(vec![1; 1500]);
    let out = chunks(writes(&sizes));
    let lens: Vec<usize> = out.iter().map(Vec::len).collect();
    assert_eq!(lens, [990, 999, 521]);
    assert_eq!(out[1][0].0, "w990.0");
    assert_eq!(out[1][19].0, "w990.19");
}

proptest! {
    /// However many writes of however many messages (a value in up to 999 parts with its
    /// tombstones), the batches hold them all, in order; none holds more than
    /// [`MAX_BATCH`] with its commit message; each write is whole in one batch; and a
    /// batch ends only where the next write would not fit in it.
    #[test]
    fn batches_keep_each_write_whole_and_in_order(
        sizes in proptest::collection::vec(
            prop_oneof![8 => 1usize..4, 2 => 1usize..60, 1 => 1usize..MAX_BATCH],
            0..120,
        ),
    ) {
        let input = writes(&sizes);
        let all: Vec<String> = input.iter().flatten().map(|m| m.0.clone()).collect();
        let out = chunks(input);
        let batched: Vec<String> = out.iter().flatten().map(|m| m.0.clone()).collect();
        prop_assert_eq!(batched, all);
        let mut batch_of = std::collections::HashMap::new();
        for (b, batch) in out.iter().enumerate() {
            prop_assert!(batch.len() < MAX_BATCH, "{} messages", batch.len());
            prop_assert!(!batch.is_empty() || out.len() == 1);
            for (subject, _, _) in batch {
                let first = *batch_of.entry(write_of(subject)).or_insert(b);
                prop_assert_eq!(first, b, "{} is split", subject);
            }
            if let Some(next) = out.get(b + 1) {
                let next_write = sizes[write_of(&next[0].0)];
                prop_assert!(batch.len() + next_write > MAX_BATCH - 1);
            }
        }
    }
}
