//! `cron_restart` schedules: standard cron syntax (5 fields, or 6 with
//! seconds first), read by `croner`, in zdt's local time.

use std::str::FromStr;
use std::time::Duration;

/// A parsed schedule.
pub struct Schedule(croner::Cron);

/// Reads `text`; the error says what is wrong and what was expected.
pub fn parse(text: &str) -> Result<Schedule, String> {
    croner::Cron::from_str(text).map(Schedule).map_err(|e| {
        format!(
            "cron_restart = {text:?}: {e}; expected 5 fields (minute hour day-of-month month day-of-week), such as \"0 4 * * *\" for 04:00 every day, or 6 with seconds first"
        )
    })
}

impl Schedule {
    /// How long from now until the next time it names, in local time;
    /// None if it names no time to come.
    pub fn until_next(&self) -> Option<(Duration, chrono::DateTime<chrono::Local>)> {
        self.until_next_after(None)
    }

    /// [`Schedule::until_next`], the time coming after `after` too (the
    /// time that just fired: a timer that woke a little before the wall
    /// clock reached it must not fire it twice).
    pub fn until_next_after(
        &self,
        after: Option<chrono::DateTime<chrono::Local>>,
    ) -> Option<(Duration, chrono::DateTime<chrono::Local>)> {
        let now = chrono::Local::now();
        let from = after.map_or(now, |a| a.max(now));
        let next = self.0.find_next_occurrence(&from, false).ok()?;
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        Some((wait, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_name_the_next_time_and_bad_ones_say_why() {
        let (wait, next) = parse("0 4 * * *")
            .expect("daily")
            .until_next()
            .expect("next");
        assert!(wait <= Duration::from_secs(24 * 3600), "{wait:?}");
        assert_eq!(next.format("%H:%M:%S").to_string(), "04:00:00");
        let (wait, _) = parse("*/2 * * * * *")
            .expect("seconds")
            .until_next()
            .expect("next");
        assert!(wait <= Duration::from_secs(2), "{wait:?}");
        let e = parse("61 * * * *").err().expect("out of range");
        assert!(e.starts_with("cron_restart = \"61 * * * *\": "), "{e}");
        // After a time that fired: the one following it, even if the clock
        // has not reached the fired one yet.
        let s = parse("*/2 * * * * *").expect("seconds");
        let (_, first) = s.until_next().expect("next");
        let (_, second) = s.until_next_after(Some(first)).expect("after");
        assert_eq!((second - first).num_seconds(), 2);
        assert!(parse("every day").is_err());
        assert!(parse("").is_err());
    }
}
