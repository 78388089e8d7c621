//! The encoding of a record's entries: one job's state per entry, headers as varints in the
//! record's `h` value, bodies concatenated in its `b` value (the layout is in `store.rs`). Pure
//! bytes in and out; what to write and what is live is decided elsewhere.

use serde::{Deserialize, Serialize};

/// Where an entry is stored: its record and its place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Loc {
    pub record: u64,
    pub index: u32,
}

/// A record's headers that cannot be read (cut short or not entries at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed {
    pub record: u64,
}

/// What a job asks of Zoom. A content job of a message named by `ref` is a send until
/// Zoom has given the message its id, an edit after (decided at claim, see `delivery.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOp {
    /// New content of the message: an edit, or the send of a message named by `ref`.
    #[default]
    Content,
    /// The message's deletion; its body holds the delete call's parameters.
    Delete,
}

/// Metadata of a pending or in-flight job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHeader {
    /// The message's name in the index: Zoom's message id, or for a message named by a
    /// producer's `ref` the name `refs::ref_name` builds (never a valid message id).
    pub message_id: String,
    pub account_id: String,
    /// When the job was created: its place in line (unix ms).
    pub enqueued_ms: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this time (unix ms); 0 means now.
    pub next_attempt_ms: u64,
    /// When the first failed attempt happened, if any (unix ms).
    pub first_failure_ms: Option<u64>,
    /// Dead letters written before there were other operations have none: content.
    #[serde(default)]
    pub op: JobOp,
}

/// A job's state as one record entry stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub seq: u64,
    pub enqueued_ms: u64,
    /// When the content was acknowledged (unix ms).
    pub updated_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub first_failure_ms: Option<u64>,
    pub message_id: &'a str,
    pub account_id: &'a str,
    /// Length of the body (the bodies themselves are in the record's `b` value).
    pub body_len: u32,
    pub op: JobOp,
}

impl<'a> EntryRef<'a> {
    /// The entry of job `seq` with this header and `body`, acknowledged at `updated_ms`.
    pub fn new(seq: u64, header: &'a JobHeader, updated_ms: u64, body: &[u8]) -> EntryRef<'a> {
        EntryRef {
            seq,
            enqueued_ms: header.enqueued_ms,
            updated_ms,
            attempts: header.attempts,
            next_attempt_ms: header.next_attempt_ms,
            first_failure_ms: header.first_failure_ms,
            message_id: &header.message_id,
            account_id: &header.account_id,
            body_len: body.len() as u32,
            op: header.op,
        }
    }

    pub fn header(&self) -> JobHeader {
        JobHeader {
            message_id: self.message_id.to_string(),
            account_id: self.account_id.to_string(),
            enqueued_ms: self.enqueued_ms,
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
            first_failure_ms: self.first_failure_ms,
            op: self.op,
        }
    }
}

/// Appends one entry's header to a record's `h` value: LEB128 varints, so that a typical
/// entry (small numbers, times close to each other, no retry state) takes about 12 bytes
/// besides its ids. Recovery reads every header of the backlog, and what it reads sled keeps
/// in memory for a while, so these bytes count twice.
///
/// An entry of any other operation than content starts with a 0 byte (a job id is never 0,
/// so entries written before there were operations read as they always did) and a varint
/// naming the operation (1: delete).
///
/// Fields in order: seq; updated_ms; updated_ms − enqueued_ms (zigzag: the wall clock may
/// step back); attempts; next_attempt_ms and first_failure_ms (0 for none, else their
/// distance from updated_ms, zigzag, plus one); body length; message id and account id, each
/// length-prefixed.
pub fn encode_header(out: &mut Vec<u8>, entry: &EntryRef<'_>) {
    let relative = |t: u64| match t {
        0 => 0,
        t => zigzag(t.wrapping_sub(entry.updated_ms) as i64) + 1,
    };
    match entry.op {
        JobOp::Content => {}
        JobOp::Delete => out.extend_from_slice(&[0, 1]),
    }
    put_varint(out, entry.seq);
    put_varint(out, entry.updated_ms);
    put_varint(
        out,
        zigzag(entry.updated_ms.wrapping_sub(entry.enqueued_ms) as i64),
    );
    put_varint(out, u64::from(entry.attempts));
    put_varint(out, relative(entry.next_attempt_ms));
    put_varint(out, relative(entry.first_failure_ms.unwrap_or(0)));
    put_varint(out, u64::from(entry.body_len));
    for text in [entry.message_id, entry.account_id] {
        put_varint(out, text.len() as u64);
        out.extend_from_slice(text.as_bytes());
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Reads a varint from the front of `rest`; `None` when truncated or longer than 64 bits.
fn take_varint(rest: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for (i, &byte) in rest.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return None;
        }
        n |= bits << (7 * i);
        if byte & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Some(n);
        }
    }
    None
}

/// The entries of a record's `h` value, in order, with each body's offset in the `b` value.
pub struct Entries<'a> {
    rest: &'a [u8],
    body_offset: u64,
    record: u64,
}

pub fn entries(record: u64, headers: &[u8]) -> Entries<'_> {
    Entries {
        rest: headers,
        body_offset: 0,
        record,
    }
}

impl<'a> Entries<'a> {
    fn decode(&mut self) -> Option<EntryRef<'a>> {
        let rest = &mut self.rest;
        let mut op = JobOp::Content;
        if rest.first() == Some(&0) {
            *rest = &rest[1..];
            op = match take_varint(rest)? {
                1 => JobOp::Delete,
                _ => return None,
            };
        }
        let seq = take_varint(rest)?;
        let updated_ms = take_varint(rest)?;
        let enqueued_ms = updated_ms.wrapping_sub(unzigzag(take_varint(rest)?) as u64);
        let attempts = u32::try_from(take_varint(rest)?).ok()?;
        let absolute = |n: u64| match n {
            0 => 0,
            n => updated_ms.wrapping_add(unzigzag(n - 1) as u64),
        };
        let next_attempt_ms = absolute(take_varint(rest)?);
        let first_failure = absolute(take_varint(rest)?);
        let body_len = u32::try_from(take_varint(rest)?).ok()?;
        let mut texts = [""; 2];
        for text in &mut texts {
            let len = usize::try_from(take_varint(rest)?).ok()?;
            if rest.len() < len {
                return None;
            }
            *text = std::str::from_utf8(&rest[..len]).ok()?;
            *rest = &rest[len..];
        }
        Some(EntryRef {
            seq,
            enqueued_ms,
            updated_ms,
            attempts,
            next_attempt_ms,
            first_failure_ms: (first_failure != 0).then_some(first_failure),
            message_id: texts[0],
            account_id: texts[1],
            body_len,
            op,
        })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(EntryRef<'a>, u64), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(entry) = self.decode() else {
            self.rest = &[];
            return Some(Err(Malformed {
                record: self.record,
            }));
        };
        let offset = self.body_offset;
        self.body_offset += u64::from(entry.body_len);
        Some(Ok((entry, offset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let first = EntryRef {
            seq: 1 << 40,
            enqueued_ms: 1_700_000_000_001,
            updated_ms: 1_700_000_000_002,
            attempts: 7,
            next_attempt_ms: 1_700_000_000_003,
            first_failure_ms: Some(1_700_000_000_004),
            message_id: "message-é",
            account_id: "",
            body_len: 5,
            op: JobOp::Content,
        };
        let second = EntryRef {
            seq: 2,
            first_failure_ms: None,
            message_id: "m2",
            account_id: "acct",
            body_len: 0,
            op: JobOp::Delete,
            ..first
        };
        // The clock stepped back: times before the ack time, an enqueue time after it.
        let third = EntryRef {
            enqueued_ms: 1_800_000_000_000,
            next_attempt_ms: 1,
            first_failure_ms: Some(1_600_000_000_000),
            attempts: u32::MAX,
            body_len: u32::MAX,
            ..second
        };
        let mut headers = Vec::new();
        encode_header(&mut headers, &first);
        let boundary = headers.len();
        encode_header(&mut headers, &second);
        let decoded: Vec<_> = entries(9, &headers).map(Result::unwrap).collect();
        assert_eq!(decoded, vec![(first, 0), (second, 5)]);
        let mut alone = Vec::new();
        encode_header(&mut alone, &third);
        assert_eq!(entries(9, &alone).next().unwrap().unwrap(), (third, 0));
        // Truncated anywhere: an error naming the record, never a panic or a wrong entry.
        for cut in 1..headers.len() {
            if cut == boundary {
                continue;
            }
            let last = entries(9, &headers[..cut]).last().unwrap();
            assert!(last == Err(Malformed { record: 9 }), "cut at {cut}");
        }
    }
}
