//! `cargo run -p xtask -- dist DIR`: write the man pages (`DIR/man/*.1`, one for the binary
//! and one per subcommand) and the bash, zsh and fish completions (`DIR/completions/`) of
//! `acgi-bridge`, generated from its clap definitions (`acgi_bridge::cli`), so that they can
//! never disagree with what the binary parses. The .deb (`dist/check-deb.sh`) ships them.
//!
//! A separate crate so that the daemon does not depend on clap_mangen and clap_complete.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::CommandFactory;
use clap_complete::Shell;

/// The binary's name, as man pages and completions must spell it.
const BIN: &str = "acgi-bridge";

/// What `dist` writes: the files, by kind.
#[derive(Debug)]
pub struct Dist {
    pub man_pages: Vec<PathBuf>,
    pub completions: Vec<PathBuf>,
}

/// Write the man pages and completions under `out` (created if missing).
pub fn dist(out: &Path) -> anyhow::Result<Dist> {
    let man_dir = out.join("man");
    let completions_dir = out.join("completions");
    for dir in [&man_dir, &completions_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let command = acgi_bridge::cli::Cli::command();
    clap_mangen::generate_to(command.clone(), &man_dir)
        .with_context(|| format!("writing man pages into {}", man_dir.display()))?;
    let mut man_pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    man_pages.sort();
    let mut completions = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = command.clone();
        let path = clap_complete::generate_to(shell, &mut command, BIN, &completions_dir)
            .with_context(|| format!("writing the {shell} completion"))?;
        completions.push(path);
    }
    Ok(Dist {
        man_pages,
        completions,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, out] if task == "dist" => {
            let written = dist(Path::new(out))?;
            for path in written.man_pages.iter().chain(&written.completions) {
                println!("{}", path.display());
            }
            Ok(())
        }
        _ => bail!("usage: cargo run -p xtask -- dist DIR   (man pages and shell completions)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every visible subcommand of the binary, by name.
    fn subcommands() -> Vec<String> {
        acgi_bridge::cli::Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_string())
            .collect()
    }

    #[test]
    fn dist_writes_a_man_page_per_subcommand_and_three_completions() {
        // Proves generation works and the pages and completions name every subcommand.
        let out = tempfile::tempdir().unwrap();
        let written = dist(out.path()).unwrap();
        let names = subcommands();
        assert!(names.len() >= 4, "{names:?}");
        let main_page = std::fs::read_to_string(out.path().join("man/acgi-bridge.1")).unwrap();
        assert!(main_page.starts_with(".ie"), "not roff: {main_page:.80}");
        assert!(main_page.contains(".TH acgi-bridge 1"), "{main_page:.200}");
        for name in &names {
            // Subcommands are listed as `acgi\-bridge\-serve(1)` in the main page (roff escapes
            // every hyphen: `kill\-worker`).
            let listed = format!("acgi\\-bridge\\-{}(1)", name.replace('-', "\\-"));
            assert!(
                main_page.contains(&listed),
                "the main page does not list {name}:\n{main_page}"
            );
            let page = out.path().join(format!("man/acgi-bridge-{name}.1"));
            assert!(written.man_pages.contains(&page), "{page:?} not written");
            let text = std::fs::read_to_string(&page).unwrap();
            assert!(text.contains(".SH SYNOPSIS"), "{page:?}");
        }
        let check = std::fs::read_to_string(out.path().join("man/acgi-bridge-check.1")).unwrap();
        assert!(
            check.contains("The config file to validate"),
            "check -c has no help: {check}"
        );
        for file in ["acgi-bridge.bash", "_acgi-bridge", "acgi-bridge.fish"] {
            let path = out.path().join("completions").join(file);
            assert!(written.completions.contains(&path), "{path:?} not written");
            let text = std::fs::read_to_string(&path).unwrap();
            for name in &names {
                assert!(text.contains(name.as_str()), "{file} lacks {name}");
            }
        }
    }
}
