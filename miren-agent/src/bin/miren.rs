//! `miren`: the command-line client of the miren agent (see [`miren_agent::cli`]).

use std::process::ExitCode;

use clap::Parser;
use miren_agent::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", err.report());
            ExitCode::FAILURE
        }
    }
}
