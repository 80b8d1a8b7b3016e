//! Fills /__version__'s `commit` and `build` at build time: from EVENTS_GATEWAY_COMMIT and
//! EVENTS_GATEWAY_BUILD when set (the container build passes them), else from git (the
//! commit id and its date, so that the same commit always builds the same binary).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=EVENTS_GATEWAY_COMMIT");
    println!("cargo:rerun-if-env-changed=EVENTS_GATEWAY_BUILD");
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed=.git/{head}");
    }
    if std::env::var("EVENTS_GATEWAY_COMMIT").is_err()
        && let Some(commit) = git(&["rev-parse", "HEAD"])
    {
        println!("cargo:rustc-env=EVENTS_GATEWAY_COMMIT={commit}");
    }
    if std::env::var("EVENTS_GATEWAY_BUILD").is_err()
        && let Some(date) = git(&["log", "-1", "--format=%cI"])
    {
        println!("cargo:rustc-env=EVENTS_GATEWAY_BUILD={date}");
    }
}
