//! Packet captures on a pod's wire: `tcpdump` on the node end of the pod's veth, run
//! inside the node namespace, so what it records is exactly what left and entered the
//! pod (after the sidecar encrypted it, before the peer's sidecar decrypted it).

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicU32, Ordering};

use nix::{sys::signal::Signal, unistd::Pid};

use super::{io_err, netns, Cluster, Error};

/// What to install when tcpdump is missing.
pub const TCPDUMP_HINT: &str = "tcpdump is missing: apt-get install -y tcpdump";

static CAPTURES: AtomicU32 = AtomicU32::new(0);

/// A running capture; stopped (and its process reaped) on drop.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    err: PathBuf,
    /// The node-side interface captured.
    pub iface: String,
}

impl Cluster {
    /// The node end of pod `pod`'s veth (from the node's /32 route to the pod).
    pub fn veth_of(&self, pod: &str) -> Result<String, Error> {
        let ip = self.pod(pod)?.ip.to_string();
        let route = self.node().ip(&["route", "get", &ip])?;
        let mut words = route.split_whitespace();
        words
            .by_ref()
            .find(|w| *w == "dev")
            .and(words.next())
            .map(str::to_string)
            .ok_or_else(|| Error::Other(format!("no device in the node's route to {ip}: {route}")))
    }

    /// Starts `tcpdump` on pod `pod`'s veth (TCP only) and returns once it captures.
    pub fn capture(&self, pod: &str) -> Result<Capture, Error> {
        let iface = self.veth_of(pod)?;
        if !netns::search_path()
            .split(':')
            .any(|d| std::path::Path::new(d).join("tcpdump").is_file())
        {
            return Err(Error::Prereq(TCPDUMP_HINT.into()));
        }
        let k = CAPTURES.fetch_add(1, Ordering::SeqCst);
        let stem = self.log_dir().join(format!("{pod}.{iface}.{k}"));
        let file = stem.with_extension("pcap");
        let err = stem.with_extension("tcpdump.log");
        let errf = fs::File::create(&err).map_err(io_err(format!("creating {}", err.display())))?;
        let mut cmd = self.node().command("tcpdump");
        // --immediate-mode and -U: each packet is handed over and written at once (the
        // ring buffer would otherwise hold them up to a second), so a stop loses
        // nothing; -Z root: keep
        // the rights to write where we point it.
        cmd.args([
            "-i",
            &iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file)
        .arg("tcp")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errf);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting tcpdump on {iface}")))?;
        let mut cap = Capture {
            child: Some(child),
            file,
            err,
            iface,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(&cap.err).unwrap_or_default();
            if log.contains("listening on") {
                return Ok(cap);
            }
            let exited = cap.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                return Err(Error::Other(format!(
                    "tcpdump on {} exited ({st}): {log}",
                    cap.iface
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "tcpdump on {} did not start capturing in 10 s: {log}",
                    cap.iface
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Capture {
    /// Stops tcpdump (SIGINT flushes the file) and returns the pcap file's bytes.
    pub fn stop(&mut self) -> Result<Vec<u8>, Error> {
        // Packets still in the kernel's ring: give them a moment to be written.
        std::thread::sleep(Duration::from_millis(200));
        self.halt();
        fs::read(&self.file).map_err(io_err(format!("reading {}", self.file.display())))
    }

    /// The packets that carry data (PSH), decoded by `tcpdump -A -r` (non-printable
    /// bytes as `.`), at most `lines` lines; after [`Capture::stop`].
    pub fn ascii(&self, lines: usize) -> Result<Vec<String>, Error> {
        let mut cmd = Command::new("tcpdump");
        cmd.env("PATH", netns::search_path())
            .args(["-n", "-A", "-r"])
            .arg(&self.file)
            .arg("tcp[tcpflags] & tcp-push != 0");
        let out = netns::run_with_timeout(&mut cmd, Duration::from_secs(10))?;
        let text = netns::check(&cmd, out)?;
        Ok(text.lines().take(lines).map(str::to_string).collect())
    }

    fn halt(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Whether `needle` occurs anywhere in `hay` (e.g. a marker in a pcap file).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
