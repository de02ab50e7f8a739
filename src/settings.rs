//! Validation of typed settings. Each command's settings implement [`Settings`],
//! whose `validate()` is a list of one-line checks built from the helpers here, so a
//! setting's allowed range is written once, in one place, and applies alike to a flag,
//! a `--config` key and a pipeline table. Every error names the setting and its range
//! (`max_grad_norm must be ≥ 0, got -1`); the command line shows the name as its flag
//! (`--max_grad_norm`), a config file as its key beside the file's path.
//!
//! Floats on the command line go through [`finite_f64`] / [`finite_f32`], which refuse
//! `inf` and `nan`: the settings are saved as JSON (and merged with a config file
//! through JSON), where a non-finite number becomes null and would silently turn an
//! optional setting back into its default.

use std::fmt::Display;

use crate::error::{Error, Result};

/// A command's settings, checked as typed values before any file is touched.
pub trait Settings {
    /// The first setting outside its allowed range, as an [`Error::Setting`] (or an
    /// [`Error::Invalid`] for a required setting that is missing).
    fn validate(&self) -> Result<()>;
}

/// An allowed range of a float setting.
#[derive(Debug, Clone, Copy)]
pub enum Range {
    /// `≥ lo`
    AtLeast(f64),
    /// `> lo`
    Above(f64),
    /// `[lo, hi]`
    Closed(f64, f64),
    /// `[lo, hi)`
    HalfOpen(f64, f64),
    /// `(lo, hi]`
    LeftOpen(f64, f64),
}

impl Range {
    fn contains(self, v: f64) -> bool {
        match self {
            Range::AtLeast(lo) => v >= lo,
            Range::Above(lo) => v > lo,
            Range::Closed(lo, hi) => lo <= v && v <= hi,
            Range::HalfOpen(lo, hi) => lo <= v && v < hi,
            Range::LeftOpen(lo, hi) => lo < v && v <= hi,
        }
    }
}

impl Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Range::AtLeast(lo) => write!(f, "≥ {lo}"),
            Range::Above(lo) => write!(f, "> {lo}"),
            Range::Closed(lo, hi) => write!(f, "in [{lo}, {hi}]"),
            Range::HalfOpen(lo, hi) => write!(f, "in [{lo}, {hi})"),
            Range::LeftOpen(lo, hi) => write!(f, "in ({lo}, {hi}]"),
        }
    }
}

/// A setting error: `key` is the setting's name, `msg` the rule and the value given.
pub fn invalid(key: &str, msg: impl Into<String>) -> Error {
    Error::Setting {
        key: key.to_string(),
        msg: msg.into(),
    }
}

/// A float setting: finite and in `range`.
pub fn float<T: Into<f64> + Display + Copy>(key: &str, value: T, range: Range) -> Result<()> {
    let v: f64 = value.into();
    if !v.is_finite() {
        return Err(invalid(
            key,
            format!("must be a finite number {range}, got {value}"),
        ));
    }
    if !range.contains(v) {
        return Err(invalid(key, format!("must be {range}, got {value}")));
    }
    Ok(())
}

/// An optional float setting: when set, finite and in `range`.
pub fn float_opt(key: &str, value: Option<f64>, range: Range) -> Result<()> {
    value.map_or(Ok(()), |v| float(key, v, range))
}

/// An integer setting: at least `min` (batch sizes, counts).
pub fn at_least<T: PartialOrd + Display + Copy>(key: &str, value: T, min: T) -> Result<()> {
    if value < min {
        return Err(invalid(key, format!("must be ≥ {min}, got {value}")));
    }
    Ok(())
}

/// An optional integer setting: when set, at least `min`.
pub fn at_least_opt<T: PartialOrd + Display + Copy>(
    key: &str,
    value: Option<T>,
    min: T,
) -> Result<()> {
    value.map_or(Ok(()), |v| at_least(key, v, min))
}

/// Names a setting error as the command line spells the setting: `--max_grad_norm`.
pub fn as_flag(e: Error) -> Error {
    match e {
        Error::Setting { key, msg } if !key.starts_with("--") => Error::Setting {
            key: format!("--{key}"),
            msg,
        },
        e => e,
    }
}

/// clap's parser for float flags: a number, refusing `inf` and `nan`.
pub fn finite_f64(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() {
        return Err("must be a finite number".into());
    }
    Ok(v)
}

/// [`finite_f64`] for `f32` flags (a value beyond f32's range is refused too).
pub fn finite_f32(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() {
        return Err("must be a finite number".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_setting_and_refuse_non_finite_values() {
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert_eq!(
            msg(float("max_grad_norm", -1.0, Range::AtLeast(0.0))),
            "max_grad_norm must be ≥ 0, got -1"
        );
        assert_eq!(
            msg(float("max_grad_norm", f64::INFINITY, Range::AtLeast(0.0))),
            "max_grad_norm must be a finite number ≥ 0, got inf"
        );
        assert_eq!(
            msg(float("gamma", f32::NAN, Range::Closed(0.0, 1.0))),
            "gamma must be a finite number in [0, 1], got NaN"
        );
        assert_eq!(
            msg(float("ema", 1.0, Range::HalfOpen(0.0, 1.0))),
            "ema must be in [0, 1), got 1"
        );
        assert!(float("ema", 0.0, Range::HalfOpen(0.0, 1.0)).is_ok());
        assert!(float("top_p", 0.0, Range::LeftOpen(0.0, 1.0)).is_err());
        assert!(float_opt("learning_rate", None, Range::Above(0.0)).is_ok());
        assert_eq!(
            msg(at_least("ptx_batch_size", 0usize, 1)),
            "ptx_batch_size must be ≥ 1, got 0"
        );
        assert_eq!(finite_f64("-1.5"), Ok(-1.5));
        for bad in ["inf", "-inf", "nan", "NaN", "infinity"] {
            assert!(finite_f64(bad).is_err(), "{bad}");
            assert!(finite_f32(bad).is_err(), "{bad}");
        }
        assert!(finite_f32("1e39").is_err(), "beyond f32");
        assert!(finite_f64("fast").is_err());
    }
}
