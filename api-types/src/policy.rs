//! The automatic balloon policy's vocabulary (issue #18): its settings,
//! their one table of keys ([`KEYS`], which feeds `--balloon-policy`, `blimp
//! balloon policy set`, `PUT/PATCH /balloon/policy`, `--help` and README),
//! `GET /balloon/policy`'s body and the `PolicyDecision` event.
//!
//! A key has two spellings: the short one of the command line (`floor`,
//! `settle`), whose values are human strings (`256M`, `10s`, `8%`), and the
//! JSON one with its unit (`floor_mib`, `settle_ms`), whose values are
//! numbers. The API takes either; `GET` answers with the JSON names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::size::{self, Granule};
use crate::types::Validate;

/// What a key's value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A size, whole MiB (`256M`, `1G`; a JSON number is MiB).
    Mib,
    /// A duration (`10`, `10s`, `500ms`; a JSON number is milliseconds).
    Ms,
    /// A fraction 0..1 (`0.08` or `8%`).
    Fraction,
    /// A non-negative number.
    Number,
    /// A file path.
    Path,
}

/// One key: command-line name, JSON name, kind, default as written, help.
pub struct Key {
    pub name: &'static str,
    pub json: &'static str,
    pub kind: Kind,
    pub default: &'static str,
    pub help: &'static str,
}

const fn k(
    name: &'static str,
    json: &'static str,
    kind: Kind,
    default: &'static str,
    help: &'static str,
) -> Key {
    Key {
        name,
        json,
        kind,
        default,
        help,
    }
}

/// Every policy key, with its default: the one table the parsers, the
/// errors, `--help` and README use.
pub const KEYS: &[Key] = &[
    k(
        "floor",
        "floor_mib",
        Kind::Mib,
        "256M",
        "the guest never keeps less memory than this (RAM - balloon); never below --balloon floor",
    ),
    k(
        "headroom",
        "headroom_mib",
        Kind::Mib,
        "192M",
        "available memory the guest keeps: this much...",
    ),
    k(
        "headroom_fraction",
        "headroom_fraction",
        Kind::Fraction,
        "8%",
        "...plus this fraction of guest RAM",
    ),
    k(
        "min_headroom",
        "min_headroom_mib",
        Kind::Mib,
        "64M",
        "under host pressure the headroom halves, down to this",
    ),
    k(
        "settle",
        "settle_ms",
        Kind::Ms,
        "10s",
        "an excess must last this long before the balloon inflates (halved under host pressure); a continuing excess then inflates every interval",
    ),
    k(
        "max_step",
        "max_step_mib",
        Kind::Mib,
        "256M",
        "largest inflate per decision",
    ),
    k(
        "pressure_step",
        "pressure_step_mib",
        Kind::Mib,
        "64M",
        "smallest deflate when the guest shows pressure",
    ),
    k(
        "cooldown",
        "cooldown_ms",
        Kind::Ms,
        "30s",
        "no inflate for this long after a deflate for pressure",
    ),
    k(
        "stale_after",
        "stale_after_ms",
        Kind::Ms,
        "5s",
        "statistics older than this are stale (never inflate)",
    ),
    k(
        "major_faults_per_s",
        "major_faults_per_s",
        Kind::Number,
        "50",
        "major faults per second above which they count as pressure",
    ),
    k(
        "host_psi_high",
        "host_psi_high",
        Kind::Number,
        "10",
        "host PSI memory `some avg10` (percent) above which the host is under pressure",
    ),
    k(
        "psi_path",
        "psi_path",
        Kind::Path,
        "/proc/pressure/memory",
        "host pressure source (a cgroup's memory.pressure works too; unreadable = unknown)",
    ),
    k(
        "interval",
        "interval_ms",
        Kind::Ms,
        "1s",
        "decision and statistics interval",
    ),
];

/// Bounds on the values (a day for durations; 16 TiB for sizes).
pub const MAX_DURATION_MS: u64 = 86_400_000;
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 60_000;
pub const MAX_SIZE_MIB: u64 = 16 << 20;
pub const MAX_PATH_LEN: usize = 4096;

/// The keys as `key=VALUE (default D)`, for errors and `--help`.
pub fn known_keys() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// `--help`'s and README's list, one key a line.
pub fn keys_help() -> String {
    KEYS.iter()
        .map(|k| format!("  {}={} (default): {}", k.name, k.default, k.help))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The policy's settings, as `GET /balloon/policy` shows them (`config`)
/// and `PUT /balloon/policy` takes them (omitted keys = defaults).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PolicySettings {
    pub floor_mib: u64,
    pub headroom_mib: u64,
    pub headroom_fraction: f64,
    pub min_headroom_mib: u64,
    pub settle_ms: u64,
    pub max_step_mib: u64,
    pub pressure_step_mib: u64,
    pub cooldown_ms: u64,
    pub stale_after_ms: u64,
    pub major_faults_per_s: f64,
    pub host_psi_high: f64,
    pub psi_path: String,
    pub interval_ms: u64,
}

impl Default for PolicySettings {
    fn default() -> Self {
        let mut s = PolicySettings {
            floor_mib: 0,
            headroom_mib: 0,
            headroom_fraction: 0.0,
            min_headroom_mib: 0,
            settle_ms: 0,
            max_step_mib: 0,
            pressure_step_mib: 0,
            cooldown_ms: 0,
            stale_after_ms: 0,
            major_faults_per_s: 0.0,
            host_psi_high: 0.0,
            psi_path: String::new(),
            interval_ms: 0,
        };
        for key in KEYS {
            // The table's defaults parse (tested).
            if let Err(e) = s.set_str(key.name, key.default) {
                debug_assert!(false, "{e}");
            }
        }
        s
    }
}

fn find(key: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == key || k.json == key)
}

/// The keys of a list of `KEY=VALUE`s seen so far, each as (JSON name,
/// spelling given), to refuse a key given twice in either spelling.
#[derive(Default)]
pub struct GivenKeys<'a>(Vec<(&'static str, &'a str)>);

impl<'a> GivenKeys<'a> {
    /// Note `key` (either spelling, or `enabled`); an error naming it if it
    /// was given before. Unknown keys are left to the value's parser.
    pub fn note(&mut self, key: &'a str) -> Result<(), String> {
        let (json, name) = match find(key) {
            Some(k) => (k.json, k.name),
            None if key == "enabled" => ("enabled", "enabled"),
            None => return Ok(()),
        };
        if let Some((_, first)) = self.0.iter().find(|(j, _)| *j == json) {
            return Err(format!(
                "{name} given twice ({first} and {key}): give it once"
            ));
        }
        self.0.push((json, key));
        Ok(())
    }
}

/// A duration: `10` or `10s` (seconds, decimals allowed: `1.5s`), `500ms`,
/// `10m`, `1h`.
pub fn parse_duration_ms(v: &str) -> Result<u64, String> {
    let t = v.trim();
    if t.starts_with('-') {
        return Err("a duration cannot be negative".into());
    }
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (t, 1000.0)
    };
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && !num.trim().is_empty())
        .ok_or("expected a duration such as 10, 10s, 500ms or 10m")?;
    let ms = n * scale;
    if ms > MAX_DURATION_MS as f64 {
        return Err(format!("too long (at most {} s)", MAX_DURATION_MS / 1000));
    }
    Ok(ms.round() as u64)
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|n| n.is_finite())
}

impl PolicySettings {
    /// Set one key from its command-line form (`floor`, `256M`); the error
    /// names the key and the value.
    pub fn set_str(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.set(key, &Value::String(value.to_string()))
    }

    /// Set one key (either spelling) from a JSON value. The spelling says
    /// how a plain number is read: in the JSON spelling's unit
    /// (`settle_ms: 10`, `settle_ms: "10"`: 10 ms), or as the command line
    /// reads it (`settle: 10`, `settle: "10"`: 10 s). A string with its
    /// own unit (`"10s"`, `"256M"`) means that under either spelling.
    pub fn set(&mut self, key: &str, value: &Value) -> Result<(), String> {
        let Some(k) = find(key) else {
            return Err(format!(
                "unknown balloon policy key '{key}' (known: {})",
                known_keys()
            ));
        };
        let bad = |why: String| format!("balloon policy {key}={}: {why}", show(value));
        match k.kind {
            Kind::Mib => {
                let mib = match value {
                    Value::String(s) => size::parse(s, Granule::Mib)
                        .map(|b| b >> 20)
                        .map_err(|e| bad(e.to_string()))?,
                    v => v.as_u64().ok_or_else(|| {
                        bad(
                            "expected a whole number of MiB or a size such as 256M (not negative)"
                                .into(),
                        )
                    })?,
                };
                if mib > MAX_SIZE_MIB {
                    return Err(bad(format!("too large (at most {MAX_SIZE_MIB} MiB)")));
                }
                *self.mib_mut(k.json) = mib;
            }
            Kind::Ms => {
                // `settle_ms` reads a plain number in ms, `settle` (as the
                // command line) in s.
                let in_ms = key == k.json;
                let whole_ms =
                    "expected whole milliseconds or a duration such as 10s or 500ms (not negative)";
                let ms = match value {
                    Value::Number(n) if in_ms => n.as_u64().ok_or_else(|| bad(whole_ms.into()))?,
                    Value::Number(n) => parse_duration_ms(&n.to_string()).map_err(bad)?,
                    Value::String(s) if in_ms && s.trim().parse::<f64>().is_ok() => {
                        s.trim().parse::<u64>().map_err(|_| bad(whole_ms.into()))?
                    }
                    Value::String(s) => parse_duration_ms(s).map_err(bad)?,
                    _ => return Err(bad(whole_ms.into())),
                };
                if ms > MAX_DURATION_MS {
                    return Err(bad(format!("too long (at most {MAX_DURATION_MS} ms)")));
                }
                *self.ms_mut(k.json) = ms;
            }
            Kind::Fraction => {
                let f = match value {
                    Value::String(s) => match s.trim().strip_suffix('%') {
                        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
                        None => s.trim().parse::<f64>(),
                    }
                    .map_err(|_| bad("expected a fraction such as 0.08 or 8%".into()))?,
                    v => number(v).ok_or_else(|| bad("expected a number from 0 to 1".into()))?,
                };
                if !(0.0..=1.0).contains(&f) {
                    return Err(bad("a fraction must be from 0 to 1 (0% to 100%)".into()));
                }
                self.headroom_fraction = f;
            }
            Kind::Number => {
                let n = match value {
                    Value::String(s) => s
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite())
                        .ok_or_else(|| bad("expected a number".into()))?,
                    v => number(v).ok_or_else(|| bad("expected a number".into()))?,
                };
                if n < 0.0 {
                    return Err(bad("cannot be negative".into()));
                }
                if k.json == "host_psi_high" {
                    if n > 100.0 {
                        return Err(bad("PSI is a percentage: at most 100".into()));
                    }
                    self.host_psi_high = n;
                } else {
                    self.major_faults_per_s = n;
                }
            }
            Kind::Path => {
                let Value::String(p) = value else {
                    return Err(bad("expected a path (a string)".into()));
                };
                if p.is_empty() || p.len() > MAX_PATH_LEN || p.contains('\0') {
                    return Err(bad(format!(
                        "expected a non-empty path of at most {MAX_PATH_LEN} bytes"
                    )));
                }
                self.psi_path = p.clone();
            }
        }
        Ok(())
    }

    fn mib_mut(&mut self, json: &str) -> &mut u64 {
        match json {
            "floor_mib" => &mut self.floor_mib,
            "headroom_mib" => &mut self.headroom_mib,
            "min_headroom_mib" => &mut self.min_headroom_mib,
            "max_step_mib" => &mut self.max_step_mib,
            _ => &mut self.pressure_step_mib,
        }
    }

    fn ms_mut(&mut self, json: &str) -> &mut u64 {
        match json {
            "settle_ms" => &mut self.settle_ms,
            "cooldown_ms" => &mut self.cooldown_ms,
            "stale_after_ms" => &mut self.stale_after_ms,
            _ => &mut self.interval_ms,
        }
    }

    /// Every key within the bounds [`set`](Self::set) gives it: settings
    /// that did not come through `set` (a migration stream's, serde's
    /// plain derive) get them too. The error names the key and the value.
    fn keys_in_bounds(&self) -> Result<(), String> {
        let Ok(Value::Object(map)) = serde_json::to_value(self) else {
            return Err("balloon policy settings do not serialize".into());
        };
        let mut scratch = self.clone();
        for (key, value) in &map {
            scratch.set(key, value)?;
        }
        Ok(())
    }

    /// Checks every key's bounds, then against the guest: the error names
    /// the value.
    pub fn check(&self, guest_bytes: u64) -> Result<(), String> {
        self.keys_in_bounds()?;
        let guest_mib = guest_bytes >> 20;
        if self.floor_mib > guest_mib {
            return Err(format!(
                "balloon policy floor={} MiB is more than the guest's memory ({guest_mib} MiB)",
                self.floor_mib
            ));
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(format!(
                "balloon policy interval={} ms: out of range ({MIN_INTERVAL_MS} ms to {} s)",
                self.interval_ms,
                MAX_INTERVAL_MS / 1000
            ));
        }
        if self.max_step_mib == 0 {
            return Err("balloon policy max_step=0: must be at least 1 MiB".into());
        }
        if self.stale_after_ms < self.interval_ms {
            return Err(format!(
                "balloon policy stale_after={} ms is shorter than interval={} ms: every sample would be stale",
                self.stale_after_ms, self.interval_ms
            ));
        }
        Ok(())
    }

    /// The statistics polling interval the policy needs, whole seconds.
    pub fn stats_interval_s(&self) -> u32 {
        self.interval_ms.div_ceil(1000).clamp(1, 60) as u32
    }

    /// Parse `--balloon-policy`'s value: `on`, `off`, or `KEY=VALUE,...`
    /// (implies on; `enabled=off` allowed). Returns (enabled, settings).
    pub fn parse_cli(s: &str) -> Result<(bool, PolicySettings), String> {
        let mut settings = PolicySettings::default();
        let mut enabled = true;
        let mut given = GivenKeys::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some((k, _)) = item.split_once('=') {
                given
                    .note(k.trim())
                    .map_err(|e| format!("--balloon-policy: {e}"))?;
            }
            match item.split_once('=') {
                None if item == "on" => enabled = true,
                None if item == "off" => enabled = false,
                None => {
                    return Err(format!(
                        "--balloon-policy: '{item}' needs a value (KEY=VALUE; keys: enabled, {})",
                        known_keys()
                    ));
                }
                Some((k, v)) if k.trim() == "enabled" => {
                    enabled = match v.trim() {
                        "on" | "true" | "1" | "yes" => true,
                        "off" | "false" | "0" | "no" => false,
                        v => {
                            return Err(format!(
                                "--balloon-policy enabled={v}: expected on or off"
                            ));
                        }
                    }
                }
                Some((k, v)) => settings.set_str(k.trim(), v.trim()).map_err(|e| {
                    format!("--{e}").replace("--balloon policy ", "--balloon-policy ")
                })?,
            }
        }
        Ok((enabled, settings))
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `PUT /balloon/policy`: the whole configuration (omitted keys take their
/// defaults, either spelling) and `enabled` (default true).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyPut {
    pub enabled: bool,
    pub settings: PolicySettings,
}

/// `PATCH /balloon/policy`: some keys (either spelling) and/or `enabled`;
/// `{"enabled": true}` re-enables a paused policy.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PolicyPatch {
    pub enabled: Option<bool>,
    pub changes: BTreeMap<String, Value>,
}

impl PolicyPatch {
    /// Apply the changes to `s`.
    pub fn apply(&self, s: &mut PolicySettings) -> Result<(), String> {
        for (k, v) in &self.changes {
            s.set(k, v)?;
        }
        Ok(())
    }
}

fn enabled_of(v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("enabled={}: expected true or false", show(v)))
}

/// A JSON object's members, a key given twice refused (serde_json's own
/// maps keep the last one, so `{"floor":"256M","floor":"300M"}` would
/// quietly mean 300M).
struct OnceMap(BTreeMap<String, Value>);

impl<'de> Deserialize<'de> for OnceMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OnceMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of balloon policy keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<OnceMap, A::Error> {
                let mut map = BTreeMap::new();
                while let Some((k, v)) = access.next_entry::<String, Value>()? {
                    if map.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "balloon policy: '{k}' given twice: give it once"
                        )));
                    }
                    map.insert(k, v);
                }
                Ok(OnceMap(map))
            }
        }
        d.deserialize_map(Visitor)
    }
}

impl<'de> Deserialize<'de> for PolicyPatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let OnceMap(map) = OnceMap::deserialize(d)?;
        for k in KEYS.iter().filter(|k| k.name != k.json) {
            if map.contains_key(k.name) && map.contains_key(k.json) {
                return Err(serde::de::Error::custom(format!(
                    "balloon policy: '{}' and '{}' are two spellings of one key: give one",
                    k.name, k.json
                )));
            }
        }
        let mut p = PolicyPatch::default();
        for (k, v) in map {
            if k == "enabled" {
                p.enabled = Some(enabled_of(&v).map_err(serde::de::Error::custom)?);
            } else {
                p.changes.insert(k, v);
            }
        }
        // Bad keys and values are refused now, naming them.
        p.apply(&mut PolicySettings::default())
            .map_err(serde::de::Error::custom)?;
        Ok(p)
    }
}

impl Serialize for PolicyPatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = self.changes.clone();
        if let Some(e) = self.enabled {
            map.insert("enabled".into(), Value::Bool(e));
        }
        map.serialize(s)
    }
}

impl<'de> Deserialize<'de> for PolicyPut {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let patch = PolicyPatch::deserialize(d)?;
        let mut settings = PolicySettings::default();
        patch
            .apply(&mut settings)
            .map_err(serde::de::Error::custom)?;
        Ok(PolicyPut {
            enabled: patch.enabled.unwrap_or(true),
            settings,
        })
    }
}

impl Serialize for PolicyPut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(&self.settings).map_err(serde::ser::Error::custom)?;
        if let Value::Object(m) = &mut v {
            m.insert("enabled".into(), Value::Bool(self.enabled));
        }
        v.serialize(s)
    }
}

impl Validate for PolicyPatch {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Validate for PolicyPut {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One decision, as `GET /balloon/policy` (`last_decision`) and the
/// `PolicyDecision` event show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PolicyDecision {
    /// `inflate`, `deflate` or `hold`.
    pub action: String,
    /// Machine-readable kind: `below_headroom`, `rising`, `oom_kill`,
    /// `excess`, `settling`, `cooling_down`, `at_floor`, `within_band`,
    /// `stale_statistics`, `no_statistics`, `nothing_to_give`.
    pub reason: String,
    /// A sentence for people.
    pub detail: String,
    pub old_target_mib: u64,
    pub new_target_mib: u64,
    /// The guest's available memory as the policy counted it (its report,
    /// less what the balloon has still to take), MiB.
    pub available_mib: Option<u64>,
    pub headroom_mib: u64,
    /// Host PSI memory `some avg10`, percent (`None`: unknown).
    pub host_psi: Option<f64>,
    pub host_pressure: bool,
    pub guest_ram_mib: u64,
    /// Host MemAvailable, MiB (`None`: unknown).
    #[serde(default)]
    pub host_available_mib: Option<u64>,
}

/// `GET /balloon/policy`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PolicyStatus {
    pub enabled: bool,
    pub paused: bool,
    /// Why the policy does not act now (a manual target, the guest's driver
    /// not up, no statistics queue), or null.
    pub paused_reason: Option<String>,
    pub config: PolicySettings,
    pub last_decision: Option<PolicyDecision>,
    pub decisions: u64,
    pub target_changes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Settings that did not come through `set` (a migration stream's)
    /// are held to its bounds by `check`, which names the key.
    #[test]
    fn check_holds_every_key_to_the_bounds_of_set() {
        let ok = PolicySettings::default();
        ok.check(1 << 30).unwrap();
        type Spoil = fn(&mut PolicySettings);
        let cases: [(&str, Spoil); 5] = [
            ("headroom_mib", |s| s.headroom_mib = u64::MAX),
            ("pressure_step_mib", |s| {
                s.pressure_step_mib = MAX_SIZE_MIB + 1
            }),
            ("cooldown_ms", |s| s.cooldown_ms = u64::MAX),
            ("major_faults_per_s", |s| s.major_faults_per_s = f64::NAN),
            ("psi_path", |s| s.psi_path = String::new()),
        ];
        for (key, spoil) in cases {
            let mut s = ok.clone();
            spoil(&mut s);
            let e = s.check(1 << 30).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
        // Through serde, as a stream brings them.
        let mut v = serde_json::to_value(&ok).unwrap();
        v["host_psi_high"] = json!(1e300);
        let s: PolicySettings = serde_json::from_value(v).unwrap();
        assert!(s.check(1 << 30).unwrap_err().contains("host_psi_high"));
    }

    /// The cross-key checks of `check`: a step of 0 could never inflate,
    /// and statistics older than one interval would all be stale.
    #[test]
    fn check_refuses_a_zero_step_and_a_stale_after_shorter_than_the_interval() {
        let ok = PolicySettings::default();
        let mut s = ok.clone();
        s.max_step_mib = 0;
        let e = s.check(1 << 30).unwrap_err();
        assert!(e.contains("max_step=0"), "{e}");
        let mut s = ok.clone();
        s.interval_ms = 2000;
        s.stale_after_ms = 1000;
        let e = s.check(1 << 30).unwrap_err();
        assert!(e.contains("stale_after=1000 ms"), "{e}");
        // Equal is allowed.
        s.stale_after_ms = 2000;
        s.check(1 << 30).unwrap();
    }

    /// A plain number is read in the unit of the spelling it comes with,
    /// as a number or as a string; a string with a unit means that unit.
    #[test]
    fn the_spelling_decides_the_unit_of_a_plain_number() {
        let settle = |body: Value| {
            let p: PolicyPatch = serde_json::from_value(body).unwrap();
            let mut s = PolicySettings::default();
            p.apply(&mut s).unwrap();
            s.settle_ms
        };
        assert_eq!(settle(json!({"settle_ms": 10})), 10);
        assert_eq!(settle(json!({"settle_ms": "10"})), 10);
        assert_eq!(settle(json!({"settle_ms": "10s"})), 10_000);
        assert_eq!(settle(json!({"settle": 10})), 10_000);
        assert_eq!(settle(json!({"settle": "10"})), 10_000);
        assert_eq!(settle(json!({"settle": 1.5})), 1_500);
        assert_eq!(settle(json!({"settle": "500ms"})), 500);
        for v in [json!(1.5), json!("1.5"), json!("-3")] {
            let e = serde_json::from_value::<PolicyPatch>(json!({"settle_ms": v})).unwrap_err();
            assert!(e.to_string().contains("whole milliseconds"), "{v}: {e}");
        }
        // The command line follows the same rule, and takes a key once.
        let (_, s) = PolicySettings::parse_cli("settle_ms=10,cooldown=10").unwrap();
        assert_eq!((s.settle_ms, s.cooldown_ms), (10, 10_000));
        let e = PolicySettings::parse_cli("settle=5s,settle_ms=10").unwrap_err();
        assert!(
            e.contains("settle given twice (settle and settle_ms)"),
            "{e}"
        );
        let e = serde_json::from_value::<PolicyPatch>(json!({"settle": -1})).unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
        let floor = |body: Value| {
            let p: PolicyPatch = serde_json::from_value(body).unwrap();
            let mut s = PolicySettings::default();
            p.apply(&mut s).unwrap();
            s.floor_mib
        };
        assert_eq!(floor(json!({"floor_mib": 300})), 300);
        assert_eq!(floor(json!({"floor_mib": "300"})), 300);
        assert_eq!(floor(json!({"floor": 300})), 300);
        assert_eq!(floor(json!({"floor": "1G"})), 1024);
    }

    /// Both spellings of one key in one body are refused, naming both,
    /// instead of one of them winning by its place in the alphabet.
    #[test]
    fn both_spellings_of_one_key_are_refused() {
        for body in [
            json!({"settle": "5s", "settle_ms": 1000}),
            json!({"floor": "1G", "floor_mib": 512}),
        ] {
            let e = serde_json::from_value::<PolicyPatch>(body.clone()).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("two spellings of one key"), "{body}: {e}");
            let e = serde_json::from_value::<PolicyPut>(body.clone()).unwrap_err();
            assert!(e.to_string().contains("two spellings"), "{body}: {e}");
        }
    }

    /// A key given twice in one body is refused, naming it, instead of
    /// the last one winning (serde_json's maps keep the last).
    #[test]
    fn a_key_given_twice_is_refused() {
        for (body, key) in [
            (r#"{"floor":"256M","floor":"300M"}"#, "floor"),
            (r#"{"settle_ms":100,"settle_ms":200}"#, "settle_ms"),
            (r#"{"enabled":true,"enabled":false}"#, "enabled"),
        ] {
            let e = serde_json::from_str::<PolicyPatch>(body).unwrap_err();
            assert!(
                e.to_string().contains(&format!("'{key}' given twice")),
                "{body}: {e}"
            );
            let e = serde_json::from_str::<PolicyPut>(body).unwrap_err();
            assert!(
                e.to_string().contains(&format!("'{key}' given twice")),
                "{body}: {e}"
            );
        }
        let p: PolicyPatch = serde_json::from_str(r#"{"floor":"256M","settle_ms":100}"#).unwrap();
        assert_eq!(p.changes.len(), 2);
    }

    #[test]
    fn defaults_come_from_the_table() {
        let d = PolicySettings::default();
        assert_eq!(d.floor_mib, 256);
        assert_eq!(d.headroom_mib, 192);
        assert!((d.headroom_fraction - 0.08).abs() < 1e-9);
        assert_eq!(d.settle_ms, 10_000);
        assert_eq!(d.interval_ms, 1000);
        assert_eq!(d.psi_path, "/proc/pressure/memory");
        assert_eq!(d.stats_interval_s(), 1);
        d.check(2 << 30).unwrap();
    }

    #[test]
    fn cli_values() {
        let (on, s) = PolicySettings::parse_cli("on").unwrap();
        assert!(on);
        assert_eq!(s, PolicySettings::default());
        let (on, s) = PolicySettings::parse_cli(
            "floor=128M,headroom=1G,headroom_fraction=5%,settle=500ms,cooldown=2.5,interval=2s,psi_path=/tmp/p,host_psi_high=20",
        )
        .unwrap();
        assert!(on);
        assert_eq!((s.floor_mib, s.headroom_mib), (128, 1024));
        assert!((s.headroom_fraction - 0.05).abs() < 1e-9);
        assert_eq!(
            (s.settle_ms, s.cooldown_ms, s.interval_ms),
            (500, 2500, 2000)
        );
        assert_eq!(s.psi_path, "/tmp/p");
        assert_eq!(s.stats_interval_s(), 2);
        let (on, _) = PolicySettings::parse_cli("enabled=off,floor=1G").unwrap();
        assert!(!on);
    }

    #[test]
    fn errors_name_the_value() {
        let e = PolicySettings::parse_cli("frob=1").unwrap_err();
        assert!(
            e.contains("'frob'") && e.contains("headroom_fraction"),
            "{e}"
        );
        let e = PolicySettings::parse_cli("floor=-5").unwrap_err();
        assert!(
            e.contains("--balloon-policy floor=-5") && e.contains("negative"),
            "{e}"
        );
        let e = PolicySettings::parse_cli("headroom_fraction=1.5").unwrap_err();
        assert!(
            e.contains("headroom_fraction=1.5") && e.contains("0 to 1"),
            "{e}"
        );
        let e = PolicySettings::parse_cli("settle=-1s").unwrap_err();
        assert!(e.contains("settle=-1s") && e.contains("negative"), "{e}");
        let e = PolicySettings::parse_cli("floor").unwrap_err();
        assert!(e.contains("needs a value"), "{e}");
        let (_, s) = PolicySettings::parse_cli("floor=4G").unwrap();
        let e = s.check(2 << 30).unwrap_err();
        assert!(
            e.contains("floor=4096 MiB") && e.contains("2048 MiB"),
            "{e}"
        );
        let (_, s) = PolicySettings::parse_cli("interval=10ms").unwrap();
        assert!(s.check(2 << 30).unwrap_err().contains("interval=10 ms"));
    }

    #[test]
    fn json_takes_either_spelling_and_names_bad_values() {
        let p: PolicyPatch =
            serde_json::from_value(json!({"floor_mib": 300, "settle": "2s", "enabled": true}))
                .unwrap();
        let mut s = PolicySettings::default();
        p.apply(&mut s).unwrap();
        assert_eq!((s.floor_mib, s.settle_ms), (300, 2000));
        assert_eq!(p.enabled, Some(true));
        for (body, want) in [
            (json!({"floor_mib": -5}), "floor_mib=-5"),
            (json!({"headroom_fraction": 1.5}), "headroom_fraction=1.5"),
            (json!({"nope": 1}), "'nope'"),
            (json!({"enabled": "yes"}), "enabled=yes"),
        ] {
            let e = serde_json::from_value::<PolicyPatch>(body).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        let put: PolicyPut = serde_json::from_value(json!({"headroom_mib": 100})).unwrap();
        assert!(put.enabled);
        assert_eq!(put.settings.headroom_mib, 100);
        assert_eq!(put.settings.floor_mib, 256);
        // Round trip of the status body.
        let st = PolicyStatus {
            enabled: true,
            paused: false,
            paused_reason: None,
            config: PolicySettings::default(),
            last_decision: None,
            decisions: 0,
            target_changes: 0,
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["config"]["floor_mib"], 256);
        assert_eq!(serde_json::from_value::<PolicyStatus>(v).unwrap(), st);
    }

    #[test]
    fn every_key_parses_its_default_and_json_name() {
        for key in KEYS {
            let mut s = PolicySettings::default();
            s.set_str(key.name, key.default).unwrap();
            s.set_str(key.json, key.default).unwrap();
            assert!(keys_help().contains(key.name));
        }
    }
}
