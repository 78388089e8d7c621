//! The cluster mode's reads: the copy in memory of one partition's ordered map, which its
//! owner reads once at the take-over and each commit updates once JetStream stored it; every
//! read of the queue is served here, never over the network.

use std::collections::BTreeMap;
use std::sync::RwLock;

use bytes::Bytes;

use super::kv::{Kv, Pair, StoreError};

/// The copy in memory of one partition's map.
#[derive(Default)]
pub(super) struct Mirror {
    pub(super) map: RwLock<BTreeMap<Bytes, Bytes>>,
}

impl Kv for Mirror {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.read().get(key).cloned())
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + 'a> {
        let pairs: Vec<Result<Pair, StoreError>> = self
            .read()
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| Ok((k.clone(), v.clone())))
            .collect();
        Box::new(pairs.into_iter())
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .read()
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, _)| k.clone()))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

impl Mirror {
    pub(super) fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Bytes, Bytes>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }
}
