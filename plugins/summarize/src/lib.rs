//! summarize: condense a text, a referenced file, or a workflow state value with Claude.

use ksi_sdk::claude::{self, Request};
use ksi_sdk::{FileRef, Plugin, PluginInfo, StepError, StepInput, StepOutput, files, templates};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Params {
    /// The text to summarise ...
    #[serde(default)]
    text: Option<String>,
    /// ... or a file holding it ...
    #[serde(default)]
    file: Option<Ref>,
    /// ... or the workflow state key holding it.
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default = "default_words")]
    max_words: u32,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct Ref {
    path: String,
    #[serde(default)]
    line: Option<u64>,
    sha256: String,
    bytes: u64,
}

fn default_words() -> u32 {
    120
}

struct Summarize;

impl Plugin for Summarize {
    fn describe() -> PluginInfo {
        PluginInfo::new("summarize", env!("CARGO_PKG_VERSION"))
            .description("Summarises a text, a file or a state value with Claude")
            .step_with_schema(
                "summarize",
                "Summarise the input in at most max_words words",
                json!({
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "file": {"type": "object"},
                        "state_key": {"type": "string"},
                        "max_words": {"type": "integer", "default": 120},
                        "model": {"type": "string"}
                    }
                }),
            )
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        let params: Params = input.params()?;
        let text = source_text(&input, &params)?;
        let prompt = templates::render(
            "summarize",
            &json!({ "text": text, "max_words": params.max_words }),
        )
        .unwrap_or_else(|_| {
            format!(
                "Summarise the following in at most {} words.\n\n{text}",
                params.max_words
            )
        });
        let mut request = Request::new(prompt).max_turns(1);
        if let Some(model) = params.model {
            request = request.model(model);
        }
        let answer = claude::complete(request)?;
        let stored = files::write("summary.md", answer.text.as_bytes())
            .map_err(|e| StepError::retryable(format!("cannot store the summary: {e}")))?;
        StepOutput::new()
            .result(&json!({
                "summary": answer.text,
                "summary_ref": { "path": stored.path, "sha256": stored.sha256, "bytes": stored.bytes },
                "cost_usd": answer.cost_usd,
            }))?
            .patch(&json!({ "summary": answer.text }))
    }
}

fn source_text(input: &StepInput, params: &Params) -> Result<String, StepError> {
    if let Some(text) = &params.text {
        return Ok(text.clone());
    }
    if let Some(file) = &params.file {
        let file = FileRef {
            path: file.path.clone(),
            line: file.line,
            sha256: file.sha256.clone(),
            bytes: file.bytes,
        };
        let bytes = files::read(&file).map_err(StepError::fatal)?;
        return String::from_utf8(bytes)
            .map_err(|_| StepError::fatal(format!("{} is not UTF-8 text", file.path)));
    }
    if let Some(key) = &params.state_key {
        let state: serde_json::Value = input.state()?;
        return match &state[key] {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Null => Err(StepError::fatal(format!("state has no key {key}"))),
            other => Ok(other.to_string()),
        };
    }
    Err(StepError::fatal(
        "summarize needs one of text, file or state_key",
    ))
}

ksi_sdk::export!(Summarize);
