//! Generates the Rust types and gRPC stubs for `cluster.proto` with a vendored `protoc`,
//! so building raftmq needs no system protobuf install. `bytes` fields become
//! `bytes::Bytes`, so a payload crosses from the broker to the wire without a copy.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=cluster.proto");
    tonic_prost_build::configure().build_transport(false).bytes(".").compile_protos(&["cluster.proto"], &["."])?;
    Ok(())
}
