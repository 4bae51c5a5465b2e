//! Request and response bodies of the REST API.
//!
//! Request types (`*Patch`, `*Request`) reject unknown fields and are range
//! checked by [`Validate`] in the api crate before they reach the VMM, so the
//! VMM only has to check what depends on VM state (e.g. a balloon target above
//! guest RAM). Response types are filled in by the VMM and serialised as-is.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Guest page size the balloon counts in (virtio-balloon always uses 4 KiB pages).
pub use devices::PAGE_SIZE;
/// 4 KiB pages per MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// Largest balloon target accepted from a client (16 TiB), so that
/// `target_mib * PAGES_PER_MIB` and byte counts can never overflow.
pub const MAX_BALLOON_MIB: u64 = 16 << 20;
/// Largest statistics polling interval accepted (one day).
pub const MAX_STATS_INTERVAL_S: u32 = 86_400;
/// Migration downtime bounds accepted from a client.
pub const MIN_DOWNTIME_MS: u64 = 1;
pub const MAX_DOWNTIME_MS: u64 = 60_000;
/// Default allowed downtime of a live migration.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Largest `max_rounds` accepted for a migration.
pub const MAX_MIGRATION_ROUNDS: u32 = 1_000;
/// Default time the source waits for the destination's acknowledgement
/// (the destination verifies the whole stream and builds the VM first).
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 30_000;
/// Default time a destination may stop reading before the migration fails.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Default delay before a migrated source exits.
pub const DEFAULT_SOURCE_EXIT_DELAY_MS: u64 = 2_000;
/// Bounds of the migration timeouts accepted from a client.
pub const MIN_MIGRATION_TIMEOUT_MS: u64 = 100;
pub const MAX_MIGRATION_TIMEOUT_MS: u64 = 3_600_000;

/// MiB → 4 KiB pages (saturating; inputs are validated to be far below overflow).
pub fn mib_to_pages(mib: u64) -> u64 {
    mib.saturating_mul(PAGES_PER_MIB)
}

/// 4 KiB pages → MiB, rounded down.
pub fn pages_to_mib(pages: u64) -> u64 {
    pages / PAGES_PER_MIB
}

/// Range checks that need no VM state; run by the server before a request
/// is handed to the VMM. The error text becomes a 400's `error` field.
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

// ---------------------------------------------------------------- VM

/// Run state of the VM as seen and requested through the API.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    Running,
    Paused,
    /// A migration completed: the VM runs at its destination now. Terminal:
    /// this blimp serves only GET requests (and `PUT /vm/shutdown`) until it
    /// exits. Reported by `GET /vm`, never accepted by `PATCH /vm`.
    Migrated,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Migrated => "Migrated",
        })
    }
}

/// `GET /vm`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VmInfo {
    pub state: VmState,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub uptime_s: u64,
    /// Whether the VM has a balloon device.
    pub balloon: bool,
}

/// `PATCH /vm`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStatePatch {
    #[serde(deserialize_with = "requested_state")]
    pub state: VmState,
}

/// `PATCH /vm`'s `state`: an unknown one is refused naming only the two it
/// takes (`VmState`'s own error offered `Migrated` as well).
fn requested_state<'de, D: serde::Deserializer<'de>>(d: D) -> Result<VmState, D::Error> {
    use serde::de::Error;
    let s = String::deserialize(d)?;
    match s.as_str() {
        "Running" => Ok(VmState::Running),
        "Paused" => Ok(VmState::Paused),
        "Migrated" => Err(D::Error::custom(MIGRATED_NOT_REQUESTED)),
        other => Err(D::Error::unknown_variant(other, &["Running", "Paused"])),
    }
}

const MIGRATED_NOT_REQUESTED: &str =
    "state Migrated cannot be requested (a completed migration sets it): use Running or Paused";

impl Validate for VmStatePatch {
    fn validate(&self) -> Result<(), String> {
        match self.state {
            VmState::Running | VmState::Paused => Ok(()),
            VmState::Migrated => Err(MIGRATED_NOT_REQUESTED.into()),
        }
    }
}

// ---------------------------------------------------------------- balloon

/// `GET /balloon`: the device's configuration and its current size.
///
/// `target_*` is the balloon's requested SIZE (memory taken from the guest),
/// `actual_*` the size the guest has acknowledged so far.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct BalloonInfo {
    pub deflate_on_oom: bool,
    pub must_tell_host: bool,
    /// 0 = statistics polling off.
    pub stats_polling_interval_s: u32,
    pub free_page_hint: bool,
    pub free_page_reporting: bool,
    pub page_poison: bool,
    pub target_mib: u64,
    pub actual_mib: u64,
    pub target_pages: u64,
    pub actual_pages: u64,
    /// Firecracker's name for `target_mib` (the same value).
    pub amount_mib: u64,
    /// Firecracker's name for `free_page_hint` (the same value).
    pub free_page_hinting: bool,
    /// The guest's driver has set DRIVER_OK (and not reset the device
    /// since): until then the guest follows no target. Absent from older
    /// servers, read as `false`.
    #[serde(default)]
    pub driver_ok: bool,
}

/// `PATCH /balloon`: resize the balloon (its size, i.e. memory taken from the
/// guest). Firecracker's body `{"amount_mib": N}` is accepted as the same
/// request: the convention is the same (the balloon's size, not the guest's).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(try_from = "BalloonPatchBody")]
pub struct BalloonPatch {
    /// MiB. On the wire `target_mib` is a JSON integer or a size string
    /// (`"1.5G"`, `"512MB"`) read by the CLI's parser
    /// ([`crate::size::parse`]); Firecracker's `amount_mib` is an integer.
    pub target_mib: u64,
}

/// The wire form of [`BalloonPatch`]: one of the two names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonPatchBody {
    #[serde(default, deserialize_with = "present_size")]
    target_mib: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    amount_mib: Option<u64>,
}

/// `target_mib`, when given: a number of MiB or a size string. The error
/// names the field (serde_json's message gives only the line and column).
fn present_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    crate::size::mib_of_json(&v)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("target_mib: {e}")))
}

/// A field that, when given, must be a number (`null` is a type error).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(d).map(Some)
}

impl TryFrom<BalloonPatchBody> for BalloonPatch {
    type Error = String;
    fn try_from(b: BalloonPatchBody) -> Result<Self, String> {
        match (b.target_mib, b.amount_mib) {
            (Some(mib), None) | (None, Some(mib)) => {
                // The range error names the field the client sent.
                let name = if b.target_mib.is_some() {
                    "target_mib"
                } else {
                    "amount_mib"
                };
                let p = BalloonPatch { target_mib: mib };
                p.validate()
                    .map_err(|e| e.replacen("target_mib", name, 1))?;
                Ok(p)
            }
            (Some(_), Some(_)) => {
                Err("give target_mib or amount_mib (Firecracker's name for it), not both".into())
            }
            (None, None) => {
                Err("missing field `target_mib` (or Firecracker's `amount_mib`)".into())
            }
        }
    }
}

/// `PUT /balloon`, Firecracker's "create or update the balloon device"
/// (its `Balloon` schema). Firecracker takes it only before boot; a Blimp VM
/// boots at `blimp run`, where `--balloon` configures the device, so Blimp
/// accepts it only as a restatement of that device (every field equal to the
/// running device's, absent fields at Firecracker's defaults) and then sets
/// `amount_mib` as the target; anything else is a 400 naming the field.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonPut {
    pub amount_mib: u64,
    pub deflate_on_oom: bool,
    /// Absent: 0 (statistics off), as in Firecracker.
    #[serde(default)]
    pub stats_polling_interval_s: u32,
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl Validate for BalloonPut {
    fn validate(&self) -> Result<(), String> {
        BalloonPatch {
            target_mib: self.amount_mib,
        }
        .validate()
        .map_err(|e| e.replace("target_mib", "amount_mib"))?;
        StatsPatch {
            stats_polling_interval_s: self.stats_polling_interval_s,
        }
        .validate()
    }
}

/// `PATCH /balloon/hinting/start` (Firecracker's `BalloonStartCmd`; the
/// body may be empty).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HintingStartCmd {
    /// Answer the guest's STOP with DONE without waiting for the host
    /// (default true, as in Firecracker).
    #[serde(default = "default_true")]
    pub acknowledge_on_stop: bool,
}

impl Default for HintingStartCmd {
    fn default() -> Self {
        HintingStartCmd {
            acknowledge_on_stop: true,
        }
    }
}

impl Validate for HintingStartCmd {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Validate for BalloonPatch {
    fn validate(&self) -> Result<(), String> {
        if self.target_mib > MAX_BALLOON_MIB {
            return Err(format!(
                "target_mib {} is out of range (at most {MAX_BALLOON_MIB})",
                self.target_mib
            ));
        }
        Ok(())
    }
}

impl BalloonPatch {
    pub fn target_pages(&self) -> u64 {
        mib_to_pages(self.target_mib)
    }
}

/// The balloon floor when none is configured: 64 MiB, but at most a
/// quarter of guest memory (a 128 MiB guest can still give 96 MiB).
pub const DEFAULT_BALLOON_FLOOR_MIB: u64 = 64;

/// The memory a balloon target must leave the guest, in bytes: the
/// configured floor (`--balloon floor=SIZE`), or
/// [`DEFAULT_BALLOON_FLOOR_MIB`] capped at a quarter of guest memory
/// (rounded down to 4 KiB pages).
pub fn balloon_floor_bytes(guest_bytes: u64, configured: Option<u64>) -> u64 {
    configured.unwrap_or_else(|| {
        (DEFAULT_BALLOON_FLOOR_MIB << 20).min(guest_bytes / 4 / PAGE_SIZE * PAGE_SIZE)
    })
}

/// Refuse a balloon target (bytes) that would leave the guest less than
/// `floor_bytes` of its `guest_bytes`; the message names the target, what
/// it would leave, the floor and the guest's size.
pub fn check_balloon_floor(
    target_bytes: u64,
    guest_bytes: u64,
    floor_bytes: u64,
) -> Result<(), String> {
    let left = guest_bytes.saturating_sub(target_bytes);
    if target_bytes > 0 && left < floor_bytes {
        return Err(format!(
            "a balloon of {} would leave the guest {} of its {}, below the balloon floor of {} (at most {}; the floor is set with --balloon floor=SIZE)",
            crate::size::format_bytes_or_zero(target_bytes),
            crate::size::format_bytes_or_zero(left),
            crate::size::format_bytes_or_zero(guest_bytes),
            crate::size::format_bytes_or_zero(floor_bytes),
            crate::size::format_bytes_or_zero(guest_bytes.saturating_sub(floor_bytes)),
        ));
    }
    Ok(())
}

/// The guest's memory statistics: the balloon device's own type.
pub use devices::virtio::balloon::GuestStats;

/// `GET /balloon/statistics`. Field names follow Firecracker; guest-reported
/// values are omitted until the guest has reported them. Memory values are in
/// bytes, as the virtio-balloon statistics are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct BalloonStats {
    pub target_pages: u64,
    pub actual_pages: u64,
    pub target_mib: u64,
    pub actual_mib: u64,
    /// The guest's last report, flattened: one field per name in
    /// `STAT_NAMES` for the values it sent, then `last_update` (Unix
    /// seconds); absent if it never reported.
    #[serde(flatten)]
    pub guest: Option<GuestStats>,
    /// Free page hinting rounds started by the host.
    #[serde(default)]
    pub hint_rounds: u64,
    /// Pages the guest hinted as free (all rounds).
    #[serde(default)]
    pub hinted_pages: u64,
    /// Pages the guest reported through free page reporting.
    #[serde(default)]
    pub reported_pages: u64,
    /// Bytes the host discarded (madvise) because of hints or reports.
    #[serde(default)]
    pub discarded_bytes: u64,
}

/// `PATCH /balloon/statistics`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StatsPatch {
    /// Seconds between statistics requests to the guest; 0 turns polling off.
    pub stats_polling_interval_s: u32,
}

impl Validate for StatsPatch {
    fn validate(&self) -> Result<(), String> {
        in_range(
            "stats_polling_interval_s",
            self.stats_polling_interval_s,
            0..=MAX_STATS_INTERVAL_S,
        )
    }
}

// ---------------------------------------------------------------- free page hinting

/// Where a free page hinting round stands: the balloon device's own type.
pub use devices::virtio::balloon::HintingState;

/// `PUT /balloon/hinting/start` response.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintingStarted {
    pub cmd_id: u32,
}

/// `GET /balloon/hinting/status`: the balloon device's own type.
pub use devices::virtio::balloon::HintingStatus;

/// `GET /balloon/hinting/status`: [`HintingStatus`] with Firecracker's
/// names (its `BalloonHintingStatus`) next to Blimp's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HintingStatusReply {
    #[serde(flatten)]
    pub status: HintingStatus,
    /// Firecracker's name for `host_cmd_id` (the same value).
    pub host_cmd: u32,
    /// Firecracker's name for `guest_cmd_id` (the same value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

impl From<HintingStatus> for HintingStatusReply {
    fn from(status: HintingStatus) -> Self {
        HintingStatusReply {
            host_cmd: status.host_cmd_id,
            guest_cmd: status.guest_cmd_id,
            status,
        }
    }
}

/// Body of requests that take no parameters (`{}` or an empty body).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

// ---------------------------------------------------------------- migration & snapshot

/// Where a migration stream goes, parsed from a URL:
/// `file:///abs/path`, `unix:///abs/path` or `tcp://IP:PORT` (`localhost` is
/// accepted as 127.0.0.1; bracket IPv6 literals: `tcp://[::1]:4000`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationDestination {
    File(PathBuf),
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl MigrationDestination {
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.contains('\0') {
            return Err("destination contains a NUL byte".into());
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("destination {url:?} is not a URL (expected file:///path, unix:///path or tcp://IP:PORT)")
        })?;
        match scheme {
            "file" | "unix" => {
                if !rest.starts_with('/') || rest.len() < 2 {
                    return Err(format!(
                        "destination {url:?} needs an absolute path, e.g. {scheme}:///tmp/vm.mig"
                    ));
                }
                let path = PathBuf::from(rest);
                Ok(if scheme == "file" {
                    MigrationDestination::File(path)
                } else {
                    MigrationDestination::Unix(path)
                })
            }
            "tcp" => {
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                let addr = if let Some(port) = rest.strip_prefix("localhost:") {
                    port.parse::<u16>()
                        .ok()
                        .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
                } else {
                    rest.parse::<SocketAddr>().ok()
                };
                match addr {
                    Some(a) if a.port() != 0 => Ok(MigrationDestination::Tcp(a)),
                    _ => Err(format!(
                        "destination {url:?} needs an IP address and a port 1-65535, e.g. tcp://127.0.0.1:4000"
                    )),
                }
            }
            other => Err(format!(
                "destination scheme {other:?} is not supported (use file, unix or tcp)"
            )),
        }
    }
}

impl fmt::Display for MigrationDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationDestination::File(p) => write!(f, "file://{}", p.display()),
            MigrationDestination::Unix(p) => write!(f, "unix://{}", p.display()),
            MigrationDestination::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl TryFrom<String> for MigrationDestination {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        MigrationDestination::parse(&s)
    }
}

impl From<MigrationDestination> for String {
    fn from(d: MigrationDestination) -> String {
        d.to_string()
    }
}

impl Serialize for MigrationDestination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MigrationDestination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MigrationDestination::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_true() -> bool {
    true
}

fn default_ack_timeout_ms() -> u64 {
    DEFAULT_ACK_TIMEOUT_MS
}

fn default_write_timeout_ms() -> u64 {
    DEFAULT_WRITE_TIMEOUT_MS
}

fn default_source_exit_delay_ms() -> u64 {
    DEFAULT_SOURCE_EXIT_DELAY_MS
}

/// `PUT /migration`: start a live migration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub destination: MigrationDestination,
    /// Allowed stop-and-copy downtime (default 300 ms).
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Use free page hinting to skip free guest pages (default true).
    #[serde(default = "default_true")]
    pub free_page_hints: bool,
    /// Most pre-copy rounds before stop-and-copy (absent: VMM default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// How long the paused source waits for the destination's
    /// acknowledgement after the last byte (unix/tcp); without it in time
    /// the guest resumes here (default 30 000 ms).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// How long the destination may stop reading before the migration
    /// fails and the guest resumes here (default 10 000 ms).
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Whether this blimp exits once the migration completed (default true);
    /// false keeps it, in the terminal Migrated state, until
    /// `PUT /vm/shutdown` or a signal.
    #[serde(default = "default_true")]
    pub source_exits: bool,
    /// Delay between completion and exit, so pollers see `Completed`
    /// (default 2000 ms).
    #[serde(default = "default_source_exit_delay_ms")]
    pub source_exit_delay_ms: u64,
}

impl MigrationRequest {
    /// A request with every option at its default.
    pub fn new(destination: MigrationDestination) -> Self {
        Self {
            destination,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            free_page_hints: true,
            max_rounds: None,
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            write_timeout_ms: DEFAULT_WRITE_TIMEOUT_MS,
            source_exits: true,
            source_exit_delay_ms: DEFAULT_SOURCE_EXIT_DELAY_MS,
        }
    }
}

impl Validate for MigrationRequest {
    fn validate(&self) -> Result<(), String> {
        in_range(
            "downtime_ms",
            self.downtime_ms,
            MIN_DOWNTIME_MS..=MAX_DOWNTIME_MS,
        )?;
        if let Some(r) = self.max_rounds {
            in_range("max_rounds", r, 1..=MAX_MIGRATION_ROUNDS)?;
        }
        for (name, v) in [
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
        ] {
            in_range(name, v, MIN_MIGRATION_TIMEOUT_MS..=MAX_MIGRATION_TIMEOUT_MS)?;
        }
        in_range(
            "source_exit_delay_ms",
            self.source_exit_delay_ms,
            0..=MAX_MIGRATION_TIMEOUT_MS,
        )
    }
}

/// `name` = `v` lies in `range`, or the error that says it does not.
fn in_range<T: PartialOrd + fmt::Display>(
    name: &str,
    v: T,
    range: RangeInclusive<T>,
) -> Result<(), String> {
    if !range.contains(&v) {
        let (lo, hi) = range.into_inner();
        return Err(format!("{name} {v} is out of range ({lo} to {hi})"));
    }
    Ok(())
}

/// Phase of the current (or last) migration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationState {
    /// No migration was ever started.
    Idle,
    /// Connecting / sending the VM description.
    Setup,
    /// Pre-copy rounds while the guest runs.
    Active,
    /// Guest paused, sending the last dirty pages and device state.
    Completing,
    /// Guest paused, everything sent: waiting for the destination to verify
    /// the stream, build the VM and acknowledge (unix/tcp only).
    Switchover,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationState {
    /// Completed, Failed or Cancelled.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

/// `GET /migration`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MigrationStatus {
    pub state: MigrationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Current pre-copy round (1-based; 0 before the first).
    pub round: u32,
    /// Guest pages in total.
    pub total_pages: u64,
    /// Pages still dirty / not yet sent in this round.
    pub remaining_pages: u64,
    pub pages_sent: u64,
    pub pages_hinted: u64,
    pub pages_zero: u64,
    pub bytes_sent: u64,
    /// Bytes written to the destination so far (records, page data, state),
    /// updated as they are written, also in the middle of a round.
    #[serde(default)]
    pub stream_bytes: u64,
    pub elapsed_ms: u64,
    /// Measured downtime, once the migration completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Why the migration failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MigrationStatus {
    pub fn idle() -> Self {
        MigrationStatus {
            state: MigrationState::Idle,
            destination: None,
            round: 0,
            total_pages: 0,
            remaining_pages: 0,
            pages_sent: 0,
            pages_hinted: 0,
            pages_zero: 0,
            bytes_sent: 0,
            stream_bytes: 0,
            elapsed_ms: 0,
            downtime_ms: None,
            error: None,
        }
    }
}

/// `PUT /migration` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MigrationStarted {
    pub destination: String,
}

/// `PUT /snapshot`: write a snapshot of the (paused or running) VM to `path`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub path: PathBuf,
}

impl Validate for SnapshotRequest {
    fn validate(&self) -> Result<(), String> {
        let s = self.path.as_os_str();
        if s.is_empty() {
            return Err("path must not be empty".into());
        }
        if !self.path.is_absolute() {
            return Err(format!(
                "path {:?} must be absolute (the VMM's working directory is not the client's)",
                self.path
            ));
        }
        if s.as_encoded_bytes().contains(&0) {
            return Err("path contains a NUL byte".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- metrics & errors

/// The VMM's answer to `GetMetrics`: counters and gauges by Prometheus metric
/// name (e.g. `blimp_balloon_inflated_pages_total`). Names with characters
/// outside `[a-zA-Z0-9_:]` are sanitised when rendered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct VmmMetrics {
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    #[serde(default)]
    pub gauges: BTreeMap<String, f64>,
    /// The `# HELP` text of each counter or gauge, by the same name.
    #[serde(default)]
    pub help: BTreeMap<String, String>,
}

/// Body of every error response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_and_roundtrip() {
        for (url, want) in [
            (
                "file:///tmp/a.mig",
                MigrationDestination::File("/tmp/a.mig".into()),
            ),
            (
                "unix:///run/m.sock",
                MigrationDestination::Unix("/run/m.sock".into()),
            ),
            (
                "tcp://127.0.0.1:4000",
                MigrationDestination::Tcp("127.0.0.1:4000".parse().unwrap()),
            ),
            (
                "tcp://localhost:4000",
                MigrationDestination::Tcp("127.0.0.1:4000".parse().unwrap()),
            ),
            (
                "tcp://[::1]:4000",
                MigrationDestination::Tcp("[::1]:4000".parse().unwrap()),
            ),
        ] {
            let d = MigrationDestination::parse(url).unwrap();
            assert_eq!(d, want, "{url}");
            let again = MigrationDestination::parse(&d.to_string()).unwrap();
            assert_eq!(again, want);
        }
        for bad in [
            "",
            "/tmp/x",
            "file://relative",
            "file://",
            "http://x",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:70000",
            "tcp://example.com:80",
            "file:///a\0b",
        ] {
            assert!(MigrationDestination::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn migration_request_defaults() {
        let r: MigrationRequest =
            serde_json::from_str(r#"{"destination":"file:///tmp/m"}"#).unwrap();
        assert_eq!(r.downtime_ms, 300);
        assert!(r.free_page_hints);
        assert_eq!(r.max_rounds, None);
        assert!(r.validate().is_ok());
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["destination"], "file:///tmp/m");
    }

    #[test]
    fn validation_ranges() {
        assert!(
            BalloonPatch {
                target_mib: MAX_BALLOON_MIB
            }
            .validate()
            .is_ok()
        );
        assert!(
            BalloonPatch {
                target_mib: MAX_BALLOON_MIB + 1
            }
            .validate()
            .is_err()
        );
        assert!(
            StatsPatch {
                stats_polling_interval_s: 0
            }
            .validate()
            .is_ok()
        );
        assert!(
            StatsPatch {
                stats_polling_interval_s: 86_401
            }
            .validate()
            .is_err()
        );
        assert!(SnapshotRequest { path: "rel".into() }.validate().is_err());
        assert!(SnapshotRequest { path: "".into() }.validate().is_err());
        assert!(
            SnapshotRequest {
                path: "/tmp/s".into()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn stats_omit_unreported_fields() {
        let none = serde_json::to_value(BalloonStats::default()).unwrap();
        assert!(none.get("free_memory").is_none());
        assert!(none.get("last_update").is_none());
        let mut values = [None; devices::virtio::balloon::stats::NUM_STAT_TAGS];
        values[4] = Some(5);
        let s = BalloonStats {
            target_pages: 1,
            guest: Some(GuestStats {
                values,
                updated: std::time::UNIX_EPOCH + std::time::Duration::from_secs(7),
            }),
            ..Default::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        // Flattened between the sizes and the counters, by name.
        assert_eq!(
            text,
            r#"{"target_pages":1,"actual_pages":0,"target_mib":0,"actual_mib":0,"free_memory":5,"last_update":7,"hint_rounds":0,"hinted_pages":0,"reported_pages":0,"discarded_bytes":0}"#
        );
        let back: BalloonStats = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let back: BalloonStats = serde_json::from_value(none).unwrap();
        assert_eq!(back, BalloonStats::default());
    }

    /// `PATCH /balloon {"target_mib": 512.0}` said "too large"; a whole
    /// float is refused as not an integer, naming the field and the value.
    #[test]
    fn target_mib_errors_name_the_field_and_the_value() {
        let e = |j: &str| {
            serde_json::from_str::<BalloonPatch>(j)
                .unwrap_err()
                .to_string()
        };
        for (j, want) in [
            (
                r#"{"target_mib": 512.0}"#,
                "target_mib: invalid size \"512.0\": a JSON number of MiB must be an integer",
            ),
            (
                r#"{"target_mib": 1e3}"#,
                "target_mib: invalid size \"1000.0\": a JSON number of MiB must be an integer",
            ),
            (
                r#"{"target_mib": 1.5}"#,
                "target_mib: invalid size \"1.5\": not a whole number of MiB",
            ),
            (
                r#"{"target_mib": 1e30}"#,
                "target_mib: invalid size \"1e+30\": too large",
            ),
            (
                r#"{"target_mib": -1}"#,
                "target_mib: invalid size \"-1\": a size cannot be negative",
            ),
        ] {
            let got = e(j);
            assert!(got.starts_with(want), "{j}: {got}");
        }
        let p: BalloonPatch = serde_json::from_str(r#"{"target_mib": 512}"#).unwrap();
        assert_eq!(p.target_mib, 512);
    }

    #[test]
    fn firecracker_bodies() {
        let p: BalloonPatch = serde_json::from_str(r#"{"amount_mib": 64}"#).unwrap();
        assert_eq!(p.target_mib, 64);
        let both = serde_json::from_str::<BalloonPatch>(r#"{"amount_mib": 1, "target_mib": 1}"#);
        assert!(both.unwrap_err().to_string().contains("not both"));
        let none = serde_json::from_str::<BalloonPatch>("{}");
        assert!(none.unwrap_err().to_string().contains("missing field"));
        let null = serde_json::from_str::<BalloonPatch>(r#"{"amount_mib": null}"#);
        assert!(null.unwrap_err().to_string().contains("invalid type"));
        let other = serde_json::from_str::<BalloonPatch>(r#"{"size_mib": 1}"#);
        assert!(other.unwrap_err().to_string().contains("unknown field"));
        let put: BalloonPut =
            serde_json::from_str(r#"{"amount_mib": 0, "deflate_on_oom": true}"#).unwrap();
        assert_eq!(put.stats_polling_interval_s, 0);
        assert!(!put.free_page_hinting && !put.free_page_reporting);
        assert!(serde_json::from_str::<BalloonPut>(r#"{"amount_mib": 0}"#).is_err());
        let big = BalloonPut {
            amount_mib: MAX_BALLOON_MIB + 1,
            ..put
        };
        assert!(big.validate().unwrap_err().contains("amount_mib"));
        // PATCH names the field sent, whichever of the two.
        for name in ["amount_mib", "target_mib"] {
            let body = format!(r#"{{"{name}": {}}}"#, MAX_BALLOON_MIB + 1);
            let e = serde_json::from_str::<BalloonPatch>(&body)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("{name} ")) && e.contains("out of range"),
                "{e}"
            );
        }
        let h: HintingStartCmd = serde_json::from_str("{}").unwrap();
        assert!(h.acknowledge_on_stop);
        assert!(
            serde_json::from_str::<HintingStartCmd>(r#"{"acknowledge_on_stop": "yes"}"#).is_err()
        );
    }

    #[test]
    fn pages_mib() {
        assert_eq!(mib_to_pages(1), 256);
        assert_eq!(pages_to_mib(511), 1);
        assert_eq!(mib_to_pages(MAX_BALLOON_MIB), MAX_BALLOON_MIB * 256);
    }
}
