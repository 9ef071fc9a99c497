//! The `berth` command: parses the command line and runs the command (see [`cli`]); the exit
//! code is the command's — 0 done, 1 failed, 2 a bad flag or config file.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::{Cli, Command};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => args.run(),
        Command::Fsck(args) => args.run(),
        Command::Certs(args) => args.run(),
        Command::User(cmd) => cmd.run(),
        Command::Gc(args) => args.run(),
        Command::Warm(args) => args.run(),
        Command::Cache(cmd) => cmd.run(),
        Command::Man { command } => cli::man(command.as_deref()),
    }
}
