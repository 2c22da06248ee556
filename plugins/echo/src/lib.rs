//! echo: returns its input. Used by the host's tests, so its params can also ask it to
//! misbehave: burn CPU, loop forever, allocate, panic, produce huge output, or poke at
//! files and environment variables it was not granted.

use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput, claude, log};
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
