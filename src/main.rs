//! The `rlhf` binary: parse the command line, run, print the error chain and exit 2
//! on failure.

use clap::{CommandFactory, FromArgMatches};

fn main() {
    let matches = rlhf::cli::Cli::command().get_matches();
    let cli = match rlhf::cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(err) = rlhf::cli::run(cli, &matches) {
        // `{:#}` prints the whole context chain: "loading model from X: cannot read ...".
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
}
