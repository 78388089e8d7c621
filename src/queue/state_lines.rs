//! The index's per-account lines of ready jobs: interning an account once, announcing it to
//! the dispatcher once per run of ready work, and forgetting it when no message names it.

use std::sync::Arc;

use super::*;

impl State {
    /// Accounts with any pending or in-flight job.
    pub fn accounts(&self) -> usize {
        // Lines kept only for the dispatcher's ring (no message names them) do not count.
        self.lines.iter().flatten().filter(|l| l.slots > 0).count()
    }

    /// The `n` accounts with the most ready jobs, largest first.
    pub fn top_accounts(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        let mut all: Vec<(Arc<str>, usize)> = self
            .lines
            .iter()
            .flatten()
            .filter(|line| line.slots > 0)
            .map(|line| (line.name.clone(), line.ready.len()))
            .collect();
        if all.len() > n {
            all.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            all.truncate(n);
        }
        all.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        all
    }

    pub(super) fn line(&self, n: u32) -> &AccountLine {
        self.lines[n as usize].as_ref().expect("live account line")
    }

    pub(super) fn line_mut(&mut self, n: u32) -> &mut AccountLine {
        self.lines[n as usize].as_mut().expect("live account line")
    }

    pub(super) fn line_id(&mut self, account: &str) -> u32 {
        if let Some(&n) = self.line_of.get(account) {
            return n;
        }
        let name: Arc<str> = Arc::from(account);
        let line = AccountLine {
            name: name.clone(),
            ..AccountLine::default()
        };
        let n = match self.free_lines.pop() {
            Some(n) => {
                self.lines[n as usize] = Some(line);
                n
            }
            None => {
                self.lines.push(Some(line));
                (self.lines.len() - 1) as u32
            }
        };
        self.line_of.insert(name, n);
        n
    }

    pub(super) fn drop_line(&mut self, n: u32) {
        if let Some(line) = self.lines[n as usize].take() {
            self.line_of.remove(&line.name);
            self.free_lines.push(n);
        }
    }

    pub(super) fn make_ready(&mut self, line_id: u32, seq: u64, n: u32) -> Option<Arc<str>> {
        let line = self.line_mut(line_id);
        line.ready.insert(seq, n);
        if line.announced {
            None
        } else {
            line.announced = true;
            Some(line.name.clone())
        }
    }

    /// One slot less names account line `n`; the line is forgotten once none does, so memory
    /// follows the accounts with work, not every account ever seen.
    pub(super) fn release_line(&mut self, n: u32) {
        let line = self.line_mut(n);
        line.slots -= 1;
        // A line the dispatcher still holds in its ring (announced) stays until a claim
        // finds it empty; dropping it now would announce the account twice if it got work
        // again meanwhile.
        if line.slots == 0 && !line.announced {
            debug_assert!(line.ready.is_empty());
            self.drop_line(n);
        }
    }
}
