//! The queueing model `plan` sizes pools with: M/M/c (Erlang C), generalising the seed's M/M/1.
//!
//! A service is `c` identical workers fed by one FIFO backlog (the bridge's pool); requests
//! arrive as a Poisson stream of rate `lambda` and each takes a worker for a service time of mean
//! `1/mu`. With `A = lambda/mu` (the offered load in Erlang, by Little's law the mean number of
//! busy workers) and utilisation `rho = A/c < 1`:
//!
//! ```text
//!   C(c, A)     = probability that a request waits   (Erlang C; for c = 1 it is rho)
//!   Wq          = C / (c mu - lambda)                 (mean wait in the backlog)
//!   P(Wq > t)   = C e^{-(c mu - lambda) t}            (the waiting-time tail)
//!   latency     = wait + service
//! ```
//!
//! The wait comes from the model, but the service time comes from measurement: latency
//! percentiles are computed from the convolution of the model's wait distribution with the
//! *measured* service-time distribution ([`ServiceTime`]), not from its mean alone, so a service
//! with a long tail of its own gets a long-tailed prediction. M/M/c assumes exponential service
//! times, which overstates the wait of steadier services; [`Model::allen_cunneen`] gives the usual
//! M/G/c correction (the wait scaled by `(1 + cs^2)/2`, `cs` the service time's coefficient of
//! variation) as a second opinion.
//!
//! Pure arithmetic on `f64` seconds: no clocks, no I/O.

use serde::Serialize;

/// Largest pool the model sizes (the bridge's `max_workers` ceiling).
pub const WORKERS_MAX: u32 = 4096;

/// Erlang C: the probability that an arrival waits, with `servers` servers and `offered` Erlang
/// (`lambda/mu`). 1 when the system is saturated (`offered >= servers`).
pub fn erlang_c(servers: u32, offered: f64) -> f64 {
    assert!(servers >= 1, "no servers");
    assert!(
        offered >= 0.0 && offered.is_finite(),
        "offered load {offered}"
    );
    let c = f64::from(servers);
    if offered >= c {
        return 1.0;
    }
    // Erlang B by its stable recursion B(k) = A B(k-1) / (k + A B(k-1)), then C from B.
    let mut b = 1.0;
    for k in 1..=servers {
        b = offered * b / (f64::from(k) + offered * b);
    }
    let waiting = c * b / (c - offered * (1.0 - b));
    assert!((0.0..=1.0 + 1e-12).contains(&waiting), "Erlang C {waiting}");
    waiting.min(1.0)
}

/// A measured service-time distribution: points (seconds, probability) summing to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceTime {
    points: Vec<(f64, f64)>,
    mean: f64,
    variance: f64,
}

impl ServiceTime {
    /// From `(seconds, count)` pairs, e.g. a histogram's recorded values.
    pub fn from_counts(counts: impl IntoIterator<Item = (f64, u64)>) -> ServiceTime {
        let mut raw: Vec<(f64, u64)> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
        assert!(!raw.is_empty(), "a service time needs at least one sample");
        raw.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: u64 = raw.iter().map(|(_, n)| n).sum();
        let points: Vec<(f64, f64)> = raw
            .iter()
            .map(|(seconds, n)| {
                assert!(*seconds >= 0.0 && seconds.is_finite(), "sample {seconds}");
                (*seconds, *n as f64 / total as f64)
            })
            .collect();
        let mean = points.iter().map(|(s, p)| s * p).sum::<f64>();
        let variance = points.iter().map(|(s, p)| p * (s - mean).powi(2)).sum();
        ServiceTime {
            points,
            mean,
            variance,
        }
    }

    /// Every request takes exactly `seconds`.
    pub fn constant(seconds: f64) -> ServiceTime {
        ServiceTime::from_counts([(seconds, 1)])
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Squared coefficient of variation, `Var(S) / E[S]^2` (0 for constant, 1 for exponential).
    pub fn cv_squared(&self) -> f64 {
        if self.mean > 0.0 {
            self.variance / (self.mean * self.mean)
        } else {
            0.0
        }
    }

    /// The service rate of one worker, `mu = 1 / E[S]`.
    pub fn rate(&self) -> f64 {
        assert!(self.mean > 0.0, "a zero service time has no rate");
        1.0 / self.mean
    }

    /// The smallest sample at or above quantile `q`.
    pub fn quantile(&self, q: f64) -> f64 {
        let mut cumulative = 0.0;
        for (seconds, p) in &self.points {
            cumulative += p;
            if cumulative >= q - 1e-12 {
                return *seconds;
            }
        }
        self.max()
    }

    pub fn max(&self) -> f64 {
        self.points.last().expect("not empty").0
    }

    pub fn min(&self) -> f64 {
        self.points.first().expect("not empty").0
    }
}

/// How the wait of one pool is modelled.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitModel {
    /// M/M/c as it stands.
    Mmc,
    /// M/G/c by Allen-Cunneen: the M/M/c wait scaled by `(1 + cs^2) / 2`.
    AllenCunneen,
}

/// An M/M/c pool at one arrival rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Arrivals per second.
    pub lambda: f64,
    /// Completions per second of one worker.
    pub mu: f64,
    pub servers: u32,
    /// `(1 + cs^2) / 2` for [`WaitModel::AllenCunneen`], 1 for M/M/c.
    wait_scale: f64,
}

impl Model {
    pub fn mmc(lambda: f64, mu: f64, servers: u32) -> Model {
        assert!(lambda >= 0.0 && lambda.is_finite(), "lambda {lambda}");
        assert!(mu > 0.0 && mu.is_finite(), "mu {mu}");
        assert!(servers >= 1, "no servers");
        Model {
            lambda,
            mu,
            servers,
            wait_scale: 1.0,
        }
    }

    /// M/G/c (Allen-Cunneen) for a service with squared coefficient of variation `cv_squared`.
    pub fn allen_cunneen(lambda: f64, mu: f64, servers: u32, cv_squared: f64) -> Model {
        assert!(cv_squared >= 0.0, "cv^2 {cv_squared}");
        Model {
            wait_scale: (1.0 + cv_squared) / 2.0,
            ..Model::mmc(lambda, mu, servers)
        }
    }

    pub fn of(kind: WaitModel, lambda: f64, service: &ServiceTime, servers: u32) -> Model {
        match kind {
            WaitModel::Mmc => Model::mmc(lambda, service.rate(), servers),
            WaitModel::AllenCunneen => {
                Model::allen_cunneen(lambda, service.rate(), servers, service.cv_squared())
            }
        }
    }

    /// Offered load in Erlang, `A = lambda / mu`: the mean number of busy workers.
    pub fn offered(&self) -> f64 {
        self.lambda / self.mu
    }

    /// `rho = lambda / (c mu)`.
    pub fn utilisation(&self) -> f64 {
        self.offered() / f64::from(self.servers)
    }

    /// Whether the backlog stays bounded (`rho < 1`).
    pub fn is_stable(&self) -> bool {
        self.utilisation() < 1.0
    }

    /// Erlang C.
    pub fn wait_probability(&self) -> f64 {
        erlang_c(self.servers, self.offered())
    }

    /// The rate of the waiting-time tail, `(c mu - lambda)` (scaled for Allen-Cunneen).
    fn drain_rate(&self) -> f64 {
        (f64::from(self.servers) * self.mu - self.lambda) / self.wait_scale
    }

    /// Mean wait in the backlog, seconds (infinite when unstable).
    pub fn wait_mean(&self) -> f64 {
        if !self.is_stable() {
            return f64::INFINITY;
        }
        self.wait_probability() / self.drain_rate()
    }

    /// Mean number waiting, `Lq = lambda Wq` (the seed's AQL for c = 1 is `Lq + rho`).
    pub fn queue_length_mean(&self) -> f64 {
        self.lambda * self.wait_mean()
    }

    /// `P(Wq > t)`.
    pub fn wait_exceeds(&self, seconds: f64) -> f64 {
        if !self.is_stable() {
            return 1.0;
        }
        if seconds < 0.0 {
            return 1.0;
        }
        self.wait_probability() * (-self.drain_rate() * seconds).exp()
    }

    /// The `q` quantile of the wait: 0 when at least `q` of requests never wait.
    pub fn wait_quantile(&self, q: f64) -> f64 {
        assert!((0.0..1.0).contains(&q), "quantile {q}");
        if !self.is_stable() {
            return f64::INFINITY;
        }
        let waiting = self.wait_probability();
        if waiting <= 1.0 - q {
            return 0.0;
        }
        (waiting / (1.0 - q)).ln() / self.drain_rate()
    }

    /// `P(wait + service > t)`, the service drawn from `service` independently of the wait.
    pub fn latency_exceeds(&self, service: &ServiceTime, seconds: f64) -> f64 {
        service
            .points
            .iter()
            .map(|(s, p)| p * self.wait_exceeds(seconds - s))
            .sum()
    }

    /// The `q` quantile of wait + service (bisection on [`Model::latency_exceeds`]).
    pub fn latency_quantile(&self, service: &ServiceTime, q: f64) -> f64 {
        assert!((0.0..1.0).contains(&q), "quantile {q}");
        if !self.is_stable() {
            return f64::INFINITY;
        }
        let target = 1.0 - q;
        // Below the shortest service time nothing has completed; at `hi` every term is at most
        // `target`: the wait alone exceeds hi - s_max with probability <= target.
        let mut lo = service.min();
        let mut hi = service.max() + self.wait_quantile(q) + 1e-9;
        assert!(self.latency_exceeds(service, hi) <= target + 1e-9);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if self.latency_exceeds(service, mid) > target {
                lo = mid;
            } else {
                hi = mid;
            }
            if hi - lo <= 1e-9 {
                break;
            }
        }
        hi
    }

    /// Mean latency, `Wq + E[S]`.
    pub fn latency_mean(&self, service: &ServiceTime) -> f64 {
        self.wait_mean() + service.mean()
    }
}

/// The fewest workers whose `q` latency quantile at `lambda` is within `slo_seconds`, or `None`
/// when no pool up to [`WORKERS_MAX`] meets it (the service alone is slower than the SLO).
pub fn workers_for_slo(
    kind: WaitModel,
    lambda: f64,
    service: &ServiceTime,
    q: f64,
    slo_seconds: f64,
) -> Option<u32> {
    if service.quantile(q) > slo_seconds {
        return None;
    }
    let offered = lambda / service.rate();
    // The first stable pool: more than A workers.
    let first = (offered.floor() as u32 + 1).max(1);
    (first..=WORKERS_MAX).find(|&servers| {
        Model::of(kind, lambda, service, servers).latency_quantile(service, q) <= slo_seconds
    })
}

/// The highest arrival rate at which `servers` workers keep the `q` latency quantile within
/// `slo_seconds` (the knee). 0 when even an idle pool misses it.
pub fn knee_rate(
    kind: WaitModel,
    servers: u32,
    service: &ServiceTime,
    q: f64,
    slo_seconds: f64,
) -> f64 {
    let saturation = f64::from(servers) * service.rate();
    let meets = |lambda: f64| {
        Model::of(kind, lambda, service, servers).latency_quantile(service, q) <= slo_seconds
    };
    if !meets(0.0) {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0, saturation);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if meets(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    assert!(lo < saturation, "the knee is below saturation");
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-12)
    }

    #[test]
    fn one_server_is_mm1() {
        // Proves c = 1 reduces to M/M/1: P(wait) = rho, Wq = rho/(mu - lambda), Lq = rho^2/(1-rho).
        for (lambda, mu) in [(100.0, 333.0), (222.0, 333.0), (1.0, 2.0), (0.0, 5.0)] {
            let model = Model::mmc(lambda, mu, 1);
            let rho = lambda / mu;
            assert!(close(model.wait_probability(), rho, 1e-12), "{lambda}/{mu}");
            assert!(close(model.wait_mean(), rho / (mu - lambda), 1e-12));
            assert!(close(
                model.queue_length_mean(),
                rho * rho / (1.0 - rho),
                1e-9
            ));
        }
        // The seed's numbers: p = 1/3 gives a mean number in system (its AQL) of 1/2.
        let seed = Model::mmc(111.0, 333.0, 1);
        assert!(close(
            seed.queue_length_mean() + seed.utilisation(),
            0.5,
            1e-9
        ));
    }

    #[test]
    fn erlang_c_matches_tabulated_values() {
        // Proves Erlang C against closed forms and published table values.
        assert!(
            close(erlang_c(5, 4.0), 0.5541, 1e-3),
            "{}",
            erlang_c(5, 4.0)
        );
        assert!(close(erlang_c(2, 1.0), 1.0 / 3.0, 1e-12));
        // M/M/2 in closed form: 2 rho^2 / (1 + rho).
        let rho: f64 = 0.8;
        assert!(close(
            erlang_c(2, 1.6),
            2.0 * rho * rho / (1.0 + rho),
            1e-12
        ));
        // The textbook sum form (A^c/c! c/(c-A)) / (sum_{k<c} A^k/k! + A^c/c! c/(c-A)):
        // 10 servers, 8 Erlang -> 0.40918; 20 servers, 15 Erlang -> 0.16043.
        assert!(
            close(erlang_c(10, 8.0), 0.40918, 1e-4),
            "{}",
            erlang_c(10, 8.0)
        );
        assert!(
            close(erlang_c(20, 15.0), 0.16043, 1e-4),
            "{}",
            erlang_c(20, 15.0)
        );
        assert_eq!(erlang_c(3, 3.0), 1.0);
        assert_eq!(erlang_c(3, 0.0), 0.0);
        // Stable for large pools where a naive factorial overflows.
        let big = erlang_c(4000, 3900.0);
        assert!(big > 0.0 && big < 1.0, "{big}");
    }

    #[test]
    fn the_wait_tail_inverts() {
        // Proves P(Wq > t) = C e^{-(c mu - lambda) t} and its quantile are inverse.
        let model = Model::mmc(4.0, 1.0, 5);
        let c = model.wait_probability();
        assert!(close(model.wait_exceeds(0.0), c, 1e-12));
        assert!(close(model.wait_exceeds(1.0), c * (-1.0f64).exp(), 1e-12));
        let p99 = model.wait_quantile(0.99);
        assert!(close(model.wait_exceeds(p99), 0.01, 1e-9));
        assert!(close(model.wait_mean(), c / 1.0, 1e-12));
        // Fewer than 1 % wait: the p99 wait is zero.
        assert_eq!(Model::mmc(1.0, 1.0, 10).wait_quantile(0.99), 0.0);
        assert_eq!(Model::mmc(10.0, 1.0, 10).wait_quantile(0.99), f64::INFINITY);
    }

    #[test]
    fn latency_convolves_wait_with_measured_service() {
        // Proves the total's quantile: constant service shifts the wait; no wait leaves the
        // service's own percentile; a two-point service mixes the tails.
        let model = Model::mmc(3000.0, 1.0 / 0.003, 10);
        let constant = ServiceTime::constant(0.003);
        let expected = 0.003 + model.wait_quantile(0.99);
        assert!(close(
            model.latency_quantile(&constant, 0.99),
            expected,
            1e-6
        ));
        let idle = Model::mmc(1.0, 1.0 / 0.003, 10);
        let spread = ServiceTime::from_counts([(0.001, 98), (0.010, 2)]);
        assert!(close(idle.latency_quantile(&spread, 0.99), 0.010, 1e-6));
        assert!(close(idle.latency_quantile(&spread, 0.5), 0.001, 1e-6));
        // The 0th percentile is the shortest service time, not zero.
        assert!(close(model.latency_quantile(&constant, 0.0), 0.003, 1e-6));
        assert_eq!(spread.quantile(0.98), 0.001);
        assert_eq!(spread.quantile(0.99), 0.010);
        let busy = Model::mmc(2.0, 1.0, 3);
        let t = busy.latency_quantile(&spread, 0.99);
        assert!(close(busy.latency_exceeds(&spread, t), 0.01, 1e-6));
    }

    #[test]
    fn the_seeds_example_needs_at_least_ten_workers() {
        // Proves Little's law floor (9 busy at 3000/s x 3 ms) and the SLO sizing above it.
        let service = ServiceTime::constant(0.003);
        let model = Model::mmc(3000.0, service.rate(), 10);
        assert!(close(model.offered(), 9.0, 1e-9));
        assert!(!Model::mmc(3000.0, service.rate(), 9).is_stable());
        let workers = workers_for_slo(WaitModel::Mmc, 3000.0, &service, 0.99, 0.010).unwrap();
        assert!(workers >= 10, "{workers}");
        let p99 = |c| Model::mmc(3000.0, service.rate(), c).latency_quantile(&service, 0.99);
        assert!(p99(workers) <= 0.010 && p99(workers - 1) > 0.010);
        // Steadier service needs no more workers under Allen-Cunneen.
        let steady = workers_for_slo(WaitModel::AllenCunneen, 3000.0, &service, 0.99, 0.010);
        assert!(steady.unwrap() <= workers);
        // An SLO under the service time itself cannot be met by any pool.
        assert_eq!(
            workers_for_slo(WaitModel::Mmc, 3000.0, &service, 0.99, 0.002),
            None
        );
    }

    #[test]
    fn the_knee_is_where_the_slo_breaks() {
        // Proves the knee rate meets the SLO and a little more does not, below saturation.
        let service = ServiceTime::constant(0.003);
        let knee = knee_rate(WaitModel::Mmc, 12, &service, 0.99, 0.010);
        assert!(knee > 3000.0 && knee < 4000.0, "{knee}");
        let p99 = |lambda| Model::mmc(lambda, service.rate(), 12).latency_quantile(&service, 0.99);
        assert!(p99(knee) <= 0.010 + 1e-9);
        assert!(p99(knee * 1.01) > 0.010);
        assert_eq!(knee_rate(WaitModel::Mmc, 12, &service, 0.99, 0.001), 0.0);
    }

    #[test]
    fn measured_service_statistics() {
        // Proves mean, rate and the coefficient of variation of a sample distribution.
        let s = ServiceTime::from_counts([(1.0, 1), (3.0, 1)]);
        assert_eq!(s.mean(), 2.0);
        assert_eq!(s.rate(), 0.5);
        assert!(close(s.cv_squared(), 0.25, 1e-12));
        assert_eq!(ServiceTime::constant(3.0).cv_squared(), 0.0);
        assert_eq!(s.max(), 3.0);
    }
}
