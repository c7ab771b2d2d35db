//! Worker threads follow the container's CPU limit.
//!
//! A sidecar limited to 500m CPU that starts one worker per host core only adds
//! context switches and memory, so the runtime sizes itself from the cgroup quota
//! (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up.

use std::{fs, path::Path};

/// Where cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Worker threads to run: the override if given, else the CPU limit rounded up,
/// at least 1 and at most `available` (the host's parallelism).
pub fn worker_threads(override_: Option<usize>, limit: Option<f64>, available: usize) -> usize {
    let available = available.max(1);
    if let Some(n) = override_ {
        return n.max(1);
    }
    match limit {
        Some(cpus) if cpus > 0.0 => (cpus.ceil() as usize).clamp(1, available),
        _ => available,
    }
}

/// The CPU limit of this process's cgroup in CPUs, if it has one.
pub fn cpu_limit() -> Option<f64> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cpu_limit_at(Path::new(CGROUP_ROOT), &own)
}

/// The CPU limit found under `root`, given the contents of `/proc/self/cgroup`.
pub fn cpu_limit_at(root: &Path, proc_self_cgroup: &str) -> Option<f64> {
    // v2: one unified hierarchy, line `0::/path`. Inside a container with a cgroup
    // namespace the path is `/`, so the root file is the container's own.
    for line in proc_self_cgroup.lines() {
        if let Some(path) = line.strip_prefix("0::") {
            let dir = root.join(path.trim_start_matches('/'));
            if let Some(l) = read(&dir.join("cpu.max")).and_then(|s| parse_cpu_max(&s)) {
                return Some(l);
            }
        }
    }
    if let Some(l) = read(&root.join("cpu.max")).and_then(|s| parse_cpu_max(&s)) {
        return Some(l);
    }
    // v1: the cpu controller, mounted alone or together with cpuacct.
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if !controllers.split(',').any(|c| c == "cpu") {
            continue;
        }
        for mount in ["cpu", "cpu,cpuacct", "cpuacct,cpu"] {
            for dir in [
                root.join(mount).join(path.trim_start_matches('/')),
                root.join(mount),
            ] {
                if let Some(l) = cfs_limit(&dir) {
                    return Some(l);
                }
            }
        }
    }
    None
}

fn cfs_limit(dir: &Path) -> Option<f64> {
    let quota = read(&dir.join("cpu.cfs_quota_us"))?;
    let period = read(&dir.join("cpu.cfs_period_us"))?;
    parse_cfs(&quota, &period)
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// Parses v2 `cpu.max` (`"200000 100000"`, or `"max 100000"` for no limit).
pub fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then(|| quota / period)
}

/// Parses v1 `cpu.cfs_quota_us` (`-1` for no limit) and `cpu.cfs_period_us`.
pub fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: i64 = period.trim().parse().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    #[test]
    fn parses_cpu_max() {
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn parses_cfs() {
        assert_eq!(parse_cfs("150000\n", "100000\n"), Some(1.5));
        assert_eq!(parse_cfs("-1", "100000"), None);
        assert_eq!(parse_cfs("x", "100000"), None);
    }

    #[test]
    fn threads_round_up_and_clamp() {
        assert_eq!(worker_threads(None, Some(0.5), 8), 1);
        assert_eq!(worker_threads(None, Some(1.5), 8), 2);
        assert_eq!(worker_threads(None, Some(16.0), 4), 4);
        assert_eq!(worker_threads(None, None, 4), 4);
        assert_eq!(worker_threads(Some(3), Some(1.0), 2), 3);
    }

    #[test]
    fn finds_v2_limit_in_own_cgroup() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "kubepods/pod1/c1/cpu.max", "250000 100000\n");
        write(root.path(), "cpu.max", "max 100000\n");
        let got = cpu_limit_at(root.path(), "0::/kubepods/pod1/c1\n");
        assert_eq!(got, Some(2.5));
    }

    #[test]
    fn finds_v2_limit_at_namespaced_root() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "cpu.max", "100000 100000\n");
        assert_eq!(cpu_limit_at(root.path(), "0::/\n"), Some(1.0));
    }

    #[test]
    fn finds_v1_limit() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "cpu,cpuacct/cpu.cfs_quota_us", "300000\n");
        write(root.path(), "cpu,cpuacct/cpu.cfs_period_us", "100000\n");
        let own = "12:memory:/x\n4:cpu,cpuacct:/kubepods/pod1\n";
        assert_eq!(cpu_limit_at(root.path(), own), Some(3.0));
    }

    #[test]
    fn no_limit() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "cpu.max", "max 100000\n");
        assert_eq!(cpu_limit_at(root.path(), "0::/\n"), None);
        write(root.path(), "cpu/cpu.cfs_quota_us", "-1\n");
        write(root.path(), "cpu/cpu.cfs_period_us", "100000\n");
        assert_eq!(cpu_limit_at(root.path(), "3:cpu:/\n"), None);
    }
}
