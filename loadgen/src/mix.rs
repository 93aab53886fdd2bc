//! What each request is: which service it calls and which payload it carries, drawn from weighted
//! mixes, and the seeded random numbers that draw them (and the Poisson arrival gaps).
//!
//! A mix is a list of `(choice, weight)`; a request picks each entry with probability
//! `weight / sum(weights)`. A single-entry mix never consumes randomness, so the common case costs
//! nothing. The generator is SplitMix64: tiny, fast, and seeded, so that a run's sequence of
//! choices and arrival times replays from its `--seed`.
//!
//! Command-line forms (parsed here, checked before anything connects):
//! - `--service echo --service faulty:3`: a name with an optional `:WEIGHT` (default 1);
//! - `--payload-bytes 64,1024:2,10240`: sizes with optional `:WEIGHT`;
//! - `--payload TEXT` (repeatable) with `--payload-weights 9,1`: literal payloads.

use serde::Serialize;

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state, one add and a mix per number.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator for stream `stream` of `seed`, independent enough of the other streams for
    /// load generation (each task or connection gets its own).
    pub fn for_stream(seed: u64, stream: u64) -> Rng {
        let mut mixer = Rng::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        Rng::new(mixer.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Exponentially distributed with the given mean (the gap between Poisson arrivals).
    pub fn next_exponential(&mut self, mean: f64) -> f64 {
        assert!(mean > 0.0 && mean.is_finite(), "exponential mean {mean}");
        // 1 - u is in (0, 1], so the logarithm is finite.
        -(1.0 - self.next_f64()).ln() * mean
    }
}

/// A weighted list of choices.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Weighted<T> {
    pub entries: Vec<WeightedEntry<T>>,
    #[serde(skip)]
    total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedEntry<T> {
    pub value: T,
    pub weight: u32,
}

impl<T> Weighted<T> {
    /// A mix of `entries`; at least one, each weight at least 1.
    pub fn new(entries: Vec<(T, u32)>) -> Result<Weighted<T>, String> {
        if entries.is_empty() {
            return Err("a mix needs at least one entry".to_string());
        }
        if entries.iter().any(|(_, weight)| *weight == 0) {
            return Err("weights must be at least 1".to_string());
        }
        let total = entries.iter().map(|(_, weight)| u64::from(*weight)).sum();
        let entries = entries
            .into_iter()
            .map(|(value, weight)| WeightedEntry { value, weight })
            .collect();
        Ok(Weighted { entries, total })
    }

    pub fn single(value: T) -> Weighted<T> {
        Weighted::new(vec![(value, 1)]).expect("one entry of weight 1")
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, index: usize) -> &T {
        &self.entries[index].value
    }

    /// The share of requests that pick entry `index`.
    pub fn fraction(&self, index: usize) -> f64 {
        f64::from(self.entries[index].weight) / self.total as f64
    }

    /// Draw an entry's index.
    pub fn pick(&self, rng: &mut Rng) -> usize {
        if self.entries.len() == 1 {
            return 0;
        }
        let mut ticket = rng.next_u64() % self.total;
        for (index, entry) in self.entries.iter().enumerate() {
            let weight = u64::from(entry.weight);
            if ticket < weight {
                return index;
            }
            ticket -= weight;
        }
        unreachable!("ticket below the total weight {}", self.total)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|entry| &entry.value)
    }
}

/// What a request carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadKind {
    /// This many bytes, stamped with the call's identity (see [`crate::payload`]).
    Bytes(u32),
    /// These exact bytes (a command such as `sleep 3`), sent unchanged.
    Text(String),
}

impl PayloadKind {
    pub fn len(&self) -> usize {
        match self {
            PayloadKind::Bytes(len) => *len as usize,
            PayloadKind::Text(text) => text.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How a report names it: `64 B` or the quoted text.
    pub fn describe(&self) -> String {
        match self {
            PayloadKind::Bytes(len) => format!("{len} B"),
            PayloadKind::Text(text) => format!("{text:?}"),
        }
    }
}

/// Split `VALUE[:WEIGHT]` (the weight after the last `:`).
pub fn split_weight(text: &str) -> Result<(&str, u32), String> {
    match text.rsplit_once(':') {
        None => Ok((text, 1)),
        Some((value, weight)) => {
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("`{weight}` in `{text}` is not a whole-number weight"))?;
            if weight == 0 {
                return Err(format!("the weight in `{text}` must be at least 1"));
            }
            Ok((value, weight))
        }
    }
}

/// Parse `64,1024:2,10240` into sizes with weights, each at most `bytes_max`.
pub fn parse_payload_bytes(text: &str, bytes_max: u32) -> Result<Vec<(u32, u32)>, String> {
    let mut sizes = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let (size, weight) = split_weight(item)?;
        let size: u32 = size
            .trim()
            .parse()
            .map_err(|_| format!("`{size}` is not a payload size in bytes"))?;
        if size > bytes_max {
            return Err(format!("{size} bytes is over the limit of {bytes_max}"));
        }
        sizes.push((size, weight));
    }
    Ok(sizes)
}

/// Parse `9,1` into weights.
pub fn parse_weights(text: &str) -> Result<Vec<u32>, String> {
    text.split(',')
        .map(|item| {
            let weight: u32 = item
                .trim()
                .parse()
                .map_err(|_| format!("`{item}` is not a whole-number weight"))?;
            if weight == 0 {
                return Err("weights must be at least 1".to_string());
            }
            Ok(weight)
        })
        .collect()
}

/// Parse `NAME[:WEIGHT]` for `--service`.
pub fn parse_service(text: &str) -> Result<(String, u32), String> {
    let (name, weight) = split_weight(text)?;
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if !valid {
        return Err(format!(
            "`{name}` is not a service name (1-64 of A-Z a-z 0-9 _ . -)"
        ));
    }
    Ok((name.to_string(), weight))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_replays_from_its_seed() {
        // Proves equal seeds give equal sequences, streams differ, and floats stay in [0, 1).
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let second: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(first, second);
        assert_ne!(
            Rng::for_stream(7, 1).next_u64(),
            Rng::for_stream(7, 2).next_u64()
        );
        let mut rng = Rng::new(1);
        for _ in 0..10_000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn exponential_gaps_have_their_mean() {
        // Proves the Poisson gap sampler's mean and its memoryless tail P(X > mean) = 1/e.
        let mut rng = Rng::new(42);
        let n = 200_000;
        let samples: Vec<f64> = (0..n).map(|_| rng.next_exponential(2.0)).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        assert!((mean - 2.0).abs() < 0.02, "mean {mean}");
        let over = samples.iter().filter(|x| **x > 2.0).count() as f64 / n as f64;
        assert!((over - (-1.0f64).exp()).abs() < 0.005, "tail {over}");
        assert!(samples.iter().all(|x| x.is_finite() && *x >= 0.0));
    }

    #[test]
    fn weighted_picks_follow_their_weights() {
        // Proves picks land in proportion to the weights, and one entry draws nothing.
        let mix = Weighted::new(vec![("a", 1), ("b", 3)]).unwrap();
        let mut rng = Rng::new(3);
        let n = 100_000;
        let b = (0..n).filter(|_| mix.pick(&mut rng) == 1).count() as f64 / n as f64;
        assert!((b - 0.75).abs() < 0.01, "share of b {b}");
        assert_eq!(mix.fraction(0), 0.25);
        let single = Weighted::single("x");
        let mut untouched = Rng::new(9);
        assert_eq!(single.pick(&mut untouched), 0);
        assert_eq!(untouched.next_u64(), Rng::new(9).next_u64());
        assert!(Weighted::<u8>::new(vec![]).is_err());
        assert!(Weighted::new(vec![(1, 0)]).is_err());
    }

    #[test]
    fn command_line_mixes_parse() {
        // Proves the VALUE[:WEIGHT] forms and their refusals.
        assert_eq!(
            parse_payload_bytes("64,1024:2, 10240", 1 << 20),
            Ok(vec![(64, 1), (1024, 2), (10240, 1)])
        );
        assert!(parse_payload_bytes("64,", 1 << 20).is_err());
        assert!(parse_payload_bytes("2000000", 1 << 20).is_err());
        assert!(parse_payload_bytes("64:0", 1 << 20).is_err());
        assert_eq!(parse_service("faulty:3"), Ok(("faulty".to_string(), 3)));
        assert_eq!(parse_service("echo"), Ok(("echo".to_string(), 1)));
        assert!(parse_service("bad name").is_err());
        assert!(parse_service(":2").is_err());
        assert_eq!(parse_weights("9, 1"), Ok(vec![9, 1]));
        assert!(parse_weights("1,x").is_err());
        assert_eq!(
            PayloadKind::Text("sleep 3".into()).describe(),
            "\"sleep 3\""
        );
        assert_eq!(PayloadKind::Bytes(64).len(), 64);
    }
}
