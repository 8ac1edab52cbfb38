//! Compiles the .proto files with protox (pure Rust): building shelltrail
//! needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["shelltrail/v1/recorder.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .type_attribute(
            ".shelltrail.v1.SessionMeta",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .type_attribute(
            ".shelltrail.v1.AuthInfo",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .type_attribute(
            ".shelltrail.v1.Close",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .type_attribute(
            ".shelltrail.v1.TransferSummary",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .compile_fds(fds)?;
    Ok(())
}
