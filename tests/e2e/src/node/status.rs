//! Pod status as the kubelet writes it: phase, pod IPs, host IPs, conditions
//! (PodReadyToStartContainers, Initialized, ContainersReady, Ready, PodScheduled),
//! and container statuses for init containers (sidecars included) and app
//! containers; and the final delete once a deleted pod's containers are gone.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    api::now,
    lock,
    pod::{CState, PodShared, PodState, Run, Terminated},
    prep::Kind,
    Agent,
};

fn terminated(t: &Terminated) -> Value {
    json!({"terminated": {
        "exitCode": t.exit_code,
        "signal": t.signal,
        "reason": t.reason,
        "startedAt": t.started,
        "finishedAt": t.finished,
    }})
}

fn container(c: &CState, uid: &str) -> Value {
    let state = match &c.run {
        Run::Waiting(reason, msg) => json!({"waiting": {"reason": reason, "message": msg}}),
        Run::Running(t) => json!({"running": {"startedAt": t}}),
        Run::Terminated(t) => terminated(t),
    };
    let mut v = json!({
        "name": c.name,
        "image": c.image,
        "imageID": format!("meshlet://{}", c.image),
        "state": state,
        "lastState": c.last.as_ref().map(terminated).unwrap_or_else(|| json!({})),
        "ready": c.ready,
        "started": c.started && matches!(c.run, Run::Running(_)),
        "restartCount": c.restarts,
    });
    if let Some(pid) = c.pid {
        v["containerID"] = json!(format!("meshlet://{uid}/{}/{pid}", c.name));
    }
    v
}

/// The `status` object of a pod.
pub fn build(s: &mut PodState, uid: &str) -> Value {
    let non_init: Vec<&CState> = s
        .containers
        .iter()
        .filter(|c| c.kind != Kind::Init)
        .collect();
    let containers_ready =
        s.initialized && !non_init.is_empty() && non_init.iter().all(|c| c.ready);
    let t = now();
    let mut cond = |ty: &str, ok: bool| {
        let e = s
            .transitions
            .entry(ty.to_string())
            .or_insert_with(|| (ok, t.clone()));
        if e.0 != ok {
            *e = (ok, t.clone());
        }
        json!({"type": ty, "status": if ok {"True"} else {"False"}, "lastTransitionTime": e.1})
    };
    let conditions = vec![
        cond("PodReadyToStartContainers", s.net_ready),
        cond("Initialized", s.initialized),
        cond("ContainersReady", containers_ready),
        cond("Ready", containers_ready),
        cond("PodScheduled", true),
    ];
    let mut v = json!({
        "phase": s.phase,
        "conditions": conditions,
        "initContainerStatuses": s.containers.iter().filter(|c| c.kind != Kind::App).map(|c| container(c, uid)).collect::<Vec<_>>(),
        "containerStatuses": s.containers.iter().filter(|c| c.kind == Kind::App).map(|c| container(c, uid)).collect::<Vec<_>>(),
        "message": s.message,
    });
    if let Some(ip) = s.ip {
        v["podIP"] = json!(ip.to_string());
        v["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if let Some(st) = &s.start_time {
        v["startTime"] = json!(st);
    }
    v
}

/// Writes pod statuses as workers report changes (coalesced per pod), and removes
/// the pod object (grace 0, this uid) once a deleted pod's worker is done.
pub async fn writer(
    agent: Agent,
    mut rx: mpsc::UnboundedReceiver<Arc<PodShared>>,
) -> Result<(), super::Error> {
    let host_ip = agent.net.node_ip().to_string();
    while let Some(first) = rx.recv().await {
        let mut batch: HashMap<String, Arc<PodShared>> = HashMap::new();
        batch.insert(first.uid.clone(), first);
        while let Ok(more) = rx.try_recv() {
            batch.insert(more.uid.clone(), more);
        }
        for (uid, p) in batch {
            let api: Api<Pod> = Api::namespaced(agent.client.clone(), &p.namespace);
            if p.gone() {
                lock(&agent.pods).remove(&uid);
                lock(&agent.first_seen).remove(&uid);
                if p.deadline().is_some() && !p.deleted() {
                    let pod = lock(&p.state).pod.clone();
                    super::final_delete(agent.client.clone(), pod).await;
                }
                continue;
            }
            let mut status = build(&mut lock(&p.state), &uid);
            status["hostIP"] = json!(host_ip);
            status["hostIPs"] = json!([{"ip": host_ip}]);
            let patch = json!({"metadata": {"uid": uid}, "status": status});
            if let Err(e) = api
                .patch_status(&p.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(pod = %format!("{}/{}", p.namespace, p.name), error = %e, "status update");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_containers() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {
                "initContainers": [
                    {"name": "init", "image": "meshlet-proxy"},
                    {"name": "proxy", "image": "meshlet-proxy", "restartPolicy": "Always"},
                ],
                "containers": [{"name": "app", "image": "meshlet-testapp"}],
            },
        }))
        .unwrap();
        let shared = PodShared::new(&pod);
        let mut s = lock(&shared.state);
        let v = build(&mut s, "u1");
        assert_eq!(v["phase"], "Pending");
        assert_eq!(v["initContainerStatuses"].as_array().unwrap().len(), 2);
        assert_eq!(v["containerStatuses"][0]["name"], "app");
        assert!(v.get("podIP").is_none());
        let ready = |v: &Value| {
            v["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()["status"]
                .clone()
        };
        assert_eq!(ready(&v), "False");
        s.ip = Some("198.18.7.2".parse().unwrap());
        s.net_ready = true;
        s.initialized = true;
        s.phase = "Running";
        for c in &mut s.containers {
            c.run = Run::Running(now());
            c.ready = c.kind != Kind::Init;
            c.started = true;
            c.pid = Some(42);
        }
        let v = build(&mut s, "u1");
        assert_eq!(v["podIP"], "198.18.7.2");
        assert_eq!(ready(&v), "True");
        assert_eq!(v["containerStatuses"][0]["started"], true);
        assert_eq!(
            v["containerStatuses"][0]["containerID"],
            "meshlet://u1/app/42"
        );
        // A sidecar that is not ready keeps the pod unready.
        s.containers[1].ready = false;
        assert_eq!(ready(&build(&mut s, "u1")), "False");
    }
}
