#!/usr/bin/env python3
"""Structural checks of Dockerfile.proxy, Dockerfile.injector and .dockerignore
(called by scripts/test-dockerfiles.sh; no container engine is needed).

    dockerfile_check.py REPO_ROOT [DIR]

DIR (default REPO_ROOT) holds the Dockerfiles and .dockerignore; the tests
point it at mutated copies to prove that the checks fail.

Prints `ok NAME` or `FAIL NAME: why` per check; the caller counts them. The
workspace's packages and [[bin]] targets come from `cargo metadata`, so a
renamed binary or a new workspace member breaks these checks instead of the
image build.
"""

import json
import os
import re
import shlex
import subprocess
import sys

# What each image must ship, and the user its final stage runs as
# (DESIGN.md: the proxy is UID 1337, the injector a distroless nonroot user).
IMAGES = {
    "Dockerfile.proxy": {"bins": {"meshlet-proxy", "meshlet-init"}, "user": "1337", "apt": ["iptables"]},
    "Dockerfile.injector": {"bins": {"meshlet-injector"}, "user": "65532", "apt": []},
}

results = []


def check(name, cond, why=""):
    results.append((name, bool(cond), why))
    return cond


def workspace(root):
    out = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
                         cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"FAIL cargo metadata: {out.stderr.strip()}")
    meta = json.loads(out.stdout)
    members = {}
    for p in meta["packages"]:
        rel = os.path.relpath(os.path.dirname(p["manifest_path"]), meta["workspace_root"])
        members[p["name"]] = {"dir": rel, "bins": {t["name"] for t in p["targets"] if "bin" in t["kind"]}}
    return members


def instructions(text):
    """Dockerfile instructions as (KEYWORD, args) with continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        cur += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            kw, _, rest = cur.strip().partition(" ")
            out.append((kw.upper(), rest.strip()))
            cur = ""
    return out


def resolve(ref, args):
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)


def check_dockerfile(root, name, spec, members):
    path = os.path.join(root, name)
    if not check(f"{name}: exists", os.path.isfile(path), "file is missing"):
        return
    with open(path) as f:
        ins = instructions(f.read())
    args, stages = {}, []
    for kw, rest in ins:
        if kw == "ARG" and not stages and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        if kw == "FROM":
            parts = rest.split()
            stages.append({"image": resolve(parts[0], args),
                           "alias": parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None,
                           "ins": []})
        elif stages:
            stages[-1]["ins"].append((kw, rest))

    check(f"{name}: multi-stage (builder + runtime)", len(stages) >= 2, f"{len(stages)} stage(s)")
    for st in stages:
        img = st["image"]
        ref = img.split("@")[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        check(f"{name}: FROM {img} is pinned by tag", tag and tag != "latest" and "$" not in img,
              "no tag, `latest`, or an unresolved ARG")
    if len(stages) < 2:
        return
    build, final = stages[0], stages[-1]
    check(f"{name}: builder is a pinned Rust {os.environ.get('RUST_MINOR', '1.95')} image",
          re.search(r"/rust:1\.95(\.\d+)?-", build["image"]), build["image"])

    runs = [r for k, r in build["ins"] if k == "RUN"]
    cargo_builds = [r for r in runs if "cargo build" in r]
    check(f"{name}: cargo build --release --locked", cargo_builds and all("--release" in r and "--locked" in r for r in cargo_builds),
          "every cargo build must be --release --locked")

    # Cache-friendly order: manifests, cargo fetch, then the sources.
    copies = [(i, r) for i, (k, r) in enumerate(build["ins"]) if k == "COPY"]
    fetch_at = next((i for i, (k, r) in enumerate(build["ins"]) if k == "RUN" and "cargo fetch" in r), None)
    src_at = next((i for i, r in copies if r.split()[-2:] == [".", "."]), None)
    check(f"{name}: cargo fetch runs before the sources are copied",
          fetch_at is not None and src_at is not None and fetch_at < src_at, "expected COPY manifests, RUN cargo fetch, COPY . .")
    copied = set()
    for i, r in copies:
        if fetch_at is not None and i < fetch_at:
            copied |= {p for p in shlex.split(r)[:-1] if not p.startswith("--")}
    want = {"Cargo.toml", "Cargo.lock"} | {f"{m['dir']}/Cargo.toml" for m in members.values()}
    check(f"{name}: every workspace manifest is copied before the fetch", want <= copied,
          f"missing {sorted(want - copied)}")
    fetch = build["ins"][fetch_at][1] if fetch_at is not None else ""
    stub = re.search(r"for d in ([^;]+);", fetch)
    stub_dirs = set(stub.group(1).split()) if stub else set()
    check(f"{name}: the fetch stubs every workspace member", stub_dirs == {m["dir"] for m in members.values()},
          f"stubs {sorted(stub_dirs)} vs members {sorted(m['dir'] for m in members.values())}")

    # Binaries: built with -p of the package that owns them, shipped by name.
    all_bins = {b: pkg for pkg, m in members.items() for b in m["bins"]}
    built_pkgs = set()
    for r in cargo_builds:
        built_pkgs |= set(re.findall(r"-p\s+(\S+)", r))
    for pkg in built_pkgs:
        check(f"{name}: -p {pkg} is a workspace package", pkg in members, "unknown package")
    release_bins = set(re.findall(r"target/(?:\S+/)?release/([A-Za-z0-9_-]+)", " ".join(runs)))
    final_copies = [r for k, r in final["ins"] if k == "COPY"]
    shipped = set()
    for r in final_copies:
        parts = shlex.split(r)
        if parts and parts[0].startswith("--from="):
            check(f"{name}: runtime copies from the builder stage", parts[0][7:] in (build["alias"], "0"), r)
            shipped |= {os.path.basename(p) for p in parts[1:-1]}
    for b in sorted(shipped | release_bins):
        check(f"{name}: {b} is a [[bin]] of the workspace", b in all_bins, f"bins are {sorted(all_bins)}")
        if b in all_bins:
            check(f"{name}: {b} is built (-p {all_bins[b]})", all_bins[b] in built_pkgs, f"built: {sorted(built_pkgs)}")
    check(f"{name}: ships {sorted(spec['bins'])}", shipped == spec["bins"] and spec["bins"] <= release_bins,
          f"ships {sorted(shipped)}, installs from target/release {sorted(release_bins)}")

    users = [r for k, r in final["ins"] if k == "USER"]
    user = users[-1].split(":")[0] if users else ""
    check(f"{name}: final stage runs as non-root USER {spec['user']}", user == spec["user"],
          f"USER is {user or 'unset (root)'}")
    check(f"{name}: final stage has an ENTRYPOINT", any(k == "ENTRYPOINT" for k, _ in final["ins"]), "")
    apt = " ".join(r for k, r in final["ins"] if k == "RUN")
    for pkg in spec["apt"]:
        check(f"{name}: runtime installs {pkg}", re.search(rf"apt-get install[^&]*\b{pkg}\b", apt), "not installed")
    if spec["apt"]:
        check(f"{name}: apt lists are cleaned", "rm -rf /var/lib/apt/lists" in apt, "image keeps apt lists")


def check_dockerignore(root):
    path = os.path.join(root, ".dockerignore")
    if not check(".dockerignore exists", os.path.isfile(path), "missing"):
        return
    with open(path) as f:
        pats = {l.strip() for l in f if l.strip() and not l.startswith("#")}
    for want in ("target/", ".git/", ".venv/"):
        check(f".dockerignore excludes {want}", want in pats or want.rstrip("/") in pats, "not excluded")
    # Whatever the build needs must stay in the context.
    for need in ("Cargo.toml", "Cargo.lock", "api/", "proxy/", "init/", "injector/"):
        check(f".dockerignore keeps {need}", not any(p.rstrip("/") == need.rstrip("/") for p in pats), "excluded")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    files = sys.argv[2] if len(sys.argv) > 2 else root
    members = workspace(root)
    for name, spec in IMAGES.items():
        check_dockerfile(files, name, spec, members)
    check_dockerignore(files)
    for name, ok, why in results:
        print(f"ok {name}" if ok else f"FAIL {name}: {why}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
