//! The `rlhf` binary: parse the command line, run, print the error chain and exit 2
//! on failure.

use clap::Parser;

fn main() {
    let cli = rlhf::cli::Cli::parse();
    if let Err(err) = rlhf::cli::run(cli) {
        // `{:#}` prints the whole context chain: "loading model from X: cannot read ...".
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
}
