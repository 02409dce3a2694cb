//! Compiles `chappe/v1/*.proto` with protox (pure Rust, no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "chappe/v1/common.proto",
        "chappe/v1/gateway.proto",
        "chappe/v1/internal.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        // The `Connect` RPC would clash with the generated `connect` constructor;
        // clients build a `Channel` themselves and call `GatewayClient::new`.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
