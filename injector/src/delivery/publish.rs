//! Publishes a mesh config document from files into the watch channel the delivery
//! router serves: the stand-in for the config controller when there is no API server
//! (demo, tests, users who keep manifests in git).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use meshlet_api::MeshConfig;
use tokio::{sync::watch, task::JoinHandle};

use crate::compile::{self, CompileError};

/// Where the document comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of Kubernetes manifests, compiled as `compile --from-files` does.
    Manifests(PathBuf),
    /// A compiled mesh config document (JSON).
    Document(PathBuf),
}

/// Why the source cannot give a document.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The manifests do not compile.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The document file cannot be read.
    #[error("cannot read the mesh config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The document file is not a valid mesh config.
    #[error("refusing the mesh config {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: meshlet_api::config::ConfigError,
    },
}

// === impl Source ===

impl Source {
    /// Reads (and for manifests compiles) the document once.
    pub fn load(&self) -> Result<MeshConfig, PublishError> {
        match self {
            Self::Manifests(dir) => {
                let compiled = compile::compile_dir(dir)?;
                for p in &compiled.problems {
                    tracing::warn!(problem = %p, "route left out");
                }
                for b in &compiled.bad_annotations {
                    tracing::warn!(problem = %b, "Service annotation refused");
                }
                Ok(compiled.config)
            }
            Self::Document(path) => read_document(path),
        }
    }
}

fn read_document(path: &Path) -> Result<MeshConfig, PublishError> {
    let bytes = std::fs::read(path).map_err(|source| PublishError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    MeshConfig::from_json(&bytes).map_err(|source| PublishError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `source` (an error here is fatal: there is nothing to serve) and re-loads it
/// every `every`, publishing each change with the next generation. A source that
/// breaks later is logged and the last good document stays published.
pub fn publish(
    source: Source,
    every: Duration,
) -> Result<(watch::Receiver<Arc<MeshConfig>>, JoinHandle<()>), PublishError> {
    let mut first = source.load()?;
    first.generation = first.generation.max(1);
    tracing::info!(
        generation = first.generation,
        services = first.services.len(),
        ?source,
        "mesh config published"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failing: Option<String> = None;
        loop {
            tick.tick().await;
            // Compiling reads many files: keep it off the async workers.
            let s = source.clone();
            let loaded = match tokio::task::spawn_blocking(move || s.load()).await {
                Ok(l) => l,
                Err(_) => continue,
            };
            match loaded {
                Ok(next) => {
                    failing = None;
                    let cur = tx.borrow().clone();
                    if let Some(doc) = successor(&cur, next) {
                        tracing::info!(
                            generation = doc.generation,
                            services = doc.services.len(),
                            "mesh config published"
                        );
                        tx.send_replace(Arc::new(doc));
                    }
                }
                Err(error) => {
                    let msg = error.to_string();
                    if failing.as_deref() != Some(&msg) {
                        tracing::warn!(%error, "keeping the last good mesh config published");
                        failing = Some(msg);
                    }
                }
            }
        }
    });
    Ok((rx, task))
}

/// `next` as the successor of `cur` when it differs in more than the generation.
fn successor(cur: &MeshConfig, mut next: MeshConfig) -> Option<MeshConfig> {
    next.generation = cur.generation;
    if next == *cur {
        return None;
    }
    next.generation = cur.generation + 1;
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                       spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";

    #[tokio::test]
    async fn republishes_changes_with_the_next_generation_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), SVC).unwrap();
        let (mut rx, task) = publish(
            Source::Manifests(dir.path().into()),
            Duration::from_millis(20),
        )
        .unwrap();
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.services[0].name, "web");
        let g = first.generation;

        std::fs::write(
            dir.path().join("svc.yaml"),
            SVC.replace("port: 80", "port: 81"),
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let second = rx.borrow_and_update().clone();
        assert_eq!(second.services[0].ports[0].port, 81);
        assert_eq!(second.generation, g + 1);

        // A broken file publishes nothing; the last good document stays.
        std::fs::write(dir.path().join("svc.yaml"), "kind: [").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!rx.has_changed().unwrap(), "nothing published");
        assert_eq!(rx.borrow().services[0].ports[0].port, 81);
        task.abort();
    }

    #[test]
    fn unchanged_content_is_not_a_successor() {
        let a = MeshConfig {
            generation: 4,
            ..Default::default()
        };
        assert!(successor(&a, MeshConfig::default()).is_none());
        let b = MeshConfig {
            opaque_ports: Some(vec![9]),
            ..Default::default()
        };
        assert_eq!(successor(&a, b).unwrap().generation, 5);
        assert!(matches!(
            Source::Document("/nonexistent.json".into()).load(),
            Err(PublishError::Read { .. })
        ));
    }
}
