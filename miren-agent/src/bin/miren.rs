//! `miren`: the command-line client of the agent. Its commands arrive with the control API
//! (issue [M]); for now it only reports its version and help.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "miren command-line client")]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("miren: no commands yet; see `miren --help`");
    std::process::exit(2);
}
