//! The node's network: one node namespace that routes, one namespace per pod wired
//! CNI-ptp style (the harness's [`netns::wire_pod`]), pod IPs from the node's /24.
//!
//! The node namespace holds a link `node0` with the node's InternalIP
//! (`198.18.<subnet>.1`): the metrics and kubelet endpoints listen there, and the
//! API server reaches them (and pod IPs) through the egress socket, which dials from
//! inside this namespace. Nothing is added to the host's root namespace. Dropping
//! [`NodeNet`] kills every process left in its namespaces and deletes them.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::Mutex,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::Error;
use crate::cluster::{netns, Netns};

/// Prefix of every namespace the node agent creates; followed by its pid.
pub const NS_PREFIX: &str = "mlnode";

/// The node namespace and the pod address pool.
pub struct NodeNet {
    prefix: String,
    node: Netns,
    subnet: u8,
    free: Mutex<BTreeSet<u8>>,
}

impl NodeNet {
    /// Creates `mlnode-<pid>-node` with forwarding on and the node address on `node0`;
    /// first removes namespaces of agents that died without cleaning up.
    pub fn create(subnet: u8) -> Result<Self, Error> {
        remove_stale();
        let prefix = format!("{NS_PREFIX}-{}", std::process::id());
        let node = Netns::create(&format!("{prefix}-node"))?;
        let me = Self {
            prefix,
            node,
            subnet,
            free: Mutex::new((2..=250).collect()),
        };
        // From here on Drop cleans up whatever fails below.
        me.node.sysctl("net.ipv4.ip_forward", "1")?;
        me.node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        me.node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        // A veth pair inside the node namespace (no dummy module needed): `node0`
        // carries the node address, its peer only keeps it up.
        me.node.ip(&[
            "link", "add", "node0", "type", "veth", "peer", "name", "node0p",
        ])?;
        me.node.ip(&["link", "set", "node0p", "up"])?;
        me.node.ip(&[
            "addr",
            "add",
            &format!("{}/32", me.node_ip()),
            "dev",
            "node0",
        ])?;
        me.node.ip(&["link", "set", "node0", "up"])?;
        Ok(me)
    }

    /// Prefix of every namespace of this agent (`mlnode-<pid>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The node's InternalIP.
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }

    /// The node's pod CIDR.
    pub fn pod_cidr(&self) -> String {
        format!("198.18.{}.0/24", self.subnet)
    }

    /// Takes a free pod address.
    pub fn allocate(&self) -> Result<Ipv4Addr, Error> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let last = free.pop_first().ok_or_else(|| {
            Error::Other(format!(
                "pod CIDR {} is full (248 pods): delete pods first",
                self.pod_cidr()
            ))
        })?;
        Ok(Ipv4Addr::new(198, 18, self.subnet, last))
    }

    /// Returns a pod address to the pool.
    pub fn release(&self, ip: Ipv4Addr) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.insert(ip.octets()[3]);
    }

    /// The namespace name of a pod (`mlnode-<pid>-<namespace>.<name>`).
    pub fn pod_ns_name(&self, namespace: &str, name: &str) -> String {
        format!("{}-{namespace}.{name}", self.prefix)
    }

    /// CNI ADD: the pod's namespace, veth and routes.
    pub fn add_pod(&self, namespace: &str, name: &str, ip: Ipv4Addr) -> Result<Netns, Error> {
        let ns = Netns::create(&self.pod_ns_name(namespace, name))?;
        let veth = format!("vp{}", ip.octets()[3]);
        // A veth of an earlier pod with this address may still be going away.
        let _ = self.node.ip(&["link", "del", &veth]);
        if let Err(e) = netns::wire_pod(&self.node, &ns, &veth, ip, None) {
            delete_ns(ns.name());
            return Err(e.into());
        }
        Ok(ns)
    }

    /// CNI DEL: kills what still runs in the pod's namespace and deletes it (the veth
    /// and the node's route go with it).
    pub fn remove_pod(&self, ns: &Netns, ip: Ipv4Addr) {
        delete_ns(ns.name());
        self.release(ip);
    }

    /// Binds a TCP listener inside the node namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, Error> {
        self.node
            .enter(move || TcpListener::bind(addr))?
            .map_err(|e| Error::Other(format!("binding {addr} in the node namespace: {e}")))
    }

    /// Connects from inside the node namespace (what the API server's egress asks for).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Error> {
        self.node
            .enter(move || TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|e| Error::Other(format!("connecting to {addr} from the node: {e}")))
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        let mut all = netns::list_with_prefix(&format!("{}-", self.prefix));
        // Pods first, the node (which holds their veth ends) last.
        all.sort_by_key(|n| n.ends_with("-node"));
        for ns in all {
            delete_ns(&ns);
        }
    }
}

/// Kills every process in namespace `name`, then deletes it.
pub fn delete_ns(name: &str) {
    let ns = Netns::existing(name);
    for pid in ns.pids() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    Netns::delete(name);
}

/// Deletes namespaces of agents whose process is gone.
pub fn remove_stale() {
    for name in netns::list_with_prefix(&format!("{NS_PREFIX}-")) {
        let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                delete_ns(&name);
            }
        }
    }
}
