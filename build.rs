//! Sets `ACGI_BRIDGE_VERSION`, what `--version` prints: the crate's version and the git commit
//! it is built from, `0.1.0 (7f87202)`. Without git, or outside a repository (a crate tarball),
//! it is the crate's version alone: the build never fails for want of git. A packager building
//! from a tarball can name the commit in `ACGI_BRIDGE_GIT_COMMIT`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ACGI_BRIDGE_GIT_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets it");
    let commit = std::env::var("ACGI_BRIDGE_GIT_COMMIT")
        .ok()
        .filter(|commit| !commit.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    match &commit {
        Some(commit) => println!("cargo:rustc-env=ACGI_BRIDGE_VERSION={version} ({commit})"),
        None => println!("cargo:rustc-env=ACGI_BRIDGE_VERSION={version}"),
    }
    if commit.is_none() || std::env::var_os("ACGI_BRIDGE_GIT_COMMIT").is_some() {
        return;
    }
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points at (a commit),
    // and packed-refs (where a branch may live after gc). Paths from git, so that worktrees work.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
