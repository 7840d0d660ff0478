//! Parsing of the value kinds a config holds: durations, sizes, signals,
//! octal modes, commands. Each parser returns an operator-readable message;
//! the serde wrappers turn it into an error positioned at the value.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::{AutoRestart, Signal};

/// Parses "10s", "250ms", "1.5s", "2m", "1h", "0s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, such as \"10s\", \"250ms\", \"2m\""))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("invalid duration {s:?}: out of range"))
}

/// Parses "50MB", "10KB", "1GB", "512" (bytes); K/M/G are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected bytes or a number with KB, MB or GB"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        u => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {u:?} (use KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses "TERM", "SIGTERM", "term" or "15".
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim();
    let err = || {
        format!(
            "invalid signal {s:?}: expected a name such as TERM, INT, QUIT, HUP, KILL, USR1, USR2, WINCH or a number"
        )
    };
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| err());
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| err())
}

/// Parses an octal mode such as "022" or "0660".
pub fn parse_octal(s: &str) -> Result<u32, String> {
    let t = s.trim().trim_start_matches("0o");
    u32::from_str_radix(t, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            format!("invalid mode {s:?}: expected an octal number such as \"022\" or \"0660\"")
        })
}

/// Declares a newtype whose Deserialize accepts a string (parsed by `$parse`)
/// and, when `$int` is given, an integer converted by it.
macro_rules! value_type {
    ($name:ident, $ty:ty, $expecting:expr, $parse:expr, int: $int:expr) => {
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name(pub $ty);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        let parse: fn(&str) -> Result<$ty, String> = $parse;
                        parse(v).map($name).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        let conv: fn(i64) -> Result<$ty, String> = $int;
                        conv(v).map($name).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

value_type!(DurationValue, Duration, "a duration such as \"10s\" or \"250ms\"", parse_duration,
    int: |v| u64::try_from(v).map(Duration::from_secs).map_err(|_| format!("invalid duration {v}: must not be negative")));
value_type!(SizeValue, u64, "a size such as \"50MB\" or a number of bytes", parse_size,
    int: |v| u64::try_from(v).map_err(|_| format!("invalid size {v}: must not be negative")));
value_type!(SignalValue, Signal, "a signal name such as \"TERM\"", parse_signal,
    int: |v| i32::try_from(v).map_err(|_| String::new()).and_then(|n| parse_signal(&n.to_string())));
value_type!(OctalValue, u32, "an octal mode such as \"022\"", parse_octal,
    int: |v| u32::try_from(v).ok().filter(|m| *m <= 0o7777).ok_or_else(|| format!("invalid mode {v}")));

/// `autorestart`: "always" | "unexpected" | "never", or true/false.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AutoRestartValue(pub AutoRestart);

impl<'de> Deserialize<'de> for AutoRestartValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AutoRestartValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"always\", \"unexpected\" or \"never\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v.to_ascii_lowercase().as_str() {
                    "always" | "true" => Ok(AutoRestartValue(AutoRestart::Always)),
                    "unexpected" => Ok(AutoRestartValue(AutoRestart::Unexpected)),
                    "never" | "false" => Ok(AutoRestartValue(AutoRestart::Never)),
                    _ => Err(E::custom(format!(
                        "invalid autorestart {v:?}: use one of \"always\", \"unexpected\", \"never\""
                    ))),
                }
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(AutoRestartValue(if v {
                    AutoRestart::Always
                } else {
                    AutoRestart::Never
                }))
            }
        }
        d.deserialize_any(V)
    }
}

/// `command`: an argv array, or a string split like a shell would.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandValue(pub Vec<String>);

impl<'de> Deserialize<'de> for CommandValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CommandValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an array of strings such as [\"node\", \"app.js\"], or a command line string",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let argv = shlex::split(v).ok_or_else(|| {
                    E::custom(format!(
                        "cannot split command {v:?}: unbalanced quote or trailing backslash"
                    ))
                })?;
                non_empty(argv)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut argv = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    argv.push(s);
                }
                non_empty(argv)
            }
        }
        fn non_empty<E: de::Error>(argv: Vec<String>) -> Result<CommandValue, E> {
            if argv.first().is_none_or(|a| a.is_empty()) {
                Err(E::custom("command must not be empty: give the program and its arguments, e.g. [\"node\", \"app.js\"]"))
            } else {
                Ok(CommandValue(argv))
            }
        }
        d.deserialize_any(V)
    }
}

/// An environment value: strings, integers and booleans are all taken as text.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, integer or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("10s", 10_000),
            ("250ms", 250),
            ("1.5s", 1500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("0s", 0),
            ("3", 3000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "10 parsecs", "-1s", "s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("10 parsecs")
            .expect_err("unit")
            .contains("ms, s, m or h"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MB"), Ok(50 << 20));
        assert_eq!(parse_size("10kb"), Ok(10 << 10));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn signals() {
        for s in ["TERM", "SIGTERM", "term", "15"] {
            assert_eq!(parse_signal(s), Ok(Signal::SIGTERM), "{s}");
        }
        assert_eq!(parse_signal("usr1"), Ok(Signal::SIGUSR1));
        assert!(parse_signal("TREM").expect_err("bad").contains("TERM, INT"));
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn octal() {
        assert_eq!(parse_octal("022"), Ok(0o22));
        assert_eq!(parse_octal("0660"), Ok(0o660));
        assert!(parse_octal("999").is_err());
    }
}
