//! What the end-to-end tests share: the binary, the repository root, and running a command
//! that must succeed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn vsft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vsft"))
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `cmd`, failing the test with its stderr if it does not succeed.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    out
}
