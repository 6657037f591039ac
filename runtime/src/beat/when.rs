//! When an entry fires: [`When`], `every` on a fixed grid or a cron pattern in a time zone,
//! and the two questions the beat asks of it — the first occurrence after an instant, and the
//! latest one at or before it.
//!
//! **Every beat computes the same instants**, which is what makes an occurrence's id (and its
//! claim) the same on every beat: `every = "10s"` fires at the multiples of 10 s since the Unix
//! epoch (…:00, :10, :20), not 10 s after some process started, and a cron pattern's
//! occurrences depend on the pattern and the zone alone.
//!
//! **Cron** is parsed by croner: five fields (minute hour day-of-month month day-of-week, 0 =
//! Sunday), or six with seconds first, names (`MON`, `JAN`) and `@daily`-style nicknames.
//! As in Celery, day-of-month and day-of-week are **ANDed** when both are restricted
//! (`0 0 1-7 * 1` is the first Monday of the month; Vixie cron would OR them).
//!
//! **Daylight saving time** (croner's rules, which follow the Open Cron Pattern Spec and
//! Vixie cron; the tests below are Celery's DST bugs):
//! - a pattern with a fixed hour and minute (`30 2 * * *`) fires once on a fall-back day, at
//!   the first of the two 02:30s, and on a spring-forward day whose 02:30 does not exist, at
//!   the first instant after the gap (03:00);
//! - a pattern with a wildcard or step in its time fields (`0 * * * *`) fires at every
//!   matching wall-clock time, so an hourly job fires in both passes of a repeated hour and
//!   not in a skipped one.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// When an entry fires.
#[derive(Debug, Clone)]
pub enum When {
    /// At every multiple of this interval since the Unix epoch (UTC).
    Every(Duration),
    /// At the instants a cron pattern matches in a time zone.
    Cron {
        /// The pattern as written.
        pattern: String,
        /// The parsed pattern.
        cron: Box<Cron>,
        /// The zone its wall clock is read in.
        zone: chrono_tz::Tz,
    },
}

impl PartialEq for When {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            When::Every(every) => write!(f, "every {}", crate::units::format_duration(*every)),
            When::Cron { pattern, zone, .. } => write!(f, "cron {pattern} ({zone})"),
        }
    }
}

impl When {
    /// Every `every` (at least a millisecond).
    pub fn every(every: Duration) -> Self {
        When::Every(every.max(Duration::from_millis(1)))
    }

    /// The cron `pattern` read in `zone`, with Celery's AND of day-of-month and day-of-week.
    ///
    /// # Errors
    /// croner's explanation of a bad pattern, or a pattern that never fires.
    pub fn cron(pattern: &str, zone: chrono_tz::Tz) -> Result<Self, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .dom_and_dow(true)
            .build()
            .parse(pattern)
            .map_err(|e| e.to_string())?;
        let when = When::Cron {
            pattern: pattern.trim().to_owned(),
            cron: Box::new(cron),
            zone,
        };
        if when.next_after(Utc::now()).is_none() {
            return Err(format!("{pattern:?} never fires"));
        }
        Ok(when)
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Every(every) => {
                let step = millis(*every);
                let next = t.timestamp_millis().div_euclid(step).checked_add(1)? * step;
                DateTime::from_timestamp_millis(next)
            }
            When::Cron { cron, zone, .. } => cron
                .find_next_occurrence(&t.trunc_subsecs(0).with_timezone(zone), false)
                .ok()
                .map(|at| at.with_timezone(&Utc)),
        }
    }

    /// The latest occurrence at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Every(every) => {
                let step = millis(*every);
                DateTime::from_timestamp_millis(t.timestamp_millis().div_euclid(step) * step)
            }
            When::Cron { cron, zone, .. } => cron
                .find_previous_occurrence(&t.trunc_subsecs(0).with_timezone(zone), true)
                .ok()
                .map(|at| at.with_timezone(&Utc)),
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn cron(pattern: &str, zone: &str) -> When {
        When::cron(pattern, zone.parse().unwrap()).unwrap()
    }

    /// The occurrences after `from`, `n` of them, in UTC.
    fn after(when: &When, from: &str, n: usize) -> Vec<String> {
        let mut at = utc(from);
        (0..n)
            .map(|_| {
                at = when.next_after(at).unwrap();
                at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            })
            .collect()
    }

    #[test]
    fn every_fires_on_a_grid_from_the_epoch_so_every_beat_agrees() {
        let when = When::every(Duration::from_secs(10));
        assert_eq!(
            after(&when, "2026-12-01T15:00:03.250Z", 3),
            [
                "2026-12-01T15:00:10Z",
                "2026-12-01T15:00:20Z",
                "2026-12-01T15:00:30Z"
            ]
        );
        assert_eq!(
            when.next_after(utc("2026-12-01T15:00:10Z")),
            Some(utc("2026-12-01T15:00:20Z")),
            "strictly after"
        );
        assert_eq!(
            when.latest_at_or_before(utc("2026-12-01T15:00:19.999Z")),
            Some(utc("2026-12-01T15:00:10Z"))
        );
        assert_eq!(
            when.latest_at_or_before(utc("2026-12-01T15:00:20Z")),
            Some(utc("2026-12-01T15:00:20Z")),
            "at or before"
        );
    }

    /// celery#10107: an hourly job across the fall-back hour must fire in both passes of the
    /// repeated hour. New York, 2026-11-01: 01:00 EDT (05:00Z), 01:00 EST (06:00Z), 02:00 EST.
    #[test]
    fn an_hourly_job_fires_at_both_utc_hours_of_the_fall_back_hour() {
        let hourly = cron("0 * * * *", "America/New_York");
        assert_eq!(
            after(&hourly, "2026-11-01T03:30:00Z", 4),
            [
                "2026-11-01T04:00:00Z", // 00:00 EDT
                "2026-11-01T05:00:00Z", // 01:00 EDT
                "2026-11-01T06:00:00Z", // 01:00 EST, the repeated hour
                "2026-11-01T07:00:00Z", // 02:00 EST
            ]
        );
        // The research brief's case: US/Pacific, 01:00 PDT (08:00Z) and 01:00 PST (09:00Z).
        let pacific = cron("0 * * * *", "US/Pacific");
        assert_eq!(
            after(&pacific, "2026-11-01T07:30:00Z", 3),
            [
                "2026-11-01T08:00:00Z",
                "2026-11-01T09:00:00Z",
                "2026-11-01T10:00:00Z"
            ]
        );
        // Looking back from inside the second pass finds the second pass.
        assert_eq!(
            hourly.latest_at_or_before(utc("2026-11-01T06:20:00Z")),
            Some(utc("2026-11-01T06:00:00Z"))
        );
    }

    /// celery#9653 / django-celery-beat#134: a daily 16:04 New York job on spring-forward day
    /// (2026-03-08, EST → EDT at 02:00) fires at 16:04 local, i.e. 20:04Z, not 17:04 local.
    #[test]
    fn a_daily_job_on_spring_forward_day_fires_at_its_local_time() {
        let daily = cron("4 16 * * *", "America/New_York");
        assert_eq!(
            after(&daily, "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-07T21:04:00Z", // 16:04 EST
                "2026-03-08T20:04:00Z", // 16:04 EDT, spring-forward day
                "2026-03-09T20:04:00Z",
            ]
        );
    }

    /// 02:30 does not exist in Paris on 2026-03-29 (02:00 → 03:00): the run moves to the
    /// first instant after the gap; on the fall-back day (2026-10-25) 02:30 happens twice
    /// and the job fires once, at the first.
    #[test]
    fn fixed_times_in_a_gap_move_after_it_and_in_an_overlap_fire_once() {
        let paris = cron("30 2 * * *", "Europe/Paris");
        assert_eq!(
            after(&paris, "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"], // 03:00 CEST, then 02:30 CEST
        );
        assert_eq!(
            after(&paris, "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"], // 02:30 CEST once, 02:30 CET
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_are_anded_as_in_celery() {
        let first_monday = cron("0 0 1-7 * 1", "UTC");
        assert_eq!(
            after(&first_monday, "2026-12-01T00:00:00Z", 3),
            [
                "2026-12-07T00:00:00Z",
                "2027-01-04T00:00:00Z",
                "2027-02-01T00:00:00Z"
            ]
        );
    }

    #[test]
    fn six_fields_have_seconds_and_bad_patterns_are_refused() {
        let each_second = cron("* * * * * *", "UTC");
        assert_eq!(
            each_second.next_after(utc("2026-12-01T15:00:03.500Z")),
            Some(utc("2026-12-01T15:00:04Z"))
        );
        assert_eq!(
            each_second.latest_at_or_before(utc("2026-12-01T15:00:03.500Z")),
            Some(utc("2026-12-01T15:00:03Z"))
        );
        assert!(When::cron("0 25 * * *", chrono_tz::UTC).is_err());
        assert!(When::cron("not a pattern", chrono_tz::UTC).is_err());
        assert!(
            When::cron("0 0 31 2 *", chrono_tz::UTC).is_err(),
            "never fires"
        );
    }
}
