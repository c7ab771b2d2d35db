//! Validates every injected output (our goldens and the shared corpus) against the
//! Kubernetes OpenAPI schemas of 1.29 (first release with native sidecars on by default)
//! and 1.33, in strict mode so a misspelt field fails. Needs `kubernetes-validate`:
//! `python3 -m venv .venv && .venv/bin/pip install kubernetes-validate` at the repo root
//! (or `scripts/tools.sh ensure_validator`), or its path in `KUBERNETES_VALIDATE`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use meshlet_injector::{offline::inject_yaml, Defaults, DefaultsArgs};

fn validator() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/kubernetes-validate");
    assert!(
        venv.exists(),
        "kubernetes-validate is missing (looked for {}); install it with \
         `python3 -m venv .venv && .venv/bin/pip install kubernetes-validate` in the repo root \
         (or run scripts/tools.sh ensure_validator), or set KUBERNETES_VALIDATE to its path",
        venv.display()
    );
    venv
}

fn inputs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        root.join("tests/testdata/inject"),
        root.join("../../shared/corpus/manifests"),
    ] {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for e in entries {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if (name.ends_with(".yaml") || name.ends_with(".yml")) && !name.starts_with("error-") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn classic_defaults() -> Defaults {
    use clap::Parser;
    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        d: DefaultsArgs,
    }
    A::parse_from([
        "x",
        "--native-sidecar=false",
        "--image-pull-policy=IfNotPresent",
    ])
    .d
    .to_defaults()
    .unwrap()
}

#[test]
fn injected_outputs_match_the_kubernetes_schemas() {
    let validator = validator();
    let out_dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    // Both sidecar layouts: native (default) and classic, so both templates are checked.
    for (tag, defaults) in [
        ("native", Defaults::default()),
        ("classic", classic_defaults()),
    ] {
        for input in inputs() {
            let text = std::fs::read_to_string(&input).unwrap();
            let out = inject_yaml(&text, &defaults)
                .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            let name = format!("{tag}-{}", input.file_name().unwrap().to_string_lossy());
            let path = out_dir.path().join(name);
            std::fs::write(&path, out).unwrap();
            outputs.push(path);
        }
    }
    for version in ["1.29.0", "1.33.0"] {
        let result = Command::new(&validator)
            .args(["-k", version, "--strict", "--quiet"])
            .args(&outputs)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", validator.display()));
        assert!(
            result.status.success(),
            "schema validation against Kubernetes {version} failed:\n{}{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}
