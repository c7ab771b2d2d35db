//! One status writer among the injector replicas: a `coordination.k8s.io` Lease, held
//! the way client-go's leader election holds it. Every replica compiles and serves the
//! document; only the holder writes route status, so replicas of two versions during a
//! rollout never take turns rewriting each other's conditions.
//!
//! Expiry is judged by the local clock from when this replica last saw the Lease
//! change (not by comparing the holder's renewTime with our clock), so clock skew
//! between nodes cannot make two holders.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, PostParams},
    Client,
};

/// Name of the Lease the controllers share.
pub const LEASE_NAME: &str = "meshlet-controller";

/// Where the Lease is and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// Namespace of the Lease (the control plane's).
    pub namespace: String,
    /// This replica's name in `holderIdentity` (the pod name).
    pub identity: String,
    /// How long a Lease nobody renews stays held.
    pub duration: Duration,
}

impl LeaseOptions {
    /// From the pod's environment (`MESHLET_POD_NAMESPACE`, `MESHLET_POD_NAME`, which
    /// the chart sets); `None` outside a pod.
    pub fn from_env() -> Option<Self> {
        let namespace = std::env::var("MESHLET_POD_NAMESPACE").ok()?;
        let identity = std::env::var("MESHLET_POD_NAME").ok()?;
        Some(Self {
            namespace,
            identity,
            duration: Duration::from_secs(15),
        })
    }
}

/// What the Lease as read means for this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nobody holds it: create it.
    Create,
    /// Ours: renew it.
    Renew,
    /// Another holder stopped renewing: take it over.
    TakeOver,
    /// Another holder renews it: wait.
    Follow,
}

/// Decides from the Lease's holder and how long ago it last changed (as seen here).
pub fn step(lease: Option<&Lease>, me: &str, unchanged_for: Duration, duration: Duration) -> Step {
    let Some(lease) = lease else {
        return Step::Create;
    };
    let spec = lease.spec.as_ref();
    match spec.and_then(|s| s.holder_identity.as_deref()) {
        Some(h) if h == me => Step::Renew,
        None | Some("") => Step::TakeOver,
        Some(_) => {
            let held_for = spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map_or(duration, Duration::from_secs);
            if unchanged_for > held_for {
                Step::TakeOver
            } else {
                Step::Follow
            }
        }
    }
}

/// Holds the Lease when it can; `leader` says whether this replica holds it, and
/// `gained` runs when it becomes the holder (so status gets written at once).
pub async fn run(
    client: Client,
    options: LeaseOptions,
    leader: Arc<AtomicBool>,
    gained: impl Fn() + Send + 'static,
) {
    let api = Api::<Lease>::namespaced(client, &options.namespace);
    let mut seen: Option<(String, Instant)> = None;
    let every = options.duration / 3;
    loop {
        let held = match api.get_opt(LEASE_NAME).await {
            Ok(current) => {
                // The record changes on every renewal; its resourceVersion tells when.
                let version = current
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone())
                    .unwrap_or_default();
                if seen.as_ref().is_none_or(|(v, _)| *v != version) {
                    seen = Some((version, Instant::now()));
                }
                let unchanged_for = seen.as_ref().map_or(Duration::ZERO, |(_, t)| t.elapsed());
                let action = step(
                    current.as_ref(),
                    &options.identity,
                    unchanged_for,
                    options.duration,
                );
                match action {
                    Step::Follow => false,
                    _ => write(&api, current, &options, action).await,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the controller Lease; not writing route status meanwhile");
                false
            }
        };
        let was = leader.swap(held, Ordering::SeqCst);
        if held && !was {
            tracing::info!(identity = %options.identity, "holding the controller Lease: this replica writes route status");
            gained();
        } else if was && !held {
            tracing::info!(identity = %options.identity, "lost the controller Lease");
        }
        tokio::time::sleep(every).await;
    }
}

/// Creates, renews or takes over the Lease; true when this replica holds it after.
async fn write(api: &Api<Lease>, current: Option<Lease>, o: &LeaseOptions, action: Step) -> bool {
    let now = MicroTime(Timestamp::now());
    let seconds = i32::try_from(o.duration.as_secs()).unwrap_or(15);
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    namespace: Some(o.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(o.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            // The resourceVersion read above makes the replace conditional: of two
            // replicas taking over at once, one gets 409.
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if action == Step::TakeOver {
                spec.holder_identity = Some(o.identity.clone());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(seconds);
            spec.renew_time = Some(now);
            api.replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
        }
    };
    match result {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 409 => false,
        Err(error) => {
            tracing::warn!(%error, "cannot write the controller Lease; the chart's Role grants leases get/create/update in its namespace");
            false
        }
    }
}
