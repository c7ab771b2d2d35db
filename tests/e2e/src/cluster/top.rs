//! Per-container CPU and memory from `/proc`, printed exactly as
//! `kubectl top pod --containers` prints them.
//!
//! kubectl writes every cell followed by a tab into a Go `text/tabwriter` with
//! minwidth 10, padding 3 and spaces (`printers.GetNewTabWriter`), so each column is
//! `max(10, widest cell + 3)` wide, the last one included. CPU is `<millicores>m`,
//! memory `<MiB>Mi` (integer division), pods sorted by name, containers by name.

use std::time::Duration;

/// CPU time and resident memory of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, in bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` when the process is gone.
pub fn sample(pid: i32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Sample {
        cpu_ticks: parse_stat_ticks(&stat)?,
        rss_bytes: parse_status_rss(&status)?,
    })
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parens; fields restart after
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3, so field n is f[n - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `VmRSS` of a `/proc/<pid>/status`, in bytes.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), 100 when unknown.
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(100)
}

/// Millicores used between two samples taken `elapsed` apart.
pub fn millicores(before: Sample, after: Sample, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    let ticks = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64;
    (ticks / clock_ticks() as f64 / secs * 1000.0).round() as u64
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// CPU in millicores.
    pub millicores: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// The table as `kubectl top pod --containers` prints it.
pub fn format(rows: &[Row]) -> String {
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| (&a.pod, &a.container).cmp(&(&b.pod, &b.container)));
    let mut cells = vec![[
        "POD".to_string(),
        "NAME".into(),
        "CPU(cores)".into(),
        "MEMORY(bytes)".into(),
    ]];
    for r in rows {
        cells.push([
            r.pod,
            r.container,
            format!("{}m", r.millicores),
            format!("{}Mi", r.memory_bytes / (1024 * 1024)),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|j| {
            cells
                .iter()
                .map(|c| c[j].len() + 3)
                .max()
                .unwrap_or(0)
                .max(10)
        })
        .collect();
    let mut out = String::new();
    for c in cells {
        for (j, cell) in c.iter().enumerate() {
            out.push_str(cell);
            out.push_str(&" ".repeat(widths[j] - cell.len()));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_kubectl() {
        let rows = [
            Row {
                pod: "backend-v1-0".into(),
                container: "meshlet-proxy".into(),
                millicores: 3,
                memory_bytes: 5 * 1024 * 1024 + 12,
            },
            Row {
                pod: "backend-v1-0".into(),
                container: "app".into(),
                millicores: 12,
                memory_bytes: 900 * 1024,
            },
        ];
        let want = "\
POD            NAME            CPU(cores)   MEMORY(bytes)   \n\
backend-v1-0   app             12m          0Mi             \n\
backend-v1-0   meshlet-proxy   3m           5Mi             \n";
        assert_eq!(format(&rows), want);
    }

    #[test]
    fn parses_proc() {
        let stat =
            "42 (my (odd) app) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0 100 1000 200";
        assert_eq!(parse_stat_ticks(stat), Some(22));
        assert_eq!(
            parse_status_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        let me = sample(std::process::id() as i32).unwrap();
        assert!(me.rss_bytes > 0);
        let a = Sample {
            cpu_ticks: 0,
            rss_bytes: 0,
        };
        let b = Sample {
            cpu_ticks: clock_ticks() / 2,
            rss_bytes: 0,
        };
        assert_eq!(millicores(a, b, Duration::from_secs(1)), 500);
    }
}
