//! Link arguments for the freestanding guest binary only (not for host tests).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        format!("-Wl,-T,{dir}/linker.ld"),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,norelro".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
