fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/parley/node/v1/node.proto",
            "proto/parley/v1/client.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
