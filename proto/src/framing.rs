//! Length framing for the recorder socket: a 4-byte big-endian length, then
//! that many bytes of protobuf.
//!
//! Framing is split from I/O on purpose: [`split`] works on a byte buffer, so
//! the blocking recorder and the async agent share one implementation and
//! the parser can be tested without sockets.

use prost::Message;

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed protobuf message: {0}")]
    Decode(String),
}

/// Appends `msg` as one frame to `out`.
pub fn encode<M: Message>(msg: &M, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(PREFIX + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(out).expect("Vec<u8> grows as needed");
}

/// Looks for one complete frame at the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the frame body and the
/// number of bytes it occupies (prefix included). A length above `max` is an
/// error as soon as the prefix is read, so an attacker cannot make the reader
/// buffer a huge frame first.
pub fn split(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = buf.get(..PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    match buf.get(PREFIX..PREFIX + len) {
        Some(body) => Ok(Some((body, PREFIX + len))),
        None => Ok(None),
    }
}

/// Decodes one frame body.
pub fn decode<M: Message + Default>(body: &[u8]) -> Result<M, FrameError> {
    M::decode(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Takes the next complete message off the front of `buf`, if there is one.
pub fn take<M: Message + Default>(buf: &mut Vec<u8>, max: usize) -> Result<Option<M>, FrameError> {
    let Some((body, used)) = split(buf, max)? else {
        return Ok(None);
    };
    let msg = decode(body)?;
    buf.drain(..used);
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Ack, AgentFrame, agent_frame::Body};

    fn ack(n: u64) -> AgentFrame {
        AgentFrame {
            body: Some(Body::Ack(Ack {
                through_seq: n,
                closed: false,
            })),
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        encode(&ack(1), &mut wire);
        encode(&ack(300), &mut wire);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in wire {
            buf.push(b);
            while let Some(m) = take::<AgentFrame>(&mut buf, 1024).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![ack(1), ack(300)]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_is_refused_before_the_body_arrives() {
        let buf = 5_000_000u32.to_be_bytes();
        assert_eq!(
            split(&buf, 1 << 20),
            Err(FrameError::TooLarge {
                len: 5_000_000,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut buf = vec![0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(take::<AgentFrame>(&mut buf, 64), Err(FrameError::Decode(_))));
    }

    #[test]
    fn empty_frame_is_refused() {
        let mut buf = vec![0, 0, 0, 0];
        assert_eq!(take::<AgentFrame>(&mut buf, 64), Err(FrameError::Empty));
    }
}
