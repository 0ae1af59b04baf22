//! Generates the Rust types and gRPC stubs for `cluster.proto` with a vendored `protoc`,
//! so building raftmq needs no system protobuf install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=cluster.proto");
    tonic_prost_build::configure().build_transport(false).compile_protos(&["cluster.proto"], &["."])?;
    Ok(())
}
