//! The `rlhf` binary: parse the command line, run, print the error chain and exit 2
//! on failure. A closed pipe on stdout ends quietly with code 0 (`rlhf generate ... |
//! head -1`), and nothing printed to stderr panics when stderr is closed or full.

use clap::FromArgMatches;

// mimalloc reuses freed blocks instead of returning them to the kernel: candle
// allocates a fresh buffer per op, and with glibc's allocator large buffers are
// mmapped and zeroed by the kernel each time (measured: 8 of 15 s of a GPT-2-124M
// generation run were system time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    rlhf::setup_process();
    // clap prints its own errors and help, ignoring a failed write, and exits with 2
    // (0 for --help).
    let matches = rlhf::cli::command().get_matches();
    let cli = match rlhf::cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(err) = rlhf::in_worker_pool(|| rlhf::cli::run(cli, &matches)) {
        if rlhf::cli::is_broken_pipe(&err) {
            std::process::exit(0);
        }
        // `{:#}` prints the whole context chain: "loading model from X: cannot read ...".
        rlhf::note!("error: {err:#}");
        std::process::exit(2);
    }
}
