//! Progress bars for long work (generation, training), drawn on stderr and hidden
//! when stderr is not a terminal.

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
