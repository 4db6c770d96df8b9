// Shared by the build scripts of every crate that links libtorch (included with
// `include!`). It makes the built binaries and test executables run without the user
// setting LD_LIBRARY_PATH: it embeds an rpath to the torch `lib/` folder of the project's
// venv, and links libtorch_cuda with --no-as-needed so CUDA is found on a GPU machine
// (the default --as-needed drops it because nothing names one of its symbols).

fn torch_lib_dir() -> std::path::PathBuf {
    let root = std::env::var("LIBTORCH")
        .expect("LIBTORCH is not set: build inside the checkout (.cargo/config.toml sets it)");
    let lib = std::path::Path::new(&root).join("lib");
    if !lib.join("libtorch_cpu.so").exists() {
        panic!(
            "{} has no libtorch_cpu.so: run scripts/setup to install torch==2.11.0 into .venv",
            lib.display()
        );
    }
    // Canonical, so the rpath does not go through the .venv/torch symlink.
    std::fs::canonicalize(&lib).unwrap_or(lib)
}

fn link_torch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib = torch_lib_dir();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
