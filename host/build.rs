//! Builds the bundled plugins (`plugins/`) for wasm32-wasip2 into `target/plugins` and hands
//! their paths to the host as constants (`OUT_DIR/bundled_plugins.rs`).
//!
//! The guests are a separate cargo workspace built by a nested cargo with its own target dir,
//! so it never waits on the outer build's lock. Set `KSI_SKIP_PLUGIN_BUILD=1` to skip it (the
//! constants then point at files that may not exist).

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for dir in ["wit", "sdk/src", "sdk/Cargo.toml", "plugins"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=KSI_SKIP_PLUGIN_BUILD");

    let target_dir = root.join("target").join("plugins");
    let out_dir = target_dir.join(TARGET).join("release");
    let staged = target_dir.join("staged");
    if std::env::var_os("KSI_SKIP_PLUGIN_BUILD").is_none() {
        ensure_target();
        // echo 0.1.0 and, with the `v2` feature, echo 0.2.0 for the hot-reload tests.
        build(&root, &target_dir, &["--workspace"]);
        std::fs::create_dir_all(&staged).unwrap();
        copy(&out_dir.join("echo.wasm"), &staged.join("echo-0.1.0.wasm"));
        build(&root, &target_dir, &["-p", "echo", "--features", "v2"]);
        copy(&out_dir.join("echo.wasm"), &staged.join("echo-0.2.0.wasm"));
        write_if_changed(&staged.join("compile-bomb.wasm"), &compile_bomb(600_000));
    }

    let path = |p: PathBuf| format!("{:?}", p.display().to_string());
    let generated = format!(
        "/// `echo` 0.1.0 (tests).\n\
         pub const ECHO_V1: &str = {};\n\
         /// `echo` 0.2.0 (hot-reload tests).\n\
         pub const ECHO_V2: &str = {};\n\
         /// `debate`.\n\
         pub const DEBATE: &str = {};\n\
         /// `summarize`.\n\
         pub const SUMMARIZE: &str = {};\n\
         /// A plain wasi:cli command component: the wrong world for a step handler.\n\
         pub const NOT_A_PLUGIN: &str = {};\n\
         /// Faults: describe() writes to stdout and stderr (and must load).\n\
         pub const FAULT_DESCRIBE_PRINTS: &str = {};\n\
         /// Faults: describe() panics.\n\
         pub const FAULT_DESCRIBE_PANICS: &str = {};\n\
         /// Faults: describe() never returns.\n\
         pub const FAULT_DESCRIBE_LOOPS: &str = {};\n\
         /// Faults: a function table of over 30,000 elements.\n\
         pub const FAULT_BIG_TABLE: &str = {};\n\
         /// Faults: a compile bomb, a component of 600,000 functions.\n\
         pub const FAULT_COMPILE_BOMB: &str = {};\n",
        path(staged.join("echo-0.1.0.wasm")),
        path(staged.join("echo-0.2.0.wasm")),
        path(out_dir.join("debate.wasm")),
        path(out_dir.join("summarize.wasm")),
        path(out_dir.join("not-a-plugin.wasm")),
        path(out_dir.join("fault_describe_prints.wasm")),
        path(out_dir.join("fault_describe_panics.wasm")),
        path(out_dir.join("fault_describe_loops.wasm")),
        path(out_dir.join("fault_big_table.wasm")),
        path(staged.join("compile-bomb.wasm")),
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("bundled_plugins.rs"), generated).unwrap();
    // The shipped handlers are embedded in the binary (`plugins::bundled::BUNDLED`).
    copy(&out_dir.join("debate.wasm"), &out.join("debate.wasm"));
    for name in ["summarize", "analysis", "collaboration", "teaching"] {
        copy(
            &out_dir.join(format!("{name}.wasm")),
            &out.join(format!("{name}.wasm")),
        );
    }
    copy(&staged.join("echo-0.1.0.wasm"), &out.join("echo.wasm"));
}

fn ensure_target() {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == TARGET)
        })
        .unwrap_or(true); // No rustup: let cargo report a missing target itself.
    if !installed {
        let status = Command::new("rustup")
            .args(["target", "add", TARGET])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "cannot install the {TARGET} target; run `rustup target add {TARGET}`"
        );
    }
}

fn build(root: &Path, target_dir: &Path, args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("plugins").join("Cargo.toml"))
        .args(["--release", "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir)
        .args(args);
    // Settings meant for the host build must not leak into the guest build.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_FEATURE_"))
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the bundled plugins");
    assert!(
        status.success(),
        "building the bundled plugins failed: {status}"
    );
}

/// Copies into a fresh file: `release/*.wasm` are hard links into cargo's `deps/`, never write through them.
fn copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
}

/// A component holding one core module of `functions` tiny functions: a few MB that would take
/// Cranelift minutes and gigabytes to compile.
fn compile_bomb(functions: u32) -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, Component, Function, FunctionSection, Instruction, Module, ModuleSection,
        TypeSection, ValType,
    };
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    for i in 0..functions {
        funcs.function(0);
        let mut f = Function::new([]);
        f.instruction(&Instruction::LocalGet(0))
            .instruction(&Instruction::I32Const(i as i32))
            .instruction(&Instruction::I32Add)
            .instruction(&Instruction::End);
        code.function(&f);
    }
    let mut module = Module::new();
    module.section(&types).section(&funcs).section(&code);
    let mut component = Component::new();
    component.section(&ModuleSection(&module));
    component.finish()
}

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap();
}
