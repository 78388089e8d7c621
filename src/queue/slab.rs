//! Where the index keeps its per-message slots and how a message finds its own: a slab
//! allocated in fixed chunks (it never moves or doubles what it holds, so a growing backlog
//! has no copy peak), a hash table of 4-byte slot numbers, and message keys.
//!
//! A message is known by a 128-bit key, two independently keyed SipHash-1-3 hashes of its id
//! (random keys per process), not by the id itself: ids may be 256 bytes long, and the id is in
//! the job's stored entry whenever it is needed. Two live messages would share a key with a
//! probability of about `n² / 2¹²⁹` (10⁻²⁷ for a million), and nobody can aim at it without
//! the process's keys.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use hashbrown::HashTable;

/// A message's identity in the index (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MessageKey([u64; 2]);

impl MessageKey {
    /// Its two halves, for ordered sets (only meaningful within this process).
    pub fn parts(self) -> [u64; 2] {
        self.0
    }
    pub fn from_parts(parts: [u64; 2]) -> MessageKey {
        MessageKey(parts)
    }
}

/// What a slab holds: values that know their message's key.
pub trait Keyed {
    fn key(&self) -> MessageKey;
}

/// Slots are allocated in chunks of this many.
const CHUNK: usize = 4096;

pub struct Slab<T> {
    hashers: [RandomState; 2],
    chunks: Vec<Box<[T]>>,
    /// Slot numbers below `used` that are free.
    free: Vec<u32>,
    used: u32,
    /// Key → slot number, hashed by the key's first half (already a keyed hash).
    by_key: HashTable<u32>,
}

impl<T: Keyed + Copy + Default> Slab<T> {
    pub fn new() -> Slab<T> {
        Slab {
            hashers: [RandomState::new(), RandomState::new()],
            chunks: Vec::new(),
            free: Vec::new(),
            used: 0,
            by_key: HashTable::new(),
        }
    }

    /// The key `message` is known by.
    pub fn key(&self, message: &str) -> MessageKey {
        MessageKey([
            self.hashers[0].hash_one(message),
            self.hashers[1].hash_one(message),
        ])
    }

    pub fn get(&self, n: u32) -> &T {
        &self.chunks[n as usize / CHUNK][n as usize % CHUNK]
    }

    pub fn get_mut(&mut self, n: u32) -> &mut T {
        &mut self.chunks[n as usize / CHUNK][n as usize % CHUNK]
    }

    /// The slot of the message with `key`.
    pub fn find(&self, key: MessageKey) -> Option<u32> {
        self.by_key
            .find(key.0[0], |&n| self.get(n).key() == key)
            .copied()
    }

    /// Stores `value` in a free slot; its key must not be in the slab yet.
    pub fn insert(&mut self, value: T) -> u32 {
        let n = match self.free.pop() {
            Some(n) => n,
            None => {
                let n = self.used;
                if n as usize == self.chunks.len() * CHUNK {
                    self.chunks
                        .push(vec![T::default(); CHUNK].into_boxed_slice());
                }
                self.used += 1;
                n
            }
        };
        *self.get_mut(n) = value;
        let chunks = &self.chunks;
        self.by_key.insert_unique(value.key().0[0], n, |&m| {
            chunks[m as usize / CHUNK][m as usize % CHUNK].key().0[0]
        });
        n
    }

    /// Frees slot `n`, returning what it held. Once every slot is free the memory is given
    /// back: a drained backlog does not keep its peak.
    pub fn remove(&mut self, n: u32) -> T {
        let value = *self.get(n);
        if let Ok(entry) = self.by_key.find_entry(value.key().0[0], |&m| m == n) {
            entry.remove();
        }
        self.free.push(n);
        if self.free.len() as u32 == self.used {
            self.free = Vec::new();
            self.chunks = Vec::new();
            self.used = 0;
            self.by_key = HashTable::new();
        }
        value
    }

    /// Every slot in use, with its number (tests only; O(n)).
    #[cfg(test)]
    pub fn live(&self) -> Vec<(u32, T)> {
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        let live: Vec<(u32, T)> = (0..self.used)
            .filter(|n| !free.contains(n))
            .map(|n| (n, *self.get(n)))
            .collect();
        assert_eq!(live.len(), self.by_key.len(), "hash table and slab agree");
        for (n, value) in &live {
            assert_eq!(
                self.find(value.key()),
                Some(*n),
                "slot {n} is found by its key"
            );
        }
        live
    }
}
