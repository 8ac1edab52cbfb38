//! What someone following a live session needs from a chunk: the output its
//! terminal received, its resizes and its end, in order.
//!
//! One reader for both places a session is followed: the agent (`tail` on
//! the host) and the collector (`tail` through it). Input, markers and lines
//! that do not parse are left out: a tailer sees what the user saw.

/// One thing a tailer is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// Output, as the terminal received it (consecutive output events of a
    /// chunk are merged: one write for the tailer, not one per event).
    Output(Vec<u8>),
    /// The terminal's size (from the header of the first chunk, or a
    /// resize event), columns then rows.
    Resize(u16, u16),
    /// The session ended with this exit status.
    Exit(i32),
}

/// The events of one chunk's asciicast content. The first chunk starts with
/// the header line, which gives the terminal's size.
pub fn events(content: &[u8]) -> Vec<Feed> {
    let mut out: Vec<Feed> = Vec::new();
    for line in content.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.first() == Some(&b'{') {
            if let Ok(h) = serde_json::from_slice::<serde_json::Value>(line) {
                let dim = |k: &str| h["term"][k].as_u64().and_then(|n| u16::try_from(n).ok());
                if let (Some(c), Some(r)) = (dim("cols"), dim("rows")) {
                    out.push(Feed::Resize(c, r));
                }
            }
            continue;
        }
        let Ok((_, code, data)) = serde_json::from_slice::<(serde_json::Value, String, String)>(line) else {
            continue;
        };
        match code.as_str() {
            "o" => match out.last_mut() {
                Some(Feed::Output(prev)) => prev.extend_from_slice(data.as_bytes()),
                _ => out.push(Feed::Output(data.into_bytes())),
            },
            "r" => {
                if let Some((c, r)) = data.split_once('x')
                    && let (Ok(c), Ok(r)) = (c.parse(), r.parse())
                {
                    out.push(Feed::Resize(c, r));
                }
            }
            "x" => out.push(Feed::Exit(data.parse().unwrap_or(-1))),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_resizes_and_the_end_in_order_with_outputs_merged() {
        let f = events(
            b"{\"version\":3,\"term\":{\"cols\":40,\"rows\":10}}\n[0.1, \"o\", \"a\"]\n[0.1, \"o\", \"b\"]\n\
              [0.2, \"r\", \"50x12\"]\n[0.1, \"o\", \"c\"]\n[0.1, \"x\", \"3\"]\n",
        );
        assert_eq!(
            f,
            vec![
                Feed::Resize(40, 10),
                Feed::Output(b"ab".to_vec()),
                Feed::Resize(50, 12),
                Feed::Output(b"c".to_vec()),
                Feed::Exit(3)
            ]
        );
    }

    #[test]
    fn input_markers_and_garbage_are_left_out() {
        let f = events(b"[0.1, \"i\", \"typed\"]\n[0.1, \"m\", \"marker\"]\nnot json\n[0.1, \"o\", \"out\"]\n");
        assert_eq!(f, vec![Feed::Output(b"out".to_vec())]);
    }
}
