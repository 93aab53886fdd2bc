//! A sub-millisecond sleep for the open-loop pacer: a `timerfd` watched by tokio's reactor.
//!
//! tokio's own timer wheel has a 1 ms resolution: a `sleep_until` fires up to a millisecond late,
//! so a pacer built on it sends in bursts once per millisecond, and because open-loop latency is
//! measured from the *intended* send time, that lateness would land in every measurement (half a
//! millisecond on average, a sixth of a 3 ms service time). A timerfd is a kernel hrtimer; armed
//! with the remaining delay and awaited through [`AsyncFd`], it wakes the runtime within the
//! thread's timer slack, which [`tighten_timer_slack`] lowers from the default 50 µs to 1 µs.
//!
//! A sleep dropped in a `select!` leaves the timer armed for its deadline: the next sleep for the
//! same deadline (the pacer's usual case) waits on it without a syscall, and a sleep for another
//! deadline re-arms it, which discards any expiry nobody read.

use std::io;
use std::num::NonZeroU64;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Deadlines closer than this are treated as due (no sleep): arming a timer and waking up would
/// cost more than the wait.
pub const DUE_WITHIN: Duration = Duration::from_micros(20);

/// Timer slack set on the load generator's threads.
pub const TIMER_SLACK: Duration = Duration::from_micros(1);

/// Lower this thread's timer slack to [`TIMER_SLACK`], so hrtimers (the pacer's timerfd) fire on
/// time rather than up to 50 µs late. Best effort: a failure leaves the default.
pub fn tighten_timer_slack() {
    let nanoseconds = NonZeroU64::new(TIMER_SLACK.as_nanos() as u64).expect("non-zero slack");
    let _ = rustix::thread::set_current_timer_slack(Some(nanoseconds));
}

/// One timerfd registered with the current runtime's reactor.
pub struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
    /// The deadline the timer is armed for and has not yet been seen to expire.
    armed: Option<Instant>,
}

impl PreciseTimer {
    /// Create the timer; must run inside a tokio runtime with I/O enabled.
    pub fn new() -> io::Result<PreciseTimer> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // `AsyncFd::new` is deprecated because a generic `T: AsRawFd` could close or swap its
        // descriptor while registered; an `OwnedFd` that only this struct holds cannot, which is
        // the condition the unsafe `register` asks callers to promise. Using the safe form keeps
        // this crate free of `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(PreciseTimer { fd, armed: None })
    }

    /// Wait until `deadline` (returns at once when it is less than [`DUE_WITHIN`] away).
    pub async fn sleep_until(&mut self, deadline: Instant) -> io::Result<()> {
        let now = Instant::now();
        if deadline <= now + DUE_WITHIN {
            return Ok(());
        }
        if self.armed != Some(deadline) {
            self.arm(deadline - now)?;
            self.armed = Some(deadline);
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match guard.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut expirations).map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => {
                    self.armed = None;
                    return Ok(());
                }
                Ok(Err(error)) => return Err(error),
                // A stale readiness: the expiry it announced was discarded by a re-arm.
                Err(_would_block) => continue,
            }
        }
    }

    /// Arm the timer to expire once, `delay` from now (which discards an unread expiry).
    fn arm(&mut self, delay: Duration) -> io::Result<()> {
        assert!(!delay.is_zero(), "a zero delay would disarm the timer");
        let value = Timespec {
            tv_sec: delay.as_secs() as _,
            tv_nsec: delay.subsec_nanos() as _,
        };
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        timerfd_settime(
            self.fd.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_end_on_time_not_on_the_next_millisecond() {
        // Proves 300 µs sleeps end after their deadline, and at the median well within a millisecond.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tighten_timer_slack();
            let mut timer = PreciseTimer::new().unwrap();
            let mut lateness = Vec::new();
            for _ in 0..40 {
                let deadline = Instant::now() + Duration::from_micros(300);
                timer.sleep_until(deadline).await.unwrap();
                let now = Instant::now();
                assert!(now >= deadline);
                lateness.push(now - deadline);
            }
            lateness.sort();
            // The median, so a loaded machine's hiccups do not fail the test; tokio's 1 ms
            // wheel would be late by about 500 µs on average.
            assert!(
                lateness[20] < Duration::from_micros(450),
                "median lateness {:?}",
                lateness[20]
            );
            // A past deadline returns at once.
            timer
                .sleep_until(Instant::now() - Duration::from_millis(1))
                .await
                .unwrap();
        });
    }
}
