//! Compiles the .proto files with protox (pure Rust): building shelltrail
//! needs no system `protoc`.
//!
//! Generates the messages of both protocols, the tonic server and client of
//! the collector's gRPC services, and writes the encoded
//! `FileDescriptorSet` to `OUT_DIR/shelltrail_descriptor.bin` so the
//! collector can serve gRPC reflection (prost-build only writes one itself
//! when it runs protoc, which we do not).
use prost::Message;

const HEX: &str = "#[serde(with = \"crate::hex_bytes\")]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["shelltrail/v1/recorder.proto", "shelltrail/v1/collector.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("shelltrail_descriptor.bin"), fds.encode_to_vec())?;

    // The agent keeps these in its spool as JSON, the collector in its store.
    let serde = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(".shelltrail.v1.SessionMeta", serde)
        .type_attribute(".shelltrail.v1.AuthInfo", serde)
        .type_attribute(".shelltrail.v1.Close", serde)
        .type_attribute(".shelltrail.v1.TransferSummary", serde)
        .type_attribute(".shelltrail.v1.SessionStart", serde)
        .type_attribute(".shelltrail.v1.SessionEnd", serde)
        .type_attribute(".shelltrail.v1.Seal", serde)
        // Hashes, keys and signatures read as hex in those JSON files.
        .field_attribute(".shelltrail.v1.Close.final_hash", HEX)
        .field_attribute(".shelltrail.v1.Seal.final_hash", HEX)
        .field_attribute(".shelltrail.v1.Seal.signature", HEX)
        .field_attribute(".shelltrail.v1.Seal.key", HEX)
        .compile_fds(fds)?;
    Ok(())
}
