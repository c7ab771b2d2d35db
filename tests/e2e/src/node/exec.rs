//! `kubectl exec` as the kubelet serves it. The API server forwards pods/exec to
//! `/exec/{namespace}/{pod}/{container}?command=..&input=1&output=1&error=1&tty=0`
//! on the kubelet port as an HTTP upgrade to SPDY/3.1 with the remote-command
//! subprotocol `v4.channel.k8s.io` (kubectl's WebSocket is translated to SPDY by
//! the API server). Once upgraded the client opens one SPDY stream per channel
//! (header `streamtype`: error, stdin, stdout, stderr, resize); when all it asked
//! for are there the command runs in the container's context (pod network
//! namespace, volume mounts, user and group, environment: the same
//! [`container_command`] the container itself started with), stdin/stdout/stderr
//! are pumped through bounded queues, and at exit the status goes to the error
//! stream as JSON (`metav1.Status`: Success, or Failure with reason
//! `NonZeroExitCode` and the code in a cause `ExitCode`) before every stream the
//! client reads is closed. Like the kubelet (cri-streaming), the server then waits
//! for the client to close the connection, so output still in flight is not cut
//! off by a reset.
//!
//! A terminal (`tty=1`) is a pty that util-linux `script` makes for the command
//! (stderr then shares it with stdout, as on a terminal); resize events set its
//! size with `stty`. Not served: WebSocket upgrades, attach and port-forward.

mod dictionary;
pub mod spdy;

use std::{
    io::{Read, Write},
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::{body::Incoming, header, HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Container;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, oneshot},
};

use self::spdy::{Decoder, Encoder, Frame, FLAG_FIN};
use super::{
    lock,
    pod::{container_command, ExecTarget, PodShared},
    Agent,
};
use crate::cluster::Netns;

/// The remote-command subprotocol served (the kubelet's newest over SPDY).
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";
/// Subprotocols served, best first.
pub const SUPPORTED: &[&str] = &[PROTOCOL_V4];
/// How long the client has to open its streams (the kubelet's default).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the client to close once everything is sent.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// A write to the client that takes longer ends the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(300);
/// Output is read and framed in chunks of this size.
const CHUNK: usize = 32 << 10;
/// Frames queued towards the client, and stdin chunks towards the command.
const QUEUE: usize = 16;
/// Stdin bytes accepted before the command starts.
const EARLY_STDIN: usize = 1 << 20;

/// The streams the client may open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamType {
    /// Status at the end.
    Error,
    /// Input of the command.
    Stdin,
    /// Its standard output.
    Stdout,
    /// Its standard error.
    Stderr,
    /// Terminal size changes.
    Resize,
}

impl StreamType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "error" => Self::Error,
            "stdin" => Self::Stdin,
            "stdout" => Self::Stdout,
            "stderr" => Self::Stderr,
            "resize" => Self::Resize,
            _ => return None,
        })
    }
}

/// What the client asked to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// argv.
    pub command: Vec<String>,
    /// A stdin stream comes.
    pub stdin: bool,
    /// A stdout stream comes.
    pub stdout: bool,
    /// A stderr stream comes.
    pub stderr: bool,
    /// A terminal was asked for (served without one).
    pub tty: bool,
}

impl ExecRequest {
    /// Parses `/exec/{ns}/{pod}/{container}` (or `/exec/{ns}/{pod}/{uid}/{container}`)
    /// and its query: `command` (repeated), `input`, `output`, `error`, `tty` as the
    /// API server sends them (`1`), also `stdin`/`stdout`/`stderr` and `true`.
    pub fn parse(path: &str, query: Option<&str>) -> Result<Self, String> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let (namespace, pod, container) = match parts.as_slice() {
            ["exec", ns, pod, container] | ["exec", ns, pod, _, container] => {
                (ns.to_string(), pod.to_string(), container.to_string())
            }
            _ => {
                return Err(format!(
                    "{path} is not /exec/NAMESPACE/POD/CONTAINER: ask through the API server (kubectl exec)"
                ))
            }
        };
        let mut r = Self {
            namespace,
            pod,
            container,
            command: Vec::new(),
            stdin: false,
            stdout: false,
            stderr: false,
            tty: false,
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let on = v == "1" || v.eq_ignore_ascii_case("true");
            match k.as_ref() {
                "command" => r.command.push(v.into_owned()),
                "input" | "stdin" => r.stdin = on,
                "output" | "stdout" => r.stdout = on,
                "error" | "stderr" => r.stderr = on,
                "tty" => r.tty = on,
                _ => {}
            }
        }
        // A terminal has one output; the kubelet drops stderr the same way.
        if r.tty {
            r.stderr = false;
        }
        if r.command.is_empty() {
            return Err("no command given: pass it as command=ARG, one per argument".into());
        }
        if !r.stdin && !r.stdout && !r.stderr {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        Ok(r)
    }

    /// Streams the client opens: error, one per channel asked for, resize with a tty.
    pub fn expected_streams(&self) -> usize {
        1 + usize::from(self.stdin)
            + usize::from(self.stdout)
            + usize::from(self.stderr)
            + usize::from(self.tty)
    }
}

/// Checks the upgrade headers and picks the subprotocol: the first the client
/// offers that is served, as k8s.io/streaming's `Handshake` does.
pub fn negotiate(headers: &HeaderMap) -> Result<&'static str, (StatusCode, String)> {
    let has = |name: header::HeaderName, want: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains(want))
        })
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "spdy/3.1") {
        return Err((
            StatusCode::BAD_REQUEST,
            "unable to upgrade: the request must carry Connection: Upgrade and Upgrade: SPDY/3.1 (this node serves exec over SPDY only)".into(),
        ));
    }
    let offered: Vec<String> = headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "unable to upgrade: header X-Stream-Protocol-Version is missing; this node serves {}",
                SUPPORTED.join(", ")
            ),
        ));
    }
    offered
        .iter()
        .find_map(|o| SUPPORTED.iter().find(|s| *s == o))
        .copied()
        .ok_or_else(|| {
            (
                StatusCode::FORBIDDEN,
                format!(
                    "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {SUPPORTED:?}"
                ),
            )
        })
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The pod and container an exec goes to.
struct Target {
    shared: Arc<PodShared>,
    exec: Arc<ExecTarget>,
    index: usize,
}

fn find(agent: &Agent, r: &ExecRequest) -> Result<Target, (StatusCode, String)> {
    let key = format!("{}/{}", r.namespace, r.pod);
    let shared = lock(&agent.pods)
        .values()
        .find(|p| p.namespace == r.namespace && p.name == r.pod)
        .cloned()
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("pod {key} does not run on this node"),
            )
        })?;
    let exec = lock(&shared.exec).clone().ok_or_else(|| {
        (
            StatusCode::BAD_REQUEST,
            format!("pod {key} is still being prepared; try again once it runs"),
        )
    })?;
    let index = exec
        .containers
        .iter()
        .position(|c| c.spec.name == r.container)
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("container not found ({:?}) in pod {key}", r.container),
            )
        })?;
    let running = lock(&shared.state)
        .containers
        .iter()
        .any(|c| c.name == r.container && c.pid.is_some());
    if !running {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "container {:?} in pod {key} is not running; exec needs a running container",
                r.container
            ),
        ));
    }
    Ok(Target {
        shared,
        exec,
        index,
    })
}

/// Answers an exec request: refuses it with a plain-text reason, or switches to
/// SPDY/3.1 and runs the session on the upgraded connection.
pub fn serve(agent: &Agent, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.version() != hyper::Version::HTTP_11 {
        return text(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "exec upgrades the connection, which needs HTTP/1.1 (offer http/1.1 in ALPN)",
        );
    }
    let r = match ExecRequest::parse(req.uri().path(), req.uri().query()) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let target = match find(agent, &r) {
        Ok(t) => t,
        Err((code, msg)) => return text(code, &msg),
    };
    let protocol = match negotiate(req.headers()) {
        Ok(p) => p,
        Err((code, msg)) => {
            let mut resp = text(code, &msg);
            for p in SUPPORTED {
                resp.headers_mut().append(
                    "x-accepted-stream-protocol-versions",
                    header::HeaderValue::from_static(p),
                );
            }
            return resp;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let agent = agent.clone();
    tokio::spawn(async move {
        let key = format!("{}/{}/{}", r.namespace, r.pod, r.container);
        match on_upgrade.await {
            Ok(up) => match session(TokioIo::new(up), &agent, &r, &target).await {
                Ok(()) => tracing::info!(container = %key, command = ?r.command, "exec done"),
                Err(e) => tracing::warn!(container = %key, error = %e, "exec session"),
            },
            Err(e) => tracing::warn!(container = %key, error = %e, "exec upgrade"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("SPDY/3.1"),
    );
    h.insert(
        "x-stream-protocol-version",
        header::HeaderValue::from_static(protocol),
    );
    resp
}

/// The stream id of each channel the client opened.
#[derive(Debug, Default)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
    last: u32,
}

/// Reads the next frame; `None` at the end of the connection. Cancel-safe: what
/// was read stays in `buf`.
async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut Decoder,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, String> {
    loop {
        if let Some(f) = dec.decode(buf).map_err(|e| e.to_string())? {
            return Ok(Some(f));
        }
        buf.reserve(16 << 10);
        match rd.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("reading from the client: {e}")),
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Frame>) {
    let mut enc = Encoder::new();
    let mut out = BytesMut::with_capacity(CHUNK + 64);
    while let Some(f) = rx.recv().await {
        out.clear();
        enc.encode(&f, &mut out);
        // Batch what is queued already into one write.
        while out.len() < CHUNK {
            match rx.try_recv() {
                Ok(f) => enc.encode(&f, &mut out),
                Err(_) => break,
            }
        }
        let w = async {
            wr.write_all(&out).await?;
            wr.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, w).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
}

/// Accepts streams until every one the request implies is open; stdin bytes that
/// arrive meanwhile are kept (bounded).
async fn accept_streams<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut Decoder,
    buf: &mut BytesMut,
    tx: &mpsc::Sender<Frame>,
    want: usize,
) -> Result<(Streams, Vec<Bytes>, bool), String> {
    let mut s = Streams::default();
    let mut got = 0;
    let mut early: Vec<Bytes> = Vec::new();
    let mut early_len = 0;
    let mut stdin_fin = false;
    while got < want {
        let Some(frame) = next_frame(rd, dec, buf).await? else {
            return Err("the client closed the connection before opening its streams".into());
        };
        match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => {
                s.last = s.last.max(stream_id);
                let kind = headers
                    .iter()
                    .find(|(k, _)| k == "streamtype")
                    .and_then(|(_, v)| StreamType::parse(v));
                let slot = match kind {
                    Some(StreamType::Error) => &mut s.error,
                    Some(StreamType::Stdin) => &mut s.stdin,
                    Some(StreamType::Stdout) => &mut s.stdout,
                    Some(StreamType::Stderr) => &mut s.stderr,
                    Some(StreamType::Resize) => &mut s.resize,
                    None => {
                        tracing::warn!(?headers, "exec: a stream of unknown type, refused");
                        send(
                            tx,
                            Frame::RstStream {
                                stream_id,
                                status: spdy::PROTOCOL_ERROR,
                            },
                        )
                        .await?;
                        continue;
                    }
                };
                *slot = Some(stream_id);
                got += 1;
                send(
                    tx,
                    Frame::SynReply {
                        stream_id,
                        flags: 0,
                        headers: Vec::new(),
                    },
                )
                .await?;
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } if Some(stream_id) == s.stdin => {
                early_len += data.len();
                if early_len > EARLY_STDIN {
                    return Err(format!(
                        "over {EARLY_STDIN} bytes of stdin before all streams were open"
                    ));
                }
                stdin_fin |= flags & FLAG_FIN != 0;
                if !data.is_empty() {
                    early.push(data);
                }
            }
            Frame::Ping(id) => send(tx, Frame::Ping(id)).await?,
            Frame::GoAway { .. } => {
                return Err("the client went away before opening its streams".into())
            }
            _ => {}
        }
    }
    Ok((s, early, stdin_fin))
}

async fn send(tx: &mpsc::Sender<Frame>, f: Frame) -> Result<(), String> {
    tx.send(f)
        .await
        .map_err(|_| "the connection to the client is closed".to_string())
}

/// The status the v4 protocol writes to the error stream.
pub fn status_json(result: &Result<ExitStatus, String>) -> Value {
    match result {
        Ok(st) if st.success() => json!({"status": "Success"}),
        Ok(st) => {
            // Killed by a signal: 128 + signal, as a shell and the runtimes report it.
            let code = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            json!({
                "status": "Failure",
                "reason": "NonZeroExitCode",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
        }
        Err(e) => json!({
            "status": "Failure",
            "reason": "InternalError",
            "code": 500,
            "message": format!("error executing command in container: {e}"),
        }),
    }
}

/// Copies a pipe of the command to a stream, in chunks, until EOF.
fn pump_out(mut r: impl Read, stream_id: u32, tx: mpsc::Sender<Frame>, done: oneshot::Sender<()>) {
    let mut b = vec![0u8; CHUNK];
    loop {
        match r.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let f = Frame::Data {
                    stream_id,
                    flags: 0,
                    data: Bytes::copy_from_slice(&b[..n]),
                };
                if tx.blocking_send(f).is_err() {
                    break;
                }
            }
        }
    }
    let _ = done.send(());
}

/// Waits for the command, polling so that `kill` can end it (and its process
/// group) before it is reaped: a reaped pid may be reused, a live one not.
fn wait_child(
    mut child: std::process::Child,
    kill: Arc<AtomicBool>,
    exit: oneshot::Sender<Result<ExitStatus, String>>,
) {
    let pid = child.id() as i32;
    let mut killed = false;
    let st = loop {
        if kill.load(Ordering::SeqCst) && !killed {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed = true;
        }
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("waiting for the command: {e}")),
        }
    };
    let _ = exit.send(st);
}

async fn session<IO: AsyncRead + AsyncWrite + Send + 'static>(
    io: IO,
    agent: &Agent,
    req: &ExecRequest,
    target: &Target,
) -> Result<(), String> {
    let (mut rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel::<Frame>(QUEUE);
    let writer = tokio::spawn(write_frames(wr, rx));
    let mut dec = Decoder::new();
    let mut buf = BytesMut::with_capacity(16 << 10);
    let want = req.expected_streams();
    let (streams, early, early_fin) = tokio::time::timeout(
        STREAM_CREATION_TIMEOUT,
        accept_streams(&mut rd, &mut dec, &mut buf, &tx, want),
    )
    .await
    .map_err(|_| {
        format!(
            "timed out after {}s waiting for the client to open its {want} streams",
            STREAM_CREATION_TIMEOUT.as_secs()
        )
    })??;

    // The command, as the container's own process.
    let c = &target.exec.containers[target.index];
    let asked = Container {
        command: Some(req.command.clone()),
        args: None,
        ..c.spec.clone()
    };
    let resolved = agent.cfg.bins.resolve(&asked).or_else(|_| {
        let first = &req.command[0];
        super::prep::which(first)
            .map(|bin| (bin, req.command[1..].to_vec()))
            // runc's wording, which kubectl users know.
            .ok_or_else(|| format!("exec: {first:?}: executable file not found in $PATH"))
    });
    let spawned = resolved.and_then(|(bin, args)| {
        let ns = Netns::existing(&target.exec.netns);
        let mut cmd = if req.tty {
            // A terminal: util-linux `script` runs the command on a pty of its own
            // and relays it to our pipes (its exit code with -e).
            let script = super::prep::which("script").ok_or_else(|| {
                "a terminal needs `script` (apt-get install -y bsdutils)".to_string()
            })?;
            let line = std::iter::once(bin.display().to_string())
                .chain(args.iter().cloned())
                .map(|a| shell_quote(&a))
                .collect::<Vec<_>>()
                .join(" ");
            let script_args = vec![
                "-qefc".to_string(),
                format!("exec {line}"),
                "/dev/null".to_string(),
            ];
            let mut with_term = c.clone();
            if !with_term.env.iter().any(|(k, _)| k == "TERM") {
                with_term.env.push(("TERM".into(), "xterm".into()));
            }
            container_command(
                &ns,
                &target.exec.dir,
                &target.shared.name,
                &with_term,
                &script,
                &script_args,
            )
        } else {
            container_command(&ns, &target.exec.dir, &target.shared.name, c, &bin, &args)
        };
        let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        cmd.stdin(piped(streams.stdin.is_some()))
            .stdout(piped(streams.stdout.is_some()))
            .stderr(piped(
                streams.stderr.is_some() || (req.tty && streams.stdout.is_some()),
            ))
            // A group of its own, so ending the session ends what the command started.
            .process_group(0);
        cmd.spawn()
            .map_err(|e| format!("starting {:?}: {e}", req.command))
    });
    let kill = Arc::new(AtomicBool::new(false));
    let mut pumps: Vec<oneshot::Receiver<()>> = Vec::new();
    let mut stdin_tx: Option<mpsc::Sender<Bytes>> = None;
    let (exit_tx, mut exit_rx) = oneshot::channel();
    let mut child_pid = None;
    match spawned {
        Ok(mut child) => {
            child_pid = Some(child.id() as i32);
            // stderr goes to the stdout stream when a terminal was asked for.
            let outs = [
                (
                    child
                        .stdout
                        .take()
                        .map(|p| Box::new(p) as Box<dyn Read + Send>),
                    streams.stdout,
                ),
                (
                    child
                        .stderr
                        .take()
                        .map(|p| Box::new(p) as Box<dyn Read + Send>),
                    streams.stderr.or(streams.stdout),
                ),
            ];
            for (pipe, id) in outs {
                if let (Some(pipe), Some(id)) = (pipe, id) {
                    let (done_tx, done_rx) = oneshot::channel();
                    let tx = tx.clone();
                    std::thread::Builder::new()
                        .name("exec-out".into())
                        .spawn(move || pump_out(pipe, id, tx, done_tx))
                        .map_err(|e| format!("starting an output thread: {e}"))?;
                    pumps.push(done_rx);
                }
            }
            if let Some(mut stdin) = child.stdin.take() {
                let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(QUEUE + early.len());
                for b in early {
                    let _ = in_tx.try_send(b);
                }
                std::thread::Builder::new()
                    .name("exec-in".into())
                    .spawn(move || {
                        while let Some(b) = in_rx.blocking_recv() {
                            if stdin.write_all(&b).is_err() {
                                break;
                            }
                        }
                    })
                    .map_err(|e| format!("starting the stdin thread: {e}"))?;
                if !early_fin {
                    stdin_tx = Some(in_tx);
                }
            }
            let k = kill.clone();
            std::thread::Builder::new()
                .name("exec-wait".into())
                .spawn(move || wait_child(child, k, exit_tx))
                .map_err(|e| format!("starting the wait thread: {e}"))?;
        }
        Err(e) => {
            let _ = exit_tx.send(Err(e));
        }
    }

    let mut reading = true;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            st = &mut exit_rx => break st.unwrap_or_else(|_| Err("the wait thread ended".into())),
            f = next_frame(&mut rd, &mut dec, &mut buf), if reading => match f {
                Ok(Some(frame)) => {
                    let gone = on_frame(frame, &streams, &mut stdin_tx, &tx, child_pid).await;
                    if gone {
                        kill.store(true, Ordering::SeqCst);
                    }
                }
                Ok(None) | Err(_) => {
                    // The client is gone: nobody reads the output any more.
                    reading = false;
                    kill.store(true, Ordering::SeqCst);
                }
            },
            _ = tick.tick() => {
                if target.shared.deadline().is_some() || target.shared.gone() {
                    kill.store(true, Ordering::SeqCst);
                }
            }
        }
    };

    // Stop input as the kubelet does: a reset also drops what is still coming.
    drop(stdin_tx);
    for id in [streams.stdin, streams.resize].into_iter().flatten() {
        let _ = send(
            &tx,
            Frame::RstStream {
                stream_id: id,
                status: spdy::CANCEL,
            },
        )
        .await;
    }
    // Everything the command wrote goes out before the status; a daemon it left
    // holding the pipe does not hold the session up for long.
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    if let Some(id) = streams.error {
        let body = status_json(&result).to_string();
        let _ = send(
            &tx,
            Frame::Data {
                stream_id: id,
                flags: 0,
                data: Bytes::from(body),
            },
        )
        .await;
    }
    for id in [streams.stdout, streams.stderr, streams.error]
        .into_iter()
        .flatten()
    {
        let _ = send(
            &tx,
            Frame::Data {
                stream_id: id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
        )
        .await;
    }
    // The client closes once it has read everything; closing first could reset
    // the connection under output still in flight.
    if reading {
        let _ = tokio::time::timeout(FINISH_TIMEOUT, async {
            while let Ok(Some(f)) = next_frame(&mut rd, &mut dec, &mut buf).await {
                if let Frame::Ping(id) = f {
                    let _ = send(&tx, Frame::Ping(id)).await;
                }
            }
        })
        .await;
    }
    let _ = send(
        &tx,
        Frame::GoAway {
            last_good: streams.last,
            status: 0,
        },
    )
    .await;
    drop(tx);
    let _ = writer.await;
    result.map(|_| ())
}

/// Quotes `s` for `sh -c`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The terminal sizes (width, height) in a resize stream's data: JSON objects
/// `{"Width":80,"Height":24}` back to back.
pub fn parse_resizes(data: &[u8]) -> Vec<(u16, u16)> {
    serde_json::Deserializer::from_slice(data)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .filter_map(|v| {
            let w = u16::try_from(v["Width"].as_u64()?).ok()?;
            let h = u16::try_from(v["Height"].as_u64()?).ok()?;
            Some((w, h))
        })
        .collect()
}

/// Sets the size of the pty `script` (pid `pid`) made: its child's stdin is the
/// terminal; the kernel then sends SIGWINCH to the foreground group, as on a
/// resized window.
fn resize(pid: i32, width: u16, height: u16) {
    // script forks its child right after starting; give it a moment.
    for _ in 0..50 {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let pty = children.split_whitespace().find_map(|c| {
            let p = std::fs::read_link(format!("/proc/{c}/fd/0")).ok()?;
            p.to_string_lossy().starts_with("/dev/pts/").then_some(p)
        });
        if let Some(pty) = pty {
            let _ = std::process::Command::new("stty")
                .arg("-F")
                .arg(&pty)
                .args(["rows", &height.to_string(), "cols", &width.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Handles a frame while the command runs; true when the client is going away.
async fn on_frame(
    frame: Frame,
    streams: &Streams,
    stdin_tx: &mut Option<mpsc::Sender<Bytes>>,
    tx: &mpsc::Sender<Frame>,
    pid: Option<i32>,
) -> bool {
    match frame {
        Frame::Data {
            stream_id, data, ..
        } if Some(stream_id) == streams.resize => {
            let sizes = parse_resizes(&data);
            if let (Some(&(w, h)), Some(pid)) = (sizes.last(), pid) {
                tokio::task::spawn_blocking(move || resize(pid, w, h));
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } if Some(stream_id) == streams.stdin => {
            if let Some(in_tx) = stdin_tx.as_ref() {
                if !data.is_empty() && in_tx.send(data).await.is_err() {
                    *stdin_tx = None;
                }
            }
            if flags & FLAG_FIN != 0 {
                // EOF on the command's stdin.
                *stdin_tx = None;
            }
        }
        Frame::RstStream { stream_id, .. } if Some(stream_id) == streams.stdin => {
            *stdin_tx = None;
        }
        Frame::Ping(id) => {
            let _ = send(tx, Frame::Ping(id)).await;
        }
        Frame::SynStream { stream_id, .. } => {
            let _ = send(
                tx,
                Frame::RstStream {
                    stream_id,
                    status: spdy::PROTOCOL_ERROR,
                },
            )
            .await;
        }
        Frame::GoAway { .. } => return true,
        // Window updates, settings, frames of closed streams.
        _ => {}
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_api_servers_exec_request() {
        // What kube-apiserver v1.37 sends for
        // `kubectl exec -i p -c app -- sh -c 'echo out; exit 3'`.
        let r = ExecRequest::parse(
            "/exec/hello/p/app",
            Some("command=sh&command=-c&command=echo+out%3B+exit+3&input=1&output=1&error=1"),
        )
        .unwrap();
        assert_eq!(
            r,
            ExecRequest {
                namespace: "hello".into(),
                pod: "p".into(),
                container: "app".into(),
                command: vec!["sh".into(), "-c".into(), "echo out; exit 3".into()],
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false,
            }
        );
        assert_eq!(r.expected_streams(), 4);
        // The uid form, and a terminal: stderr folds into stdout, resize comes
        // (error, stdin, stdout, resize).
        let t = ExecRequest::parse(
            "/exec/ns/p/0e2a/c",
            Some("command=sh&stdin=true&stdout=1&stderr=1&tty=1"),
        )
        .unwrap();
        assert_eq!((t.container.as_str(), t.stderr, t.tty), ("c", false, true));
        assert_eq!(t.expected_streams(), 4);
        assert!(ExecRequest::parse("/exec/ns/p/c", Some("output=1"))
            .unwrap_err()
            .contains("no command"));
        assert!(ExecRequest::parse("/exec/ns/p/c", Some("command=ls"))
            .unwrap_err()
            .contains("at least 1 of stdin"));
        assert!(ExecRequest::parse("/exec/ns/p", Some("command=ls&output=1")).is_err());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, header::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn negotiates_v4_like_the_kubelet() {
        let up = [("connection", "Upgrade"), ("upgrade", "SPDY/3.1")];
        let mut offered = up.to_vec();
        offered.push(("x-stream-protocol-version", "v5.channel.k8s.io"));
        offered.push(("x-stream-protocol-version", "v4.channel.k8s.io"));
        assert_eq!(negotiate(&headers(&offered)), Ok(PROTOCOL_V4));
        let mut joined = up.to_vec();
        joined.push((
            "x-stream-protocol-version",
            "v4.channel.k8s.io, v3.channel.k8s.io",
        ));
        assert_eq!(negotiate(&headers(&joined)), Ok(PROTOCOL_V4));
        let mut old = up.to_vec();
        old.push(("x-stream-protocol-version", "v2.channel.k8s.io"));
        assert_eq!(
            negotiate(&headers(&old)).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            negotiate(&headers(&up)).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        let ws = [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ];
        let (code, msg) = negotiate(&headers(&ws)).unwrap_err();
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(msg.contains("SPDY"), "{msg}");
    }

    #[test]
    fn terminal_helpers() {
        // kubectl writes one JSON object per resize, sometimes several per frame.
        assert_eq!(
            parse_resizes(br#"{"Width":100,"Height":30}{"Width":120,"Height":40}"#),
            vec![(100, 30), (120, 40)]
        );
        assert_eq!(parse_resizes(br#"{"Width":-1,"Height":30}"#), vec![]);
        assert_eq!(parse_resizes(b"garbage"), vec![]);
        assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote("a 'b' $HOME \\n")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a 'b' $HOME \\n");
    }

    #[test]
    fn status_carries_the_exit_code() {
        let ok = status_json(&Ok(ExitStatus::from_raw(0)));
        assert_eq!(ok, json!({"status": "Success"}));
        // A wait status of exit code 3 is 3 << 8.
        let three = status_json(&Ok(ExitStatus::from_raw(3 << 8)));
        assert_eq!(three["status"], "Failure");
        assert_eq!(three["reason"], "NonZeroExitCode");
        assert_eq!(
            three["details"]["causes"],
            json!([{"reason": "ExitCode", "message": "3"}])
        );
        // Killed by SIGKILL (9): 137, as a shell reports it.
        let killed = status_json(&Ok(ExitStatus::from_raw(9)));
        assert_eq!(killed["details"]["causes"][0]["message"], "137");
        let err = status_json(&Err("starting [\"nope\"]: not found".into()));
        assert_eq!(err["reason"], "InternalError");
        assert!(err["message"].as_str().unwrap().contains("nope"));
    }
}
