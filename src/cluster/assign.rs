//! Which partition an account is in, and which live daemon should own each partition: pure
//! functions every daemon computes alike, with no coordination but the member list.
//!
//! Accounts are hashed into [`PARTITIONS`] partitions with a hash that is the same in every
//! process and version (FNV-1a), and partitions go to daemons by rendezvous hashing: each
//! partition to the live member with the highest hash of (member, partition). A member joining
//! or leaving moves only the partitions it gains or loses; every daemon agrees given the same
//! member list, and a brief disagreement only delays a take-over (leases decide who owns).

use std::time::Duration;

/// Partitions of the accounts: the unit of ownership, storage and failover. Fixed: it is part
/// of where things are stored.
pub const PARTITIONS: u32 = 32;

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly on short keys: finish with a multiply-xorshift.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// The partition of an account.
pub fn partition_of(account_id: &str) -> u32 {
    (fnv1a(account_id.bytes()) % u64::from(PARTITIONS)) as u32
}

/// The member that should own `partition`, among `members` (ids of live daemons).
pub fn desired_owner(partition: u32, members: &[String]) -> Option<&str> {
    members
        .iter()
        .max_by_key(|m| {
            let bytes = m.bytes().chain(partition.to_be_bytes());
            (fnv1a(bytes), m.as_str())
        })
        .map(String::as_str)
}

/// A live daemon as the balancer weighs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// How long it has been running (`None`: a daemon that does not say, counted as settled).
    pub up: Option<Duration>,
    /// Whether it owns partitions now.
    pub owns: bool,
}

/// The members partitions are given to (sorted ids). A daemon that has just started counts
/// only once it has run for `settle`, unless it already owns partitions or nobody has run that
/// long (all starting together): so a daemon that crashes again and again soon after starting
/// never takes partitions over, and the others do not hand partitions to it, and back, at each
/// of its starts. A member that owns partitions always counts: none is dropped once it took
/// its share.
pub fn eligible(candidates: &[Candidate], settle: Duration) -> Vec<String> {
    let settled = |c: &Candidate| c.up.is_none_or(|up| up >= settle);
    let any_settled = candidates.iter().any(settled);
    let mut ids: Vec<String> = candidates
        .iter()
        .filter(|c| !any_settled || c.owns || settled(c))
        .map(|c| c.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A cluster-wide job id: the partition's own job id and the partition, so that dead letters
/// of different partitions never share an id.
pub fn global_job_id(partition: u32, seq: u64) -> u64 {
    seq * u64::from(PARTITIONS) + u64::from(partition)
}

/// The partition and its own job id of a cluster-wide job id.
pub fn split_job_id(job_id: u64) -> (u32, u64) {
    (
        (job_id % u64::from(PARTITIONS)) as u32,
        job_id / u64::from(PARTITIONS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("host{i}-{:06x}", i * 7919))
            .collect()
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Stable across processes and versions: these are where things are stored.
        assert_eq!(partition_of("acct-0"), partition_of("acct-0"));
        let mut counts = [0u32; PARTITIONS as usize];
        for i in 0..32_000 {
            counts[partition_of(&format!("account-{i}")) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn three_members_share_the_partitions() {
        let members = members(3);
        let mut owned = [0; 3];
        for p in 0..PARTITIONS {
            let owner = desired_owner(p, &members).unwrap();
            owned[members.iter().position(|m| m == owner).unwrap()] += 1;
        }
        assert!(owned.iter().all(|&n| (6..=16).contains(&n)), "{owned:?}");
    }

    proptest! {
        /// A member leaving moves only its own partitions; one joining takes only some.
        #[test]
        fn membership_changes_move_only_what_they_must(n in 2usize..8, gone in 0usize..8) {
            let all = members(n);
            let gone = gone % n;
            let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, m)| m.clone()).collect();
            for p in 0..PARTITIONS {
                let before = desired_owner(p, &all).unwrap();
                let after = desired_owner(p, &rest).unwrap();
                if before != all[gone] {
                    prop_assert_eq!(before, after);
                }
            }
        }

        /// Some member always counts; owners always count; a newcomer that owns nothing
        /// counts only when settled or when nobody is.
        #[test]
        fn eligibility_keeps_owners_and_holds_newcomers_back(
            members in proptest::collection::vec((proptest::option::of(0u64..20_000), any::<bool>()), 1..8),
        ) {
            let settle = Duration::from_secs(10);
            let candidates: Vec<Candidate> = members.iter().enumerate().map(|(i, (up, owns))| Candidate {
                id: format!("d{i}"),
                up: up.map(Duration::from_millis),
                owns: *owns,
            }).collect();
            let chosen = eligible(&candidates, settle);
            prop_assert!(!chosen.is_empty());
            let any_settled = candidates.iter().any(|c| c.up.is_none_or(|u| u >= settle));
            for c in &candidates {
                let settled = c.up.is_none_or(|u| u >= settle);
                let expected = c.owns || settled || !any_settled;
                prop_assert_eq!(chosen.contains(&c.id), expected, "{:?}", c);
            }
        }

        #[test]
        fn job_ids_round_trip(p in 0..PARTITIONS, seq in 0u64..(1 << 50)) {
            prop_assert_eq!(split_job_id(global_job_id(p, seq)), (p, seq));
        }
    }
}
