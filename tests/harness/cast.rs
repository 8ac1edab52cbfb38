//! A small, independent reader for the asciicast files `shelltrail export`
//! writes, so that tests check the file format itself rather than trusting
//! the product's own decoder.

use serde_json::Value;

/// One event line: `[interval, code, data]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since the previous event (v3) or since the start (v2).
    pub time: f64,
    pub code: String,
    pub data: String,
}

/// A parsed recording.
#[derive(Debug, Clone)]
pub struct Cast {
    pub header: Value,
    pub events: Vec<Event>,
}

impl Cast {
    /// Parses asciicast text; panics (quoting the line) on anything malformed.
    pub fn parse(text: &str) -> Cast {
        let mut lines = text.lines().enumerate();
        let (_, first) = lines.next().expect("the recording is empty");
        let header: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("bad header line {first:?}: {e}"));
        assert!(header.is_object(), "the header is not an object: {first}");
        let mut events = Vec::new();
        for (n, line) in lines {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}: {line:?}", n + 1));
            let (Some(time), Some(code), Some(data)) = (
                v.get(0).and_then(Value::as_f64),
                v.get(1).and_then(Value::as_str),
                v.get(2).and_then(Value::as_str),
            ) else {
                panic!("line {}: not [number, code, data]: {line:?}", n + 1);
            };
            assert!(v.as_array().is_some_and(|a| a.len() == 3), "line {}: {line:?}", n + 1);
            events.push(Event {
                time,
                code: code.to_string(),
                data: data.to_string(),
            });
        }
        Cast { header, events }
    }

    /// The header's `shelltrail` attribute: the session's metadata.
    pub fn meta(&self) -> &Value {
        self.header
            .get("shelltrail")
            .unwrap_or_else(|| panic!("no shelltrail metadata in {}", self.header))
    }

    /// Events with this code.
    pub fn of<'a>(&'a self, code: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
        self.events.iter().filter(move |e| e.code == code)
    }

    /// All `o` data concatenated: the session's output as text.
    pub fn output(&self) -> String {
        self.of("o").map(|e| e.data.as_str()).collect()
    }

    /// All `i` data concatenated: the recorded keystrokes.
    pub fn input(&self) -> String {
        self.of("i").map(|e| e.data.as_str()).collect()
    }

    /// Labels of the `m` (marker) events.
    pub fn markers(&self) -> Vec<&str> {
        self.of("m").map(|e| e.data.as_str()).collect()
    }

    pub fn last(&self) -> &Event {
        self.events.last().expect("the recording has no events")
    }
}
