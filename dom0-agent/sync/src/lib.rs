//! Poison-tolerant locking: one job, shared by the Xen wrapper and both domain backends.
//!
//! A `std::sync::Mutex` is poisoned when a thread panics while holding it. The agent's
//! locks guard bookkeeping (pools, registries, handles) whose every update is complete
//! before anything that can panic, so a poisoned lock still holds consistent data, and
//! refusing it would turn one panicked thread into a wedged backend (every later take,
//! destroy or shutdown failing). These helpers take the guard either way.

#![forbid(unsafe_code)]

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Locks `m`, taking the guard even if a thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`Condvar::wait`], taking the guard back even if the lock was poisoned meanwhile.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard)
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`Condvar::wait_timeout`] (at most `timeout`; it may wake early, spuriously or when
/// notified), taking the guard back even if the lock was poisoned meanwhile. Returns the
/// guard and whether the wait timed out.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, bool) {
    let (guard, result) = cv
        .wait_timeout(guard, timeout)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    (guard, result.timed_out())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poisoned() -> Arc<Mutex<u32>> {
        let m = Arc::new(Mutex::new(7));
        let m2 = Arc::clone(&m);
        let joined = std::thread::spawn(move || {
            let _guard = m2.lock().unwrap();
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(joined.is_err());
        assert!(m.is_poisoned());
        m
    }

    #[test]
    fn a_poisoned_lock_is_still_taken_with_its_data() {
        let m = poisoned();
        let mut guard = lock(&m);
        assert_eq!(*guard, 7);
        *guard = 8;
        drop(guard);
        assert_eq!(*lock(&m), 8);
    }

    #[test]
    fn a_timed_wait_on_a_poisoned_lock_returns_its_guard_and_says_it_timed_out() {
        let m = poisoned();
        let cv = Condvar::new();
        let (guard, timed_out) = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert!(timed_out);
        assert_eq!(*guard, 7);
    }

    #[test]
    fn a_wait_returns_once_notified_under_the_condition() {
        let pair = Arc::new((Mutex::new(false), Condvar::new()));
        let pair2 = Arc::clone(&pair);
        let setter = std::thread::spawn(move || {
            *lock(&pair2.0) = true;
            pair2.1.notify_all();
        });
        let mut guard = lock(&pair.0);
        while !*guard {
            guard = wait(&pair.1, guard);
        }
        drop(guard);
        setter.join().unwrap();
    }
}
