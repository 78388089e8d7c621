//! What the queue remembers of a message beyond its jobs: for a message named by a producer's
//! `ref`, how to send it and, once sent, Zoom's `message_id`; for any message, that it was
//! deleted. Pure data and decisions, no I/O: `queue::lifecycle` and `queue::delivery` persist
//! each change as an `r` record in the same group commit as the jobs it concerns.
//!
//! A ref's record is written when its first send is accepted (so the send's parameters are
//! durable with the job), when an attempt to send it starts (`in_doubt`, committed *before*
//! the request leaves, so a crash during it is known after the restart), when Zoom answers
//! (its `message_id`, written before any edit of the ref can be claimed), when it is deleted
//! or dead-lettered, and after each delivered job (its last use). It is forgotten
//! `storage.ref_retention` after its last use, unless a job or a dead letter still needs it.
//!
//! **Invariant:** a record with `message_id` has no `send` and is not `in_doubt`; a deleted
//! record never becomes live again.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::slab::MessageKey;

/// Separates the parts of a ref's name. Identifiers may not hold control characters, so no
/// message id can look like a ref's name and no two refs share one.
const SEP: char = '\u{1f}';

/// The index's name of the message a producer calls `reference`.
pub fn ref_name(account_id: &str, robot_jid: &str, reference: &str) -> String {
    format!("{SEP}ref{SEP}{account_id}{SEP}{robot_jid}{SEP}{reference}")
}

/// The `ref` in a name built by [`ref_name`]; `None` for a message id.
pub fn ref_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(SEP)?.strip_prefix("ref")?;
    rest.rsplit(SEP).next()
}

/// The `account_id` in a name built by [`ref_name`]; `None` for a message id.
pub fn account_of(name: &str) -> Option<&str> {
    let rest = name
        .strip_prefix(SEP)?
        .strip_prefix("ref")?
        .strip_prefix(SEP)?;
    rest.split(SEP).next()
}

/// How to send a message named by a ref (the rest of the request body is its content job's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendParams {
    pub to_jid: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub visible_to_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reply_to: Option<String>,
}

/// Why a ref is held: its send went to the dead letters, and so wait its later edits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The dead letter's job id.
    pub seq: u64,
    /// The dead letter's reason (`outcome_unknown`, `rejected`, `expired`).
    pub reason: String,
}

/// What is remembered of one message. Stored as JSON under `r` + its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    /// The message's name in the index: a ref's ([`ref_name`]) or a message id.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message_id: Option<String>,
    /// Zoom's `sent_time` of the send.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sent_time: Option<String>,
    /// Until Zoom gave the message its id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub send: Option<SendParams>,
    /// A send request was (or may have been) written to Zoom and no answer says whether it
    /// posted the message.
    #[serde(default)]
    pub in_doubt: bool,
    /// A delete was accepted: nothing more is accepted for this message.
    #[serde(default)]
    pub deleted: bool,
    /// Its send (or delete) is a dead letter: see [`Held`].
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub held: Option<Held>,
    /// Dead letters naming this message (held or not): while any exists it is not forgotten.
    #[serde(default)]
    pub dead_letters: u32,
    /// The newest of its jobs Zoom accepted: a dead letter older than that is stale.
    #[serde(default)]
    pub delivered_seq: u64,
    /// Unix ms of the last acceptance or delivery naming it.
    pub last_used_ms: u64,
    /// The batch that writes `message_id`: until it is committed, nobody is told the id
    /// (a crash before would make the send one in doubt again). In memory only.
    #[serde(skip)]
    pub id_batch: u64,
    /// The current doubt about its send was counted and logged. In memory only.
    #[serde(skip)]
    pub doubt_counted: bool,
}

impl RefRecord {
    pub fn new(name: String, now_ms: u64) -> RefRecord {
        RefRecord {
            name,
            message_id: None,
            sent_time: None,
            send: None,
            in_doubt: false,
            deleted: false,
            held: None,
            dead_letters: 0,
            delivered_seq: 0,
            last_used_ms: now_ms,
            id_batch: 0,
            doubt_counted: false,
        }
    }
}

/// Retention is kept per minute of last use, so a busy message moves in the expiry order at
/// most once a minute.
const MINUTE_MS: u64 = 60_000;

/// Every remembered message, by index key, with Zoom's ids pointing back at their refs.
#[derive(Debug, Default)]
pub struct Refs {
    by_key: HashMap<MessageKey, RefRecord>,
    /// A sent ref's `message_id` (as an index key) → the ref's key, so that an edit or
    /// delete naming the message id is the same message as one naming the ref.
    by_message_id: HashMap<MessageKey, MessageKey>,
    /// (minute of last use, key), oldest first, for [`Refs::expired`].
    by_age: BTreeSet<(u64, [u64; 2])>,
}

impl Refs {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn get(&self, key: MessageKey) -> Option<&RefRecord> {
        self.by_key.get(&key)
    }

    /// The ref a message id belongs to, if it was sent through a ref.
    pub fn by_message_id(&self, message_key: MessageKey) -> Option<MessageKey> {
        self.by_message_id.get(&message_key).copied()
    }

    /// Adds or replaces the record of `key`. `message_key` is the index key of its
    /// `message_id`, when it has one and is named by a ref.
    pub fn put(&mut self, key: MessageKey, record: RefRecord, message_key: Option<MessageKey>) {
        if let Some(old) = self.by_key.get(&key) {
            self.by_age
                .remove(&(old.last_used_ms / MINUTE_MS, key.parts()));
        }
        if let Some(message_key) = message_key {
            self.by_message_id.insert(message_key, key);
        }
        self.by_age
            .insert((record.last_used_ms / MINUTE_MS, key.parts()));
        self.by_key.insert(key, record);
    }

    /// Changes the record of `key` in place (keeping the expiry order right); returns the
    /// changed record, or `None` if there is none.
    pub fn update(
        &mut self,
        key: MessageKey,
        change: impl FnOnce(&mut RefRecord),
    ) -> Option<&RefRecord> {
        let record = self.by_key.get_mut(&key)?;
        let minute = record.last_used_ms / MINUTE_MS;
        change(record);
        let new_minute = record.last_used_ms / MINUTE_MS;
        if new_minute != minute {
            self.by_age.remove(&(minute, key.parts()));
            self.by_age.insert((new_minute, key.parts()));
        }
        self.by_key.get(&key)
    }

    /// Forgets `key`; `message_key` is the index key of its message id, if any.
    pub fn remove(
        &mut self,
        key: MessageKey,
        message_key: Option<MessageKey>,
    ) -> Option<RefRecord> {
        let record = self.by_key.remove(&key)?;
        self.by_age
            .remove(&(record.last_used_ms / MINUTE_MS, key.parts()));
        if let Some(message_key) = message_key {
            if self.by_message_id.get(&message_key) == Some(&key) {
                self.by_message_id.remove(&message_key);
            }
        }
        Some(record)
    }

    /// Gives back the memory of forgotten entries after a spike.
    pub fn shrink(&mut self) {
        if self.by_key.capacity() > 2 * self.by_key.len() + 1024 {
            self.by_key.shrink_to_fit();
            self.by_message_id.shrink_to_fit();
        }
    }

    /// Up to `limit` keys last used before `cutoff_ms` (to the minute), oldest first. The
    /// caller decides whether each may go (one with a job or a dead letter stays).
    pub fn expired(&self, cutoff_ms: u64, limit: usize) -> Vec<MessageKey> {
        self.by_age
            .iter()
            .take_while(|(minute, _)| (minute + 1) * MINUTE_MS <= cutoff_ms)
            .take(limit)
            .map(|(_, parts)| MessageKey::from_parts(*parts))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> MessageKey {
        MessageKey::from_parts([n, n])
    }

    #[test]
    fn names_of_refs_never_look_like_message_ids_and_give_their_ref_back() {
        let name = ref_name("acct", "bot@xmpp.zoom.us", "build/42");
        assert!(name.chars().any(char::is_control));
        assert_eq!(ref_of(&name), Some("build/42"));
        assert_eq!(account_of(&name), Some("acct"));
        assert_eq!(account_of("20191017014024747_XYYRFjM_main"), None);
        assert_eq!(ref_of("20191017014024747_XYYRFjM_main"), None);
        assert_ne!(ref_name("a", "b", "c"), ref_name("a", "bc", ""));
    }

    #[test]
    fn expiry_follows_the_last_use_and_message_ids_lead_to_their_ref() {
        let mut refs = Refs::default();
        refs.put(key(1), RefRecord::new("one".into(), 10 * MINUTE_MS), None);
        refs.put(
            key(2),
            RefRecord::new("two".into(), 20 * MINUTE_MS),
            Some(key(22)),
        );
        assert_eq!(refs.by_message_id(key(22)), Some(key(2)));
        assert_eq!(refs.expired(15 * MINUTE_MS, 10), vec![key(1)]);
        // Used again later: it moves back in the order.
        refs.update(key(1), |r| r.last_used_ms = 30 * MINUTE_MS);
        assert_eq!(refs.expired(25 * MINUTE_MS, 10), vec![key(2)]);
        assert_eq!(refs.expired(40 * MINUTE_MS, 1), vec![key(2)]);
        refs.remove(key(2), Some(key(22)));
        assert_eq!(refs.by_message_id(key(22)), None);
        assert_eq!(refs.expired(40 * MINUTE_MS, 10), vec![key(1)]);
        assert_eq!(refs.len(), 1);
    }
}
