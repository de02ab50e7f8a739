//! Progress bars for long work (generation, training), drawn on stderr and hidden
//! when stderr is not a terminal, and `note` for one-line reports on stderr that
//! never panic (indicatif ignores a failed write too).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` items with a message, elapsed time and ETA.
pub fn bar(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}

/// Writes one line to stderr, dropping it when stderr is closed or full (the
/// [`crate::note!`] macro): progress reports must not turn a finished run into a
/// failure, nor panic as `eprintln!` does.
pub fn note(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}
