//! echo: returns its input. Used by the host's tests, so its params can also ask it to
//! misbehave: burn CPU, loop forever, allocate, panic, produce huge output, or poke at
//! files and environment variables it was not granted.

use ksi_sdk::{
    FileRef, Plugin, PluginInfo, StepError, StepInput, StepOutput, bus, claude, config, files, log,
};
use serde::Deserialize;
use serde_json::{Value, json};

const VERSION: &str = if cfg!(feature = "v2") {
    "0.2.0"
} else {
    "0.1.0"
};

#[derive(Deserialize, Default)]
#[serde(default)]
struct Params {
    /// Busy-loop this many milliseconds before answering.
    sleep_ms: u64,
    /// Never return.
    loop_forever: bool,
    /// Allocate (and touch) this many MiB.
    alloc_mb: usize,
    /// Panic with this message.
    panic: Option<String>,
    /// Return a result of this many MiB.
    huge_output_mb: usize,
    /// Try to read this file.
    read_file: Option<String>,
    /// Try to read this environment variable.
    env_var: Option<String>,
    /// Ask Claude this, through the host.
    claude_prompt: Option<String>,
    /// Fail with a retryable step error carrying this message.
    fail: Option<String>,
    /// Recurse this deep (to overflow the wasm stack).
    recurse: u64,
    /// Call `config.get` this many times (a host-call loop; huge means forever).
    config_loop: u64,
    /// Read a file through the host (`files.read`) by a reference the plugin makes itself
    /// from these fields (a guess, not a reference it was given).
    read: Option<Guess>,
    /// Write a file, then read it back by the reference the host returned.
    write_then_read: bool,
    /// Publish this many events of `flood_bytes` each (`bus.publish`).
    publish_count: u64,
    /// Write this many files of `flood_bytes` each (`files.write`).
    write_count: u64,
    /// Log this many lines of `flood_bytes` each.
    log_count: u64,
    /// The size of each flooded event, file or log line.
    flood_bytes: usize,
    /// Read the clocks and draw random numbers (through WASI).
    clock_and_random: bool,
}

/// The parts of a file reference the plugin puts together itself.
#[derive(Deserialize)]
struct Guess {
    file: String,
    #[serde(default)]
    line: Option<u64>,
    hash: String,
    #[serde(default)]
    size: u64,
}

fn read_outcome(file: &FileRef) -> Value {
    match files::read(file) {
        Ok(bytes) => json!({ "ok": String::from_utf8_lossy(&bytes) }),
        Err(e) => json!({ "error": e }),
    }
}

/// Recursion the optimiser cannot flatten: each frame keeps a value live across the call.
fn depth(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let here = std::hint::black_box(n);
    depth(here - 1).wrapping_add(here)
}

struct Echo;

impl Plugin for Echo {
    fn describe() -> PluginInfo {
        PluginInfo::new("echo", VERSION)
            .description("Returns its input (and misbehaves on request, for tests)")
            .step("echo", "Return the step input as the result")
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        let params: Params = input.params()?;
        let mut extra = serde_json::Map::new();
        if params.sleep_ms > 0 {
            let start = std::time::Instant::now();
            while start.elapsed().as_millis() < u128::from(params.sleep_ms) {
                std::hint::spin_loop();
            }
        }
        if params.loop_forever {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if params.alloc_mb > 0 {
            let mut v: Vec<u8> = Vec::new();
            for _ in 0..params.alloc_mb {
                v.extend(std::iter::repeat_n(1u8, 1 << 20));
            }
            extra.insert("allocated".into(), json!(std::hint::black_box(&v).len()));
        }
        if params.recurse > 0 {
            extra.insert("depth".into(), json!(depth(params.recurse)));
        }
        if let Some(message) = params.panic {
            panic!("{message}");
        }
        if let Some(message) = params.fail {
            return Err(StepError::retryable(message));
        }
        if let Some(path) = &params.read_file {
            let outcome = match std::fs::read_to_string(path) {
                Ok(text) => json!({ "ok": text }),
                Err(e) => json!({ "error": e.to_string() }),
            };
            extra.insert("read_file".into(), outcome);
        }
        if let Some(name) = &params.env_var {
            let outcome = match std::env::var(name) {
                Ok(value) => json!({ "ok": value }),
                Err(e) => json!({ "error": e.to_string() }),
            };
            extra.insert("env_var".into(), outcome);
            extra.insert("env_count".into(), json!(std::env::vars().count()));
        }
        if params.clock_and_random {
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            let start = std::time::Instant::now();
            let elapsed = start.elapsed().as_nanos() as u64;
            let mut random = std::collections::hash_map::RandomState::new();
            let hashed = std::hash::BuildHasher::hash_one(&mut random, 42u8);
            extra.insert(
                "clock_and_random".into(),
                json!({ "wall_us": wall, "elapsed_ns": elapsed, "hashed": hashed }),
            );
        }
        for i in 0..params.config_loop {
            std::hint::black_box(config::get(&format!("key-{}", i % 8)));
        }
        if let Some(guess) = &params.read {
            let file = FileRef {
                path: guess.file.clone(),
                line: guess.line,
                sha256: guess.hash.clone(),
                bytes: guess.size,
            };
            extra.insert("read".into(), read_outcome(&file));
        }
        if params.write_then_read {
            let written = files::write("note.txt", b"written by echo")
                .map_err(|e| StepError::fatal(format!("files.write: {e}")))?;
            extra.insert("write_then_read".into(), read_outcome(&written));
        }
        let payload = "x".repeat(params.flood_bytes);
        for i in 0..params.publish_count {
            if let Err(e) = bus::publish("echo.flood", &payload) {
                extra.insert("publish_error".into(), json!({ "at": i, "error": e }));
                break;
            }
        }
        for i in 0..params.write_count {
            if let Err(e) = files::write(&format!("flood-{i}.bin"), payload.as_bytes()) {
                extra.insert("write_error".into(), json!({ "at": i, "error": e }));
                break;
            }
        }
        for _ in 0..params.log_count {
            log::info!("{payload}");
        }
        if let Some(prompt) = params.claude_prompt {
            let answer = claude::complete(claude::Request::new(prompt).agent("echo"))?;
            log::info!("claude answered in session {}", answer.session_id);
            extra.insert("claude".into(), json!(answer.text));
        }
        let mut result = json!({
            "version": VERSION,
            "step": input.step,
            "params": serde_json::from_str::<Value>(&input.params).unwrap_or(Value::Null),
            "state": serde_json::from_str::<Value>(&input.state).unwrap_or(Value::Null),
        });
        result.as_object_mut().expect("object").extend(extra);
        if params.huge_output_mb > 0 {
            result["huge"] = json!("x".repeat(params.huge_output_mb << 20));
        }
        StepOutput::new()
            .result(&result)?
            .patch(&json!({ "echoed_by": VERSION }))
    }
}

ksi_sdk::export!(Echo);
