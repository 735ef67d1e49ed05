//! Running external commands with clear errors.

use std::{os::unix::process::CommandExt as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// Runs `cargo ARGS` in the workspace root, echoing the command line.
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(&mut cargo_command(root, args))
}

/// Replaces this process by `cargo ARGS` in the workspace root, echoing the command line.
pub fn exec_cargo(root: &Path, args: &[&str]) -> Result<()> {
    let mut command = cargo_command(root, args);
    eprintln!("+ {}", display(&command));
    let error = command.exec();
    Err(error).with_context(|| format!("could not start `{}`", display(&command)))
}

/// `cargo ARGS` (the cargo that runs this xtask) in the workspace root.
fn cargo_command(root: &Path, args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(root);
    command
}

/// Runs `command` with inherited stdio, failing with the command line if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {}", display(command));
    let status = command
        .status()
        .with_context(|| format!("could not start `{}`", display(command)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(command));
    }
    Ok(())
}

/// Runs `command` and returns its trimmed stdout if it succeeds, `None` otherwise.
pub fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The command line as a user would type it.
pub fn display(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}
