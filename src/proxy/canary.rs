//! Canary routing and the per-generation counters that judge a canary.
//!
//! During a canary (`zdtctl restart web1 --canary 10`) the routes carry two
//! generations: the stable one in [`super::Routes::upstreams`] and the
//! canary in [`super::Routes::canary`]. Each request is assigned a side,
//! once, before its instance is picked ([`Pin::side`]):
//! 1. with `canary_header` configured and present: a stable hash of its
//!    value (FNV-1a) below `percent` goes to the canary; no cookie;
//! 2. a `zdt_canary=<gen>` cookie naming the canary or the stable
//!    generation: that one;
//! 3. otherwise a random draw with `percent`, and the answer carries
//!    `Set-Cookie: zdt_canary=<gen>` for the side that served it, so the
//!    client's next requests stay there.
//!
//! If the chosen side has no ready instance the other one serves (a request
//! is never failed for stickiness). Without a canary nothing is looked at:
//! the assignment costs nothing on the ordinary path.
//!
//! [`GenStats`] counts, per generation, requests answered, 5xx answers
//! (the application's and zdt's 502/504) and a latency histogram, with
//! relaxed atomics only: status reads them while the proxy writes.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::Upstream;

/// The name of zdt's canary cookie.
pub const COOKIE: &str = "zdt_canary";

/// The canary half of a program's routes.
#[derive(Debug)]
pub(crate) struct Canary {
    /// The canary generation.
    pub gen: u64,
    /// The generation that keeps the rest of the traffic.
    pub stable_gen: u64,
    /// Share of new clients sent to the canary, 1 to 99.
    pub percent: u8,
    /// `canary_header`: assign by a hash of this header's value.
    pub header: Option<HeaderName>,
    /// The canary's ready instances.
    pub upstreams: Vec<Arc<Upstream>>,
}

/// Which generation of a canary a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The generation that served before the canary.
    Stable,
    /// The canary generation.
    Canary,
}

/// What a request's assignment needs from its head.
pub(crate) trait Keys {
    /// The value of header `name`, if present.
    fn header(&self, name: &HeaderName) -> Option<&[u8]>;
    /// The value of the `zdt_canary` cookie, if present.
    fn cookie(&self) -> Option<&[u8]>;
}

/// The value of `zdt_canary` in one `Cookie` header value.
fn cookie_in(value: &[u8]) -> Option<&[u8]> {
    value.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let rest = pair.strip_prefix(COOKIE.as_bytes())?;
        rest.strip_prefix(b"=").map(<[u8]>::trim_ascii)
    })
}

impl Keys for HeaderMap {
    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(HeaderValue::as_bytes)
    }

    fn cookie(&self) -> Option<&[u8]> {
        self.get_all(hyper::header::COOKIE)
            .iter()
            .find_map(|v| cookie_in(v.as_bytes()))
    }
}

/// A request head as zdt forwards it (relay path): the request line, then
/// `name: value` lines separated by CRLF.
pub(crate) struct RawHead<'a>(pub &'a [u8]);

/// The values of header `name` in a raw head, in order.
fn raw_values<'a, 'n>(head: &'a [u8], name: &'n [u8]) -> impl Iterator<Item = &'a [u8]> + 'n
where
    'a: 'n,
{
    head.split(|b| *b == b'\n').skip(1).filter_map(move |line| {
        let colon = line.iter().position(|b| *b == b':')?;
        let (n, v) = line.split_at(colon);
        n.eq_ignore_ascii_case(name).then(|| v[1..].trim_ascii())
    })
}

impl Keys for RawHead<'_> {
    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        raw_values(self.0, name.as_str().as_bytes()).next()
    }

    fn cookie(&self) -> Option<&[u8]> {
        raw_values(self.0, b"cookie").find_map(cookie_in)
    }
}

/// No head to look at (TCP connections): always a draw.
pub(crate) struct NoKeys;

impl Keys for NoKeys {
    fn header(&self, _: &HeaderName) -> Option<&[u8]> {
        None
    }
    fn cookie(&self) -> Option<&[u8]> {
        None
    }
}

/// 64-bit FNV-1a: a stable hash (the same value lands on the same side in
/// every zdt and across restarts of it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

thread_local! {
    /// xorshift64* state per proxy thread, seeded from the OS's randomness
    /// (through `RandomState`) the first time a thread draws.
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A number in 0..100, uniformly enough for a traffic split.
fn draw() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        if x == 0 {
            use std::hash::{BuildHasher, Hasher};
            x = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % 100
    })
}

impl Canary {
    /// The side of a request, and whether its answer gets the cookie.
    fn assign(&self, keys: &(dyn Keys + Sync)) -> (Side, bool) {
        let pct = u64::from(self.percent);
        let side = |canary: bool| if canary { Side::Canary } else { Side::Stable };
        if let Some(v) = self.header.as_ref().and_then(|h| keys.header(h)) {
            return (side(fnv1a(v) % 100 < pct), false);
        }
        let named = keys
            .cookie()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        match named {
            Some(g) if g == self.gen => (Side::Canary, false),
            Some(g) if g == self.stable_gen => (Side::Stable, false),
            _ => (side(draw() < pct), true),
        }
    }
}

/// A request's assignment, made once (on its first pick) and kept across
/// its retries on other instances.
#[derive(Debug, Default)]
pub(crate) struct Pin {
    side: Option<Side>,
    /// Set by a draw: (canary gen, stable gen) for the cookie.
    cookie: Option<(u64, u64)>,
}

impl Pin {
    /// The side to prefer under `canary` (None: no canary, any instance).
    pub(crate) fn side(
        &mut self,
        canary: Option<&Canary>,
        keys: &(dyn Keys + Sync),
    ) -> Option<Side> {
        let c = canary?;
        if self.side.is_none() {
            let (side, cookie) = c.assign(keys);
            self.side = Some(side);
            self.cookie = cookie.then_some((c.gen, c.stable_gen));
        }
        self.side
    }

    /// The `Set-Cookie` value for an answer from `up`, when the request was
    /// assigned by a draw: the generation of the side that served it.
    pub(crate) fn set_cookie(&self, up: &Upstream) -> Option<String> {
        let (canary, stable) = self.cookie?;
        let gen = if up.gen == canary { canary } else { stable };
        Some(format!("{COOKIE}={gen}; Path=/; HttpOnly; SameSite=Lax"))
    }
}

/// Latency buckets: four per power of two of microseconds (each within 19 %
/// of its neighbours), from 1 µs to about 33 s; slower lands in the last.
const BUCKETS: usize = 100;

fn bucket_of(micros: u64) -> usize {
    if micros < 4 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros() as usize;
    let sub = ((micros >> (octave - 2)) - 4) as usize;
    (4 * (octave - 1) + sub).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in microseconds.
fn bucket_top(i: usize) -> u64 {
    if i < 4 {
        return i as u64 + 1;
    }
    let (octave, sub) = (i / 4 + 1, (i % 4) as u64);
    (5 + sub) << (octave - 2)
}

/// Counters of one generation (all its processes, across crashes).
#[derive(Debug)]
pub struct GenStats {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for GenStats {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl GenStats {
    /// Counts one request answered after `took`, a 5xx or not.
    pub(crate) fn record(&self, took: Duration, error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests, 5xx answers, and the 99th percentile of latency in
    /// microseconds (a bucket's upper bound; None before any request).
    pub fn read(&self) -> (u64, u64, Option<u64>) {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let p99 = (total > 0).then(|| {
            let want = total - total / 100;
            let mut seen = 0;
            let i = counts
                .iter()
                .position(|c| {
                    seen += c;
                    seen >= want
                })
                .unwrap_or(BUCKETS - 1);
            bucket_top(i)
        });
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            p99,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_cover_their_values() {
        let mut last = 0;
        for v in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            9,
            15,
            16,
            100,
            1000,
            12_345,
            1 << 30,
        ] {
            let b = bucket_of(v);
            assert!(b >= last, "{v}");
            assert!(v < bucket_top(b) || b == BUCKETS - 1, "{v} in {b}");
            if b > 0 {
                assert!(v >= bucket_top(b - 1), "{v} above bucket {}", b - 1);
            }
            last = b;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn p99_is_the_bucket_of_the_slowest_percent() {
        let s = GenStats::default();
        assert_eq!(s.read(), (0, 0, None));
        for _ in 0..990 {
            s.record(Duration::from_micros(1000), false);
        }
        for _ in 0..10 {
            s.record(Duration::from_millis(500), true);
        }
        let (n, errors, p99) = s.read();
        assert_eq!((n, errors), (1000, 10));
        let p99 = p99.expect("some");
        assert!((1000..1300).contains(&p99), "{p99}");
        s.record(Duration::from_millis(500), false);
        let p99 = s.read().2.expect("some");
        assert!((500_000..600_000).contains(&p99), "{p99}");
    }

    fn canary(header: Option<&str>) -> Canary {
        Canary {
            gen: 5,
            stable_gen: 4,
            percent: 30,
            header: header.map(|h| HeaderName::from_bytes(h.as_bytes()).expect("name")),
            upstreams: Vec::new(),
        }
    }

    #[test]
    fn a_cookie_naming_either_generation_is_followed() {
        let c = canary(None);
        let head = |cookie: &str| format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n");
        for (cookie, want) in [
            ("a=1; zdt_canary=5", (Side::Canary, false)),
            ("zdt_canary=4;b=2", (Side::Stable, false)),
        ] {
            let h = head(cookie);
            assert_eq!(c.assign(&RawHead(h.as_bytes())), want, "{cookie}");
            let mut map = HeaderMap::new();
            map.insert(
                hyper::header::COOKIE,
                HeaderValue::from_str(cookie).expect("v"),
            );
            assert_eq!(c.assign(&map), want, "{cookie}");
        }
        // A stale generation (or none) is drawn again, with a cookie.
        let h = head("zdt_canary=3");
        assert!(c.assign(&RawHead(h.as_bytes())).1);
        assert!(c.assign(&NoKeys).1);
    }

    #[test]
    fn draws_follow_the_percentage() {
        let c = canary(None);
        let to_canary = (0..10_000)
            .filter(|_| c.assign(&NoKeys).0 == Side::Canary)
            .count();
        assert!((2_500..3_500).contains(&to_canary), "{to_canary}");
    }

    #[test]
    fn a_header_value_always_lands_on_the_same_side() {
        let c = canary(Some("X-User-Id"));
        let mut canaried = 0;
        for user in 0..1000 {
            let h = format!("GET / HTTP/1.1\r\nx-user-id: {user}\r\nCookie: zdt_canary=4\r\n");
            let (side, cookie) = c.assign(&RawHead(h.as_bytes()));
            assert!(!cookie);
            for _ in 0..3 {
                assert_eq!(c.assign(&RawHead(h.as_bytes())).0, side);
            }
            canaried += usize::from(side == Side::Canary);
        }
        assert!((200..400).contains(&canaried), "{canaried}");
    }
}
