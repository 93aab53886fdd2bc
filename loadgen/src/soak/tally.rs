//! The soak's counters, shared by the caller threads and the chaos thread (relaxed atomics: each
//! is a plain count, read once at the end), and the first problems seen, with their details.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use acgi_proto::ErrorCode;

use super::check::{Pending, Verdict};
use super::stamp::SizeClass;

/// Problems kept with their details (the rest are only counted).
const PROBLEMS_KEPT_MAX: usize = 20;

#[derive(Default)]
pub struct Tally {
    pub sent: AtomicU64,
    pub sent_by_class: [AtomicU64; 4],
    pub ok: AtomicU64,
    pub worker_failed: AtomicU64,
    pub timed_out: AtomicU64,
    pub overloaded: AtomicU64,
    pub unavailable: AtomicU64,
    pub forbidden: AtomicU64,
    pub misrouted: AtomicU64,
    pub corrupted: AtomicU64,
    pub duplicated: AtomicU64,
    pub unknown_ids: AtomicU64,
    pub not_answers: AtomicU64,
    pub lost: AtomicU64,
    pub abandoned: AtomicU64,
    pub partial: AtomicU64,
    pub connections: AtomicU64,
    pub disconnects: AtomicU64,
    pub io_errors: AtomicU64,
    pub status_errors: AtomicU64,
    pub kills: AtomicU64,
    pub stops: AtomicU64,
    pub conts: AtomicU64,
    pub aborts_mid_request: AtomicU64,
    pub aborts_mid_payload: AtomicU64,
    pub stalls: AtomicU64,
    pub stalls_starved: AtomicU64,
    forbidden_codes: Mutex<BTreeMap<u16, u64>>,
    problems: Mutex<Vec<String>>,
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Tally {
    pub fn sent(&self, class: SizeClass) {
        add(&self.sent, 1);
        add(&self.sent_by_class[class.index()], 1);
    }

    /// Count a verdict, keeping the details of a failure.
    pub fn record(&self, verdict: &Verdict) {
        let counter = match verdict {
            Verdict::Ok => &self.ok,
            Verdict::Expected(ErrorCode::WorkerFailed) => &self.worker_failed,
            Verdict::Expected(_) => &self.timed_out,
            Verdict::Tolerated(ErrorCode::Overloaded) => &self.overloaded,
            Verdict::Tolerated(_) => &self.unavailable,
            Verdict::Forbidden(code) => {
                *lock(&self.forbidden_codes).entry(*code).or_default() += 1;
                &self.forbidden
            }
            Verdict::Misrouted(_) => &self.misrouted,
            Verdict::Corrupted(_) => &self.corrupted,
            Verdict::Duplicated(_) => &self.duplicated,
            Verdict::UnknownId(_) => &self.unknown_ids,
            Verdict::NotAnAnswer(_) => &self.not_answers,
        };
        add(counter, 1);
        if verdict.is_failure() {
            self.problem(format!("{verdict:?}"));
        }
    }

    /// Requests left in flight when a connection ended: abandoned when the soak closed it on
    /// purpose, lost otherwise.
    pub fn unanswered(&self, connection: u32, left: &[(u64, Pending)], on_purpose: bool) {
        if left.is_empty() {
            return;
        }
        if on_purpose {
            add(&self.abandoned, left.len() as u64);
            return;
        }
        add(&self.lost, left.len() as u64);
        let ids: Vec<String> = left
            .iter()
            .take(8)
            .map(|(id, pending)| format!("{id} ({} B)", pending.size))
            .collect();
        self.problem(format!(
            "{} request(s) lost on connection {connection}: {}",
            left.len(),
            ids.join(", ")
        ));
    }

    pub fn problem(&self, text: String) {
        let mut problems = lock(&self.problems);
        if problems.len() < PROBLEMS_KEPT_MAX {
            problems.push(text);
        }
    }

    pub fn problems(&self) -> Vec<String> {
        lock(&self.problems).clone()
    }

    pub fn forbidden_codes(&self) -> BTreeMap<u16, u64> {
        lock(&self.forbidden_codes).clone()
    }
}

/// A poisoned lock here only means another soak thread panicked; its counts are still counts.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
