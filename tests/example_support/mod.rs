//! The example programs that `cargo test` builds beside the test binaries.

use std::path::PathBuf;

/// Returns the path of the built example `name`, such as `demo`, in the
/// `examples` directory beside this test's own `deps` directory.
pub fn example_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("no path of the test binary");
    let profile_dir = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary is not in <target>/<profile>/deps");
    let example = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        example.exists(),
        "{} is missing: run `cargo build --example {name}` or the whole `cargo test`",
        example.display()
    );
    example
}
