//! The memory budget: every allocation that grows with the spec, the batch or the data (a
//! program's arena, the interpreter's values, data sets read or generated) is estimated and
//! checked here before it is made, so that too big is a message, never an abort.
//!
//! The default budget is the smallest of what the process may really use, each less a margin
//! (a tenth, at least 1 GiB of physical memory): the machine's physical memory, a container's
//! memory limit (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), and the address-space and
//! data-size limits (`ulimit -v`, `ulimit -d`) less what the process already maps. A message
//! says which of them set it. `--memory-limit` sets the budget instead.

use std::sync::atomic::{AtomicU64, Ordering};

/// The budget in bytes; 0 until set (then [`default_budget`] applies).
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// The machine's physical memory in bytes (`MemTotal` of `/proc/meminfo`), if known.
pub fn physical() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The default budget and what set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    /// E.g. "this machine's memory less a margin".
    pub source: &'static str,
}

/// The budget when none is set: the smallest of the limits in the module docs, each less a
/// margin; 8 GiB when the machine says nothing.
pub fn default_budget() -> Budget {
    let less_a_tenth = |b: u64| b - b / 10;
    let mut candidates = Vec::new();
    if let Some(total) = physical() {
        candidates.push(Budget {
            bytes: total.saturating_sub((total / 10).max(1 << 30)).max(1 << 28),
            source: "this machine's memory less a margin",
        });
    }
    if let Some(max) = cgroup_limit() {
        candidates.push(Budget {
            bytes: less_a_tenth(max),
            source: "this container's memory limit (cgroup) less a margin",
        });
    }
    let mapped = self_status_kib("VmSize:").map_or(0, |k| k.saturating_mul(1024));
    if let Some(max) = process_limit("Max address space") {
        candidates.push(Budget {
            bytes: less_a_tenth(max.saturating_sub(mapped)),
            source: "the address-space limit (ulimit -v) less what aec maps and a margin",
        });
    }
    let data = self_status_kib("VmData:").map_or(0, |k| k.saturating_mul(1024));
    if let Some(max) = process_limit("Max data size") {
        candidates.push(Budget {
            bytes: less_a_tenth(max.saturating_sub(data)),
            source: "the data-size limit (ulimit -d) less what aec uses and a margin",
        });
    }
    candidates
        .into_iter()
        .min_by_key(|b| b.bytes)
        .unwrap_or(Budget { bytes: 8 << 30, source: "8 GiB (this machine does not say how much it has)" })
}

/// The memory limit of this process's cgroup, if it has one: v2's `memory.max`, else v1's
/// `memory.limit_in_bytes` (whose "no limit" is a huge number, left out).
fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if id == "0" && controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        let limit = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u64>().ok());
        if let Some(l) = limit.filter(|&l| l < 1 << 60) {
            return Some(l);
        }
    }
    None
}

/// A soft limit of `/proc/self/limits` in bytes (`None` when unlimited or unknown).
fn process_limit(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let rest = text.lines().find_map(|l| l.strip_prefix(name))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A `kB` figure of `/proc/self/status`.
fn self_status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// The budget in force.
pub fn limit() -> u64 {
    budget().bytes
}

/// The budget in force and what set it.
fn budget() -> Budget {
    match LIMIT.load(Ordering::Relaxed) {
        0 => default_budget(),
        bytes => Budget { bytes, source: "set by --memory-limit" },
    }
}

/// Sets the budget for this process (`--memory-limit`).
pub fn set_limit(bytes: u64) {
    LIMIT.store(bytes.max(1), Ordering::Relaxed);
}

/// Goes back to the default budget (what this process may use, less a margin).
pub fn clear_limit() {
    LIMIT.store(0, Ordering::Relaxed);
}

/// `Ok` when `bytes` (`None`: the size overflows) fit in the budget; else a message saying
/// that `what` needs that much and how to `shrink` it.
pub fn check(what: &str, bytes: Option<u64>, shrink: &str) -> Result<(), String> {
    // Computed once: the address-space limit's share changes as the process maps memory.
    let budget = budget();
    let set_by = if LIMIT.load(Ordering::Relaxed) == 0 { "; --memory-limit sets another" } else { "" };
    match bytes {
        Some(b) if b <= budget.bytes => Ok(()),
        b => Err(format!(
            "{what} needs {}, over the memory budget of {} ({}{set_by}); {shrink}",
            b.map_or("more bytes than a 64-bit size holds".to_owned(), human),
            human(budget.bytes),
            budget.source
        )),
    }
}

/// A size for people: `512 B`, `1.5 KiB`, `12.3 MiB`, `2.0 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Parses a size as `--memory-limit` takes it: bytes, or a number with `K`, `M`, `G` or `T`
/// (powers of 1024; `KiB`, `MB`… accepted alike).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_uppercase().trim_end_matches('B').trim_end_matches('I') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("`{text}` is not a size: write e.g. 512M or 8G")),
    };
    let n: f64 = num.parse().map_err(|_| format!("`{text}` is not a size: write e.g. 512M or 8G"))?;
    let bytes = n * scale as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` is not a usable memory limit"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(100), "100 B");
    }
}
