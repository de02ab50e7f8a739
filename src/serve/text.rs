//! Releasing generated text while it is streamed: how much of the decoded completion
//! may be sent now, and where a stop string cuts it.
//!
//! A stop string may span tokens (`"\n\n"` from `"\n"` + `"\n"`), so text that could
//! be the start of a stop string is held back until the next tokens decide; text after
//! a stop string is never sent. A trailing U+FFFD is held too: a byte-level tokenizer
//! decodes a character split across tokens as U+FFFD until its last byte arrives.

/// How far the completion may be released, and whether a stop string ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// Byte offset into the text: everything before it may be sent.
    pub end: usize,
    /// A stop string starts at `end`: the completion is over and ends there.
    pub stopped: bool,
}

/// `text` is the whole completion decoded so far; `finished` says no token will follow
/// (eos or the length limit), so nothing needs holding back.
pub fn release(text: &str, stops: &[String], finished: bool) -> Release {
    if let Some(cut) = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        return Release {
            end: cut,
            stopped: true,
        };
    }
    if finished {
        return Release {
            end: text.len(),
            stopped: false,
        };
    }
    let sendable = text.trim_end_matches('\u{FFFD}').len();
    let mut end = sendable;
    for stop in stops {
        // The longest proper prefix of `stop` that the sendable text ends with.
        let held = stop
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&k| k > 0 && text[..sendable].ends_with(&stop[..k]))
            .max()
            .unwrap_or(0);
        end = end.min(sendable - held);
    }
    Release {
        end,
        stopped: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stop_string_cuts_the_text_at_its_start() {
        let r = release("Hello\n\nWorld", &stops(&["\n\n"]), false);
        assert_eq!(
            r,
            Release {
                end: 5,
                stopped: true
            }
        );
        // The earliest of several stop strings wins.
        let r = release("a STOP b END", &stops(&["END", "STOP"]), false);
        assert_eq!(
            r,
            Release {
                end: 2,
                stopped: true
            }
        );
    }

    #[test]
    fn a_possible_stop_prefix_is_held_back_until_decided() {
        let s = stops(&["</answer>"]);
        // "</an" may become "</answer>": hold it.
        assert_eq!(
            release("42 </an", &s, false),
            Release {
                end: 3,
                stopped: false
            }
        );
        // It did not: release all.
        assert_eq!(
            release("42 </and", &s, false),
            Release {
                end: 8,
                stopped: false
            }
        );
        // Finished: nothing more can come, so nothing is held.
        assert_eq!(
            release("42 </an", &s, true),
            Release {
                end: 7,
                stopped: false
            }
        );
        // No stop strings: everything but an incomplete character goes out.
        assert_eq!(release("héllo\u{FFFD}", &[], false).end, "héllo".len());
    }

    #[test]
    fn multibyte_stop_strings_hold_on_character_boundaries() {
        let s = stops(&["→x"]);
        assert_eq!(release("a→", &s, false).end, 1);
        assert_eq!(
            release("a→x", &s, false),
            Release {
                end: 1,
                stopped: true
            }
        );
    }
}
