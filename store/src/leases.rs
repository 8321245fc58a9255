//! Leases: which process does a piece of work (a consumer of the log, the timer
//! scheduler) while several share one database. Written once over the dialects, in the
//! `leases` table of the store's own database.
//!
//! A lease is a row per name: its holder (`holder_of_this_process`: host, the boot and
//! pid namespace, pid and a random part, so an operator can tell which process), a fencing epoch, and an expiry
//! computed by the database's clock (PostgreSQL's `clock_timestamp()`, SQLite's
//! `julianday('now')`), so the servers' clocks never matter.
//!
//! - **Take** (`Tables::try_lease`): one statement inserts the row, or takes over a row
//!   whose expiry has passed with the epoch one higher; a row still live is refused,
//!   unless its holder is a process of this host that is gone (killed, or exited without
//!   releasing it): then it is taken over at once, by (holder, epoch), so a server
//!   restarted after `kill -9` does not wait out its predecessor's lease.
//! - **Renew**: by holder and epoch, also after the expiry as long as nobody took it.
//! - **Release**: by holder and epoch, expires the row at once, so another takes it at
//!   once; the row stays, so every later epoch is still higher than every earlier one.
//! - **Fence** (`TablesTx::fence`): inside a transaction, whether the lease is still
//!   (name, holder, epoch) and unexpired, holding the row until the transaction ends
//!   (`FOR SHARE` on PostgreSQL, so a take-over waits for that commit; SQLite's write
//!   transaction excludes every other writer). A transaction that moves a consumer's
//!   checkpoint fences itself so, and rolls back otherwise: whatever a holder that
//!   stalled past its lease does when it wakes is refused.
//!
//! Invariants: at most one holder's fence passes at any time for one name; epochs of one
//! name only grow; a take-over happens only once the expiry by the database's clock has
//! passed (or the holder released it).

use std::sync::OnceLock;
use std::time::Duration;

/// A lease this process took: its name, its holder and the epoch it was taken at. Only
/// this (name, holder, epoch) renews, releases or fences it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// Grows at each take-over of the name: a holder that lost the lease keeps an epoch
    /// lower than the row's, and is refused by every fence.
    pub epoch: u64,
}

/// A lease's row as the database has it now, for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub name: String,
    pub holder: String,
    pub epoch: u64,
    /// When it expires (or expired), microseconds since the epoch, by the database's clock.
    pub expires_micros: i64,
    /// When its holder took it (this epoch began), by the database's clock.
    pub taken_micros: i64,
    /// The database's clock when the row was read.
    pub now_micros: i64,
}

impl LeaseState {
    /// Whether its expiry has passed (by the database's clock when read).
    pub fn expired(&self) -> bool {
        self.expires_micros <= self.now_micros
    }
}

/// The holder id of this process: `host:scope:pid:random`, the same for every lease it
/// takes. The scope is the machine's boot and the process's pid namespace (`unknown`
/// where they cannot be read), so two containers that share a host name but not a pid
/// namespace never take each other for gone.
pub fn holder_of_this_process() -> &'static str {
    static HOLDER: OnceLock<String> = OnceLock::new();
    HOLDER.get_or_init(|| {
        let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|file| std::fs::read_to_string(file).ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|host| host.trim().to_owned())
            .filter(|host| !host.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}:{}:{}:{}", scope(), std::process::id(), &random[..8])
    })
}

/// Where this process's pids mean something: the machine's boot (the first part of its
/// boot id) and the pid namespace's inode; `unknown` when either cannot be read.
fn scope() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|id| id.trim().split('-').next().map(str::to_owned))
        .filter(|boot| !boot.is_empty() && boot.chars().all(|c| c.is_ascii_hexdigit()));
    let namespace = std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| {
            let link = link.to_string_lossy().into_owned();
            let inode = link.strip_prefix("pid:[")?.strip_suffix(']')?.to_owned();
            inode.chars().all(|c| c.is_ascii_digit()).then_some(inode)
        });
    match (boot, namespace) {
        (Some(boot), Some(namespace)) => format!("{boot}-{namespace}"),
        _ => UNKNOWN_SCOPE.to_owned(),
    }
}

const UNKNOWN_SCOPE: &str = "unknown";

/// Whether `holder` names a process of this host that is no longer running (a
/// `holder_of_this_process` of another process, whose pid is gone or a zombie). `false`
/// whenever that cannot be told (another host, another system than Linux, a pid reused):
/// then its lease is waited out.
pub(crate) fn is_gone(holder: &str) -> bool {
    let mine = holder_of_this_process();
    let (Some((host, pid)), Some((my_host, my_pid))) = (host_and_pid(holder), host_and_pid(mine))
    else {
        return false;
    };
    // `host` is the host and the scope: the same machine's boot and pid namespace.
    if host != my_host
        || pid == my_pid
        || my_host.ends_with(&format!(":{UNKNOWN_SCOPE}"))
        || !cfg!(target_os = "linux")
    {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis: Z(ombie) or X (dead).
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

/// The `host:scope` and the pid of a holder id.
fn host_and_pid(holder: &str) -> Option<(&str, u32)> {
    let mut parts = holder.rsplitn(3, ':');
    let _random = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    Some((parts.next()?, pid))
}

/// Takes `$1` from holder `$2` at epoch `$3` (a process found gone) for holder `$4`, for
/// `$5` microseconds; returns the new epoch (no row: someone else took it first).
pub(crate) fn take_from_gone_sql(now: &str) -> String {
    format!(
        "UPDATE leases SET holder = $4, epoch = epoch + 1, expires_micros = {now} + $5, \
                           taken_micros = {now} \
          WHERE name = $1 AND holder = $2 AND epoch = $3 \
         RETURNING epoch"
    )
}

/// A lease's life in microseconds, as the statements add it to the database's clock.
pub(crate) fn micros(life: Duration) -> i64 {
    i64::try_from(life.as_micros()).unwrap_or(i64::MAX / 4)
}

/// Takes `$1` for holder `$2` for `$3` microseconds: a new row at epoch 1, or a row whose
/// expiry has passed taken over at its epoch + 1; returns the epoch (no row: refused).
pub(crate) fn take_sql(now: &str) -> String {
    format!(
        "INSERT INTO leases (name, holder, epoch, expires_micros, taken_micros) \
         VALUES ($1, $2, 1, {now} + $3, {now}) \
         ON CONFLICT (name) DO UPDATE \
            SET holder = excluded.holder, epoch = leases.epoch + 1, \
                expires_micros = excluded.expires_micros, \
                taken_micros = excluded.taken_micros \
          WHERE leases.expires_micros <= excluded.taken_micros \
         RETURNING epoch"
    )
}

/// Renews `$1` held by `$2` at epoch `$3` for `$4` microseconds from now.
pub(crate) fn renew_sql(now: &str) -> String {
    format!(
        "UPDATE leases SET expires_micros = {now} + $4 \
          WHERE name = $1 AND holder = $2 AND epoch = $3"
    )
}

/// Expires `$1` held by `$2` at epoch `$3` now.
pub(crate) fn release_sql(now: &str) -> String {
    format!(
        "UPDATE leases SET expires_micros = {now} \
          WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_micros > {now}"
    )
}

/// Whether `$1` is still held by `$2` at epoch `$3` and unexpired, holding its row.
pub(crate) fn fence_sql(now: &str, share_lock: &str) -> String {
    format!(
        "SELECT epoch FROM leases \
          WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_micros > {now}{share_lock}"
    )
}

/// The row of the lease `$1`, and the database's clock, as text.
pub(crate) fn state_sql(now: &str) -> String {
    format!(
        "SELECT name, holder, CAST(epoch AS TEXT), CAST(expires_micros AS TEXT), \
                CAST(taken_micros AS TEXT), CAST({now} AS TEXT) \
           FROM leases WHERE name = $1"
    )
}
