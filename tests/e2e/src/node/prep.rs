//! What the kubelet resolves before a container starts: its binary (the image
//! table), its environment (values, the downward API, ConfigMap and Secret keys,
//! `$(VAR)` references), its user, and the pod's volumes as files under the pod's
//! directory (ConfigMaps, Secrets, projected service-account tokens from
//! TokenRequest with the spec's audience and expiry, downward API, emptyDir).

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{ConfigMap, Container, EnvVar, Pod, Secret, ServiceAccount},
};
use kube::{api::PostParams, Api, Client};

use super::{Agent, Error};

/// How a container runs in the pod's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An init container: runs to completion before the next one.
    Init,
    /// A native sidecar (init container with `restartPolicy: Always`).
    Sidecar,
    /// An app container.
    App,
}

/// A container ready to start.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Its spec.
    pub spec: Container,
    /// Its place in the lifecycle.
    pub kind: Kind,
    /// The local binary its image maps to.
    pub bin: PathBuf,
    /// Arguments, `$(VAR)` expanded.
    pub args: Vec<String>,
    /// Environment, resolved.
    pub env: Vec<(String, String)>,
    /// User and group.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Volume mounts: (directory or file on the host, mountPath, read-only).
    pub mounts: Vec<(PathBuf, String, bool)>,
}

/// Where a command name given without a directory is found, as a container's
/// `$PATH` lookup would (containers here share the host's filesystem, and the
/// mount script opens the binary by path before mounting).
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    crate::cluster::netns::SYSTEM_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The bash script that makes a container's volume mounts in its own mount
/// namespace (`unshare --mount --propagation private`), then execs the container.
///
/// A mountPath that does not exist on the host is made without touching the host's
/// filesystem: its first existing ancestor is covered (in the container's namespace
/// only) by an overlay whose upper layer is in the pod's directory, or, without
/// overlayfs, by a tmpfs with the original entries bound back; the missing
/// directories are created there.
pub fn mount_script(mounts: &[(PathBuf, String, bool)], stage: &Path, bin: &Path) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut out = String::from(
        r#"set -e
n=0
covered=""
mnt() {
  src=$1 dst=$2 ro=$3
  if [ ! -e "$dst" ]; then
    a=$(dirname "$dst")
    while [ ! -e "$a" ]; do a=$(dirname "$a"); done
    a=$(realpath "$a")
    if [ "$a" = / ]; then
      echo "meshlet-node: cannot mount at $dst: no directory on its path exists on this host" >&2
      exit 1
    fi
    # Under a directory covered for an earlier mount: that layer is ours, just mkdir.
    mine=0
    for c in $covered; do case "$a/" in "$c"/*) mine=1 ;; esac; done
    if [ $mine = 0 ]; then
      n=$((n + 1))
      # One stage per process: exec probes run while the container's overlay is in use.
      s="$STAGE/$$-$n"
      mkdir -p "$s/upper" "$s/work" "$s/lower"
      # An overlay keeps the directory's content and takes the new directories
      # (one mount); where overlayfs is missing, a tmpfs with the entries bound back.
      if ! mount -n -t overlay overlay -o "lowerdir=$a,upperdir=$s/upper,workdir=$s/work" "$a" 2>/dev/null; then
        mount -n --rbind "$a" "$s/lower"
        mount -n -t tmpfs -o mode=755 tmpfs "$a"
        for e in "$s/lower"/* "$s/lower"/.[!.]* "$s/lower"/..?*; do
          [ -e "$e" ] || [ -L "$e" ] || continue
          b=${e##*/}
          if [ -L "$e" ]; then ln -s "$(readlink "$e")" "$a/$b"
          elif [ -d "$e" ]; then mkdir -p "$a/$b"; mount -n --rbind "$e" "$a/$b"
          else [ -e "$a/$b" ] || : >"$a/$b"; mount -n --bind "$e" "$a/$b"; fi
        done
      fi
      covered="$covered $a"
    fi
  fi
  if [ -d "$src" ]; then mkdir -p "$dst"; elif [ ! -e "$dst" ]; then mkdir -p "$(dirname "$dst")"; : >"$dst"; fi
  mount -n --bind "$src" "$dst"
  if [ "$ro" = ro ]; then mount -n -o remount,bind,ro "$dst"; fi
}
"#,
    );
    out.push_str(&format!("STAGE={}\n", q(&stage.display().to_string())));
    // The container's binary is opened first too, for the same reason: with the
    // checkout under /tmp, an emptyDir at /tmp would hide it (exit 127). The argument
    // naming it is replaced by /proc/self/fd/N, which execve follows.
    out.push_str(&format!(
        "BIN={}\nexec {{fbin}}<\"$BIN\"\n",
        q(&bin.display().to_string())
    ));
    // Every source is opened before the first mount: a mount at /tmp (an emptyDir)
    // would hide sources under /tmp; /proc/self/fd/N still names them.
    for (i, (src, _, _)) in mounts.iter().enumerate() {
        out.push_str(&format!(
            "exec {{f{i}}}<{}\n",
            q(&src.display().to_string())
        ));
    }
    for (i, (_, dst, ro)) in mounts.iter().enumerate() {
        let ro = if *ro { "ro" } else { "rw" };
        out.push_str(&format!("mnt \"/proc/self/fd/$f{i}\" {} {ro}\n", q(dst)));
    }
    for i in 0..mounts.len() {
        out.push_str(&format!("exec {{f{i}}}<&-\n"));
    }
    out.push_str(
        "args=()\nfor a in \"$@\"; do\n  if [ \"$a\" = \"$BIN\" ]; then args+=(\"/proc/self/fd/$fbin\"); else args+=(\"$a\"); fi\ndone\nexec \"${args[@]}\"\n",
    );
    out
}

/// Pod fields the downward API exposes.
struct Fields<'a> {
    pod: &'a Pod,
    ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    node: &'a str,
}

impl Fields<'_> {
    fn get(&self, path: &str) -> Option<String> {
        let m = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        let key_of = |p: &str, prefix: &str| {
            p.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        if let Some(k) = key_of(path, "metadata.labels['") {
            return m.labels.as_ref().and_then(|l| l.get(&k).cloned());
        }
        if let Some(k) = key_of(path, "metadata.annotations['") {
            return m.annotations.as_ref().and_then(|l| l.get(&k).cloned());
        }
        Some(match path {
            "metadata.name" => m.name.clone()?,
            "metadata.namespace" => m.namespace.clone()?,
            "metadata.uid" => m.uid.clone()?,
            "metadata.labels" => kv_lines(m.labels.as_ref()),
            "metadata.annotations" => kv_lines(m.annotations.as_ref()),
            "spec.nodeName" => self.node.to_string(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.podIP" | "status.podIPs" => self.ip.to_string(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.to_string(),
            _ => return None,
        })
    }
}

fn kv_lines(m: Option<&BTreeMap<String, String>>) -> String {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
    .unwrap_or_default()
}

/// Expands `$(VAR)` from `env` as the kubelet does: `$$` escapes, unknown names stay.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(close) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..1 + close];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[i..i + close + 3]),
            }
            rest = &after[close + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A resource quantity as the downward API prints it with divisor 1: CPU rounded up
/// to whole cores, memory in bytes.
pub fn resource_value(q: &str, cpu: bool) -> Option<u64> {
    let q = q.trim();
    if cpu {
        if let Some(m) = q.strip_suffix('m') {
            return Some(m.parse::<u64>().ok()?.div_ceil(1000));
        }
        return Some(q.parse::<f64>().ok()?.ceil() as u64);
    }
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (u, mul) in units {
        if let Some(n) = q.strip_suffix(u) {
            return Some(n.parse::<u64>().ok()? * mul);
        }
    }
    q.parse().ok()
}

async fn config_map(client: &Client, ns: &str, name: &str) -> Result<Option<ConfigMap>, Error> {
    Ok(Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?)
}

async fn secret(client: &Client, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    Ok(Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?)
}

fn cm_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

fn missing(what: &str, pod: &str) -> Error {
    Error::Other(format!(
        "pod {pod}: {what} not found; create it, the pod starts once it exists"
    ))
}

async fn env_of(
    client: &Client,
    c: &Container,
    fields: &Fields<'_>,
    pod_name: &str,
) -> Result<Vec<(String, String)>, Error> {
    let ns = fields.pod.metadata.namespace.clone().unwrap_or_default();
    // What a kubelet sets first, so the container's own env may override it.
    let mut env: Vec<(String, String)> = super::apiserver::env().to_vec();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            match config_map(client, &ns, &r.name).await? {
                Some(cm) => cm_data(&cm),
                None if r.optional == Some(true) => BTreeMap::new(),
                None => return Err(missing(&format!("configmap {ns}/{}", r.name), pod_name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match secret(client, &ns, &r.name).await? {
                Some(s) => secret_data(&s),
                None if r.optional == Some(true) => BTreeMap::new(),
                None => return Err(missing(&format!("secret {ns}/{}", r.name), pod_name)),
            }
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            env.push((
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(v) = value_of(client, c, e, fields, &ns, pod_name).await? {
            let v = expand(&v, &env);
            env.retain(|(k, _)| *k != e.name);
            env.push((e.name.clone(), v));
        }
    }
    Ok(env)
}

async fn value_of(
    client: &Client,
    c: &Container,
    e: &EnvVar,
    fields: &Fields<'_>,
    ns: &str,
    pod_name: &str,
) -> Result<Option<String>, Error> {
    if let Some(v) = &e.value {
        return Ok(Some(v.clone()));
    }
    let Some(from) = &e.value_from else {
        return Ok(Some(String::new()));
    };
    if let Some(f) = &from.field_ref {
        return fields.get(&f.field_path).map(Some).ok_or_else(|| {
            Error::Other(format!(
                "pod {pod_name} container {} env {}: fieldRef {} is not supported by meshlet-node",
                c.name, e.name, f.field_path
            ))
        });
    }
    if let Some(r) = &from.resource_field_ref {
        let cpu = r.resource.contains("cpu");
        let res = c.resources.clone().unwrap_or_default();
        let set = if r.resource.starts_with("limits") {
            res.limits
        } else {
            res.requests
        };
        let key = if cpu { "cpu" } else { "memory" };
        let v = set
            .and_then(|m| m.get(key).map(|q| q.0.clone()))
            .and_then(|q| resource_value(&q, cpu));
        // Unset limits read as the node's allocatable, as the kubelet reports them.
        let v = v.unwrap_or(if cpu { super::api::cpus() as u64 } else { 0 });
        return Ok(Some(v.to_string()));
    }
    if let Some(r) = &from.config_map_key_ref {
        let v = config_map(client, ns, &r.name)
            .await?
            .and_then(|cm| cm_data(&cm).remove(&r.key));
        return match v {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if r.optional == Some(true) => Ok(None),
            None => Err(missing(
                &format!("key {} of configmap {ns}/{}", r.key, r.name),
                pod_name,
            )),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let v = secret(client, ns, &r.name)
            .await?
            .and_then(|s| secret_data(&s).remove(&r.key));
        return match v {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if r.optional == Some(true) => Ok(None),
            None => Err(missing(
                &format!("key {} of secret {ns}/{}", r.key, r.name),
                pod_name,
            )),
        };
    }
    Ok(None)
}

/// Resolves every container of the pod.
pub async fn containers(
    agent: &Agent,
    pod: &Pod,
    ip: Ipv4Addr,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<Prepared>, Error> {
    let spec = pod.spec.clone().unwrap_or_default();
    let pod_name = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    );
    let fields = Fields {
        pod,
        ip,
        host_ip: agent.net.node_ip(),
        node: &agent.cfg.name,
    };
    let psc = spec.security_context.clone().unwrap_or_default();
    let mut out = Vec::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            let kind = if c.restart_policy.as_deref() == Some("Always") {
                Kind::Sidecar
            } else {
                Kind::Init
            };
            (c, kind)
        })
        .chain(spec.containers.iter().map(|c| (c, Kind::App)));
    for (c, kind) in all {
        let (bin, args) = agent.cfg.bins.resolve(c)?;
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let dir = volumes.get(&m.name).ok_or_else(|| {
                Error::Other(format!(
                    "pod {pod_name} container {}: volumeMount {} names no volume of the pod",
                    c.name, m.name
                ))
            })?;
            let src = match m.sub_path.as_deref().filter(|p| !p.is_empty()) {
                Some(sp) if !sp.split('/').any(|x| x == "..") => dir.join(sp),
                Some(sp) => {
                    return Err(Error::Other(format!(
                        "pod {pod_name} container {}: subPath {sp:?} leaves the volume",
                        c.name
                    )))
                }
                None => dir.clone(),
            };
            mounts.push((src, m.mount_path.clone(), m.read_only == Some(true)));
        }
        let env = env_of(&agent.client, c, &fields, &pod_name).await?;
        let args = args.iter().map(|a| expand(a, &env)).collect();
        let sc = c.security_context.clone().unwrap_or_default();
        let uid = sc.run_as_user.or(psc.run_as_user).unwrap_or(0);
        let gid = sc.run_as_group.or(psc.run_as_group).unwrap_or(uid);
        out.push(Prepared {
            spec: c.clone(),
            kind,
            bin,
            args,
            env,
            uid: u32::try_from(uid).unwrap_or(0),
            gid: u32::try_from(gid).unwrap_or(0),
            mounts,
        });
    }
    Ok(out)
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), Error> {
    // Keys come from the API; a path that climbs out of the volume is refused.
    if rel.split('/').any(|p| p == ".." || p.is_empty()) {
        return Err(Error::Other(format!(
            "volume path {rel:?} is not a relative path inside the volume"
        )));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| Error::Other(format!("creating {}: {e}", parent.display())))?;
    }
    fs::write(&path, data).map_err(|e| Error::Other(format!("writing {}: {e}", path.display())))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Other(format!("chmod {}: {e}", path.display())))
}

/// Writes `data` keys (or the listed `items`) into `dir`.
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    mode: u32,
) -> Result<(), Error> {
    match items {
        Some(items) => {
            for i in items {
                if let Some(v) = data.get(&i.key) {
                    write_file(dir, &i.path, v, i.mode.map(|m| m as u32).unwrap_or(mode))?;
                }
            }
        }
        None => {
            for (k, v) in data {
                write_file(dir, k, v, mode)?;
            }
        }
    }
    Ok(())
}

/// A bound service-account token from TokenRequest.
pub async fn token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> Result<String, Error> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let req: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            "expirationSeconds": expiration.unwrap_or(3600).max(600),
            "boundObjectRef": {
                "apiVersion": "v1", "kind": "Pod",
                "name": pod.metadata.name, "uid": pod.metadata.uid,
            },
        },
    }))
    .map_err(|e| Error::Other(format!("building a TokenRequest: {e}")))?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let out = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await?;
    out.status
        .map(|s| s.token)
        .ok_or_else(|| Error::Other(format!("TokenRequest for {ns}/{sa} returned no token")))
}

/// Writes every volume of the pod under `dir/volumes/<name>`; returns the
/// directory of each volume by name.
pub async fn volumes(
    agent: &Agent,
    pod: &Pod,
    ip: Ipv4Addr,
    dir: &Path,
) -> Result<(BTreeMap<String, PathBuf>, Vec<TokenFile>), Error> {
    let client = &agent.client;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let pod_name = format!("{ns}/{}", pod.metadata.name.as_deref().unwrap_or(""));
    let fields = Fields {
        pod,
        ip,
        host_ip: agent.net.node_ip(),
        node: &agent.cfg.name,
    };
    let mut out = BTreeMap::new();
    let mut tokens = Vec::new();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        let vdir = dir.join("volumes").join(&v.name);
        fs::create_dir_all(&vdir)
            .map_err(|e| Error::Other(format!("creating {}: {e}", vdir.display())))?;
        fs::set_permissions(&vdir, fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::Other(format!("chmod {}: {e}", vdir.display())))?;
        if let Some(cmv) = &v.config_map {
            let mode = cmv.default_mode.unwrap_or(0o644) as u32;
            match config_map(client, &ns, &cmv.name).await? {
                Some(cm) => write_keys(&vdir, &cm_data(&cm), cmv.items.as_ref(), mode)?,
                None if cmv.optional == Some(true) => {}
                None => return Err(missing(&format!("configmap {ns}/{}", cmv.name), &pod_name)),
            }
        } else if let Some(sv) = &v.secret {
            let name = sv.secret_name.clone().unwrap_or_default();
            let mode = sv.default_mode.unwrap_or(0o644) as u32;
            match secret(client, &ns, &name).await? {
                Some(s) => write_keys(&vdir, &secret_data(&s), sv.items.as_ref(), mode)?,
                None if sv.optional == Some(true) => {}
                None => return Err(missing(&format!("secret {ns}/{name}"), &pod_name)),
            }
        } else if let Some(pv) = &v.projected {
            let mode = pv.default_mode.unwrap_or(0o644) as u32;
            for src in pv.sources.iter().flatten() {
                if let Some(t) = &src.service_account_token {
                    let tok =
                        token(client, pod, t.audience.as_deref(), t.expiration_seconds).await?;
                    write_file(&vdir, &t.path, tok.as_bytes(), mode)?;
                    tokens.push(TokenFile {
                        path: vdir.join(&t.path),
                        audience: t.audience.clone(),
                        expiration: t.expiration_seconds,
                        mode,
                    });
                }
                if let Some(c) = &src.config_map {
                    match config_map(client, &ns, &c.name).await? {
                        Some(cm) => write_keys(&vdir, &cm_data(&cm), c.items.as_ref(), mode)?,
                        None if c.optional == Some(true) => {}
                        None => {
                            return Err(missing(&format!("configmap {ns}/{}", c.name), &pod_name))
                        }
                    }
                }
                if let Some(s) = &src.secret {
                    match secret(client, &ns, &s.name).await? {
                        Some(sec) => write_keys(&vdir, &secret_data(&sec), s.items.as_ref(), mode)?,
                        None if s.optional == Some(true) => {}
                        None => return Err(missing(&format!("secret {ns}/{}", s.name), &pod_name)),
                    }
                }
                if let Some(d) = &src.downward_api {
                    for i in d.items.iter().flatten() {
                        if let Some(v) =
                            i.field_ref.as_ref().and_then(|f| fields.get(&f.field_path))
                        {
                            write_file(&vdir, &i.path, v.as_bytes(), mode)?;
                        }
                    }
                }
            }
        } else if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644) as u32;
            for i in d.items.iter().flatten() {
                if let Some(val) = i.field_ref.as_ref().and_then(|f| fields.get(&f.field_path)) {
                    write_file(&vdir, &i.path, val.as_bytes(), mode)?;
                }
            }
        } else if v.empty_dir.is_some() {
            fs::set_permissions(&vdir, fs::Permissions::from_mode(0o1777))
                .map_err(|e| Error::Other(format!("chmod {}: {e}", vdir.display())))?;
        }
        out.insert(v.name.clone(), vdir);
    }
    Ok((out, tokens))
}

/// A projected service-account token file, refreshed before it expires.
#[derive(Clone, Debug)]
pub struct TokenFile {
    /// Where it is on the host.
    pub path: PathBuf,
    /// Its audience.
    pub audience: Option<String>,
    /// Its lifetime in seconds as the spec asks.
    pub expiration: Option<i64>,
    /// File mode.
    pub mode: u32,
}

/// Replaces token files with fresh ones once 80% of their lifetime has passed, as
/// the kubelet does, until `stop` says the pod is gone. The new file is renamed over
/// the old one, so a reader never sees half a token.
pub async fn refresh_tokens(
    client: Client,
    pod: Pod,
    tokens: Vec<TokenFile>,
    every: Option<std::time::Duration>,
    stop: impl Fn() -> bool,
) {
    if tokens.is_empty() {
        return;
    }
    let life = tokens
        .iter()
        .map(|t| t.expiration.unwrap_or(3600).max(600) as u64)
        .min()
        .unwrap_or(3600);
    let every = every.unwrap_or(std::time::Duration::from_secs(life * 8 / 10));
    loop {
        let deadline = tokio::time::Instant::now() + every;
        while tokio::time::Instant::now() < deadline {
            if stop() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        for t in &tokens {
            let res = async {
                let tok = token(&client, &pod, t.audience.as_deref(), t.expiration).await?;
                let tmp = t.path.with_extension("meshlet-new");
                fs::write(&tmp, tok.as_bytes())
                    .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(t.mode)))
                    .and_then(|_| fs::rename(&tmp, &t.path))
                    .map_err(|e| Error::Other(format!("writing {}: {e}", t.path.display())))
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(path = %t.path.display(), error = %e, "token refresh");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("a$b", &env), "a$b");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn resource_quantities() {
        assert_eq!(resource_value("100m", true), Some(1));
        assert_eq!(resource_value("2", true), Some(2));
        assert_eq!(resource_value("1500m", true), Some(2));
        assert_eq!(resource_value("128Mi", false), Some(128 << 20));
        assert_eq!(resource_value("1G", false), Some(1_000_000_000));
        assert_eq!(resource_value("junk", false), None);
    }

    #[test]
    fn mount_script_quotes_and_execs() {
        let s = mount_script(
            &[("/v/tok".into(), "/var/run/secrets/x's".into(), true)],
            Path::new("/p/stage"),
            Path::new("/tmp/checkout/target/debug/app"),
        );
        assert!(s.contains("STAGE='/p/stage'"), "{s}");
        assert!(
            s.contains("BIN='/tmp/checkout/target/debug/app'\nexec {fbin}<\"$BIN\"\n"),
            "{s}"
        );
        assert!(s.contains("exec {f0}<'/v/tok'\n"), "{s}");
        assert!(
            s.contains("mnt \"/proc/self/fd/$f0\" '/var/run/secrets/x'\\''s' ro"),
            "{s}"
        );
        assert!(s.ends_with("exec \"${args[@]}\"\n"), "{s}");
    }

    #[test]
    fn volume_paths_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        assert!(write_file(d.path(), "../x", b"", 0o644).is_err());
        write_file(d.path(), "a/b", b"hi", 0o600).unwrap();
        assert_eq!(fs::read(d.path().join("a/b")).unwrap(), b"hi");
    }
}
