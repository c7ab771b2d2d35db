//! Resident memory and CPU time of other processes, read from `/proc`, so the load
//! generator can sample the proxies over exactly its measured window.

use std::{fs, io};

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// `/proc/PID/...` could not be read: the process is gone or the PID is wrong.
    #[error("cannot read /proc/{pid}/{file}: {source} (is process {pid} still running?)")]
    Read {
        /// The process.
        pid: u32,
        /// The file under `/proc/PID`.
        file: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The file did not have the expected shape.
    #[error("unexpected contents in /proc/{pid}/{file}: {what}")]
    Parse {
        /// The process.
        pid: u32,
        /// The file under `/proc/PID`.
        file: &'static str,
        /// What was missing.
        what: &'static str,
    },
}

/// One reading of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Resident set size (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// User plus system CPU time of all its threads, living and exited, in clock ticks.
    pub cpu_ticks: u64,
}

fn read(pid: u32, file: &'static str) -> Result<String, ProcError> {
    fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| ProcError::Read {
        pid,
        file,
        source,
    })
}

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `utime + stime` in ticks from the text of `/proc/PID/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces, so count
    // fields from the last ')'. utime and stime are fields 14 and 15 of the line.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Reads RSS and CPU time of `pid`.
pub fn sample(pid: u32) -> Result<Sample, ProcError> {
    let rss_kib = parse_rss_kib(&read(pid, "status")?).ok_or(ProcError::Parse {
        pid,
        file: "status",
        what: "no VmRSS line",
    })?;
    let cpu_ticks = parse_cpu_ticks(&read(pid, "stat")?).ok_or(ProcError::Parse {
        pid,
        file: "stat",
        what: "fewer than 15 fields",
    })?;
    Ok(Sample { rss_kib, cpu_ticks })
}

/// Clock ticks per second (`USER_HZ`), the unit of [`Sample::cpu_ticks`].
pub fn ticks_per_second() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        // Linux fixes USER_HZ at 100 on every architecture it exports it to userspace.
        _ => 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let stat = "1234 (meshlet proxy) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    37 12 0 0 20 0 2 0 100 12345678 900 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(49));
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn parses_status_rss() {
        let status = "Name:\tmeshlet-proxy\nVmPeak:\t  9000 kB\nVmRSS:\t    3120 kB\n";
        assert_eq!(parse_rss_kib(status), Some(3120));
        assert_eq!(parse_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        let t = ticks_per_second();
        assert!((1..=10_000).contains(&t));
    }

    #[test]
    fn missing_process_names_the_pid() {
        // PID 0 never has a /proc entry.
        let e = sample(0).unwrap_err().to_string();
        assert!(e.contains("/proc/0/status"), "{e}");
    }
}
