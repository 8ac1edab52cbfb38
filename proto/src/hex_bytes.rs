//! Serde for the hashes, keys and signatures of the messages kept as JSON
//! (the agent's spool, the collector's `end.json`): lowercase hex, so an
//! operator reading those files sees the same hash `verify` prints, not an
//! array of numbers.

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    hex::decode(text.as_bytes()).map_err(serde::de::Error::custom)
}
