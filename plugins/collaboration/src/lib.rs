//! collaboration: a writer drafts, a critic reviews, the writer revises until the critic
//! approves or the round limit is reached.
//!
//! Steps: `draft` (the writer writes a first version), `critique` (the critic reviews the current
//! text and ends with `VERDICT: APPROVED` or `VERDICT: REVISE`; the step chooses `revise` or
//! `finalize`), `revise` (the writer, resuming its session, revises per the critique; the
//! definition sends it back to `critique`), `finalize` (no Claude call: the final text, the
//! number of revisions and whether the critic approved it). Writer and critic each keep one
//! Claude session for the whole run, so the critic remembers what it asked for and the writer
//! what it wrote. Everything the steps share lives under the `collaboration` key of the state.

use ksi_sdk::Agent;
use ksi_sdk::claude::{self, Request, Response};
use ksi_sdk::params::lenient_u32;
use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput, log, templates};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Params of the `draft` step (later steps read the state it writes).
#[derive(Deserialize)]
struct DraftParams {
    topic: String,
    #[serde(default = "default_max_rounds", deserialize_with = "lenient_u32")]
    max_rounds: u32,
    #[serde(default = "default_words", deserialize_with = "lenient_u32")]
    words: u32,
    #[serde(default)]
    model: Option<String>,
}

fn default_max_rounds() -> u32 {
    2
}

fn default_words() -> u32 {
    300
}

/// One review by the critic.
#[derive(Serialize, Deserialize, Clone)]
struct Critique {
    /// Revisions made before this review (0 = the review of the first draft).
    round: u32,
    text: String,
    approved: bool,
    response_ref: String,
}

/// The slice of the workflow state this plugin owns (under the `collaboration` key).
#[derive(Serialize, Deserialize, Clone, Default)]
struct Collaboration {
    topic: String,
    max_rounds: u32,
    words: u32,
    model: Option<String>,
    writer: Agent,
    critic: Agent,
    /// The current text (the draft, then each revision).
    text: String,
    text_ref: String,
    /// Revisions made so far.
    round: u32,
    approved: bool,
    critiques: Vec<Critique>,
}

#[derive(Deserialize)]
struct State {
    #[serde(rename = "collaboration")]
    collab: Collaboration,
}

struct CollaborationPlugin;

impl Plugin for CollaborationPlugin {
    fn describe() -> PluginInfo {
        PluginInfo::new("collaboration", env!("CARGO_PKG_VERSION"))
            .description("A writer drafts and revises a text until a critic approves it")
            .step_with_schema(
                "draft",
                "The writer drafts a text on the topic",
                json!({
                    "type": "object",
                    "required": ["topic"],
                    "properties": {
                        "topic": {"type": "string"},
                        "max_rounds": {"type": "integer", "minimum": 0, "default": 2},
                        "words": {"type": "integer", "minimum": 1, "default": 300},
                        "model": {"type": "string"}
                    }
                }),
            )
            .step(
                "critique",
                "The critic reviews the text and approves it or asks for a revision (chooses revise or finalize)",
            )
            .step("revise", "The writer revises the text per the critique")
            .step("finalize", "The final text, rounds and approval")
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        match input.step.as_str() {
            "draft" => draft(&input),
            "critique" => critique(&input),
            "revise" => revise(&input),
            "finalize" => finalize(&input),
            other => Err(StepError::fatal(format!(
                "collaboration has no step {other}"
            ))),
        }
    }
}

fn prompt(template: &str, vars: Value, fallback: String) -> String {
    // A host template overrides the built-in prompt when the operator configured one.
    templates::render(template, &vars).unwrap_or(fallback)
}

fn ask(collab: &Collaboration, agent: &Agent, prompt: String) -> Result<Response, StepError> {
    let mut request = Request::new(prompt)
        .agent(agent.agent.clone())
        .resume_opt(agent.session.clone())
        .max_turns(1);
    if let Some(model) = &collab.model {
        request = request.model(model.clone());
    }
    Ok(claude::complete(request)?)
}

fn draft(input: &StepInput) -> Result<StepOutput, StepError> {
    let params: DraftParams = input.params()?;
    let mut collab = Collaboration {
        topic: params.topic,
        max_rounds: params.max_rounds,
        words: params.words,
        model: params.model,
        writer: Agent {
            agent: format!("collaboration-{}-writer", input.workflow_id),
            session: None,
        },
        critic: Agent {
            agent: format!("collaboration-{}-critic", input.workflow_id),
            session: None,
        },
        ..Collaboration::default()
    };
    log::info!(
        "collaboration on {:?}: at most {} revision(s)",
        collab.topic,
        collab.max_rounds
    );
    let text = prompt(
        "collaboration/draft",
        json!({ "topic": collab.topic, "words": collab.words }),
        format!(
            "You are a skilled writer. Write a first draft of about {} words on: \"{}\".\n\
             An editor will review it and you will revise it. \
             Reply with the text only, no preamble.",
            collab.words, collab.topic
        ),
    );
    let answer = ask(&collab, &collab.writer, text)?;
    collab.writer.session = Some(answer.session_id);
    collab.text = answer.text;
    collab.text_ref = answer.response_ref.path;
    StepOutput::new()
        .result(&json!({ "draft": collab.text, "draft_ref": collab.text_ref }))?
        .patch(&json!({ "collaboration": collab }))
}

fn critique(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { mut collab } = input.state()?;
    let text = prompt(
        "collaboration/critique",
        json!({ "topic": collab.topic, "text": collab.text, "round": collab.round }),
        format!(
            "You are a demanding but fair editor. The text below was written on: \"{}\".\n\n\
             ---\n{}\n---\n\n\
             Review it: what works, what does not, and concrete changes to make. \
             If you reviewed an earlier version, check whether your points were addressed.\n\
             End your answer with a line that is exactly `VERDICT: APPROVED` if the text is \
             ready to publish, or `VERDICT: REVISE` if it needs another revision.",
            collab.topic, collab.text
        ),
    );
    let answer = ask(&collab, &collab.critic, text)?;
    collab.critic.session = Some(answer.session_id);
    let approved = match verdict(&answer.text) {
        Some(approved) => approved,
        None => {
            log::warn!("the critique has no VERDICT line; treating it as REVISE");
            false
        }
    };
    collab.approved = approved;
    collab.critiques.push(Critique {
        round: collab.round,
        text: answer.text.clone(),
        approved,
        response_ref: answer.response_ref.path,
    });
    let next = if approved || collab.round >= collab.max_rounds {
        "finalize"
    } else {
        "revise"
    };
    log::info!(
        "critique after {} revision(s): {}; next {next}",
        collab.round,
        if approved { "approved" } else { "revise" }
    );
    Ok(StepOutput::new()
        .result(&json!({ "critique": answer.text, "approved": approved, "round": collab.round }))?
        .patch(&json!({ "collaboration": collab }))?
        .next(next))
}

fn revise(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { mut collab } = input.state()?;
    let critique = collab
        .critiques
        .last()
        .map(|c| c.text.clone())
        .ok_or_else(|| StepError::fatal("revise runs after critique, but there is none"))?;
    let text = prompt(
        "collaboration/revise",
        json!({ "topic": collab.topic, "critique": critique, "round": collab.round + 1 }),
        format!(
            "Your editor reviewed your text:\n\n---\n{critique}\n---\n\n\
             Revise your text to address the critique. \
             Reply with the complete revised text only, no preamble."
        ),
    );
    let answer = ask(&collab, &collab.writer, text)?;
    collab.writer.session = Some(answer.session_id);
    collab.text = answer.text;
    collab.text_ref = answer.response_ref.path;
    collab.round += 1;
    Ok(StepOutput::new()
        .result(
            &json!({ "revision": collab.text, "round": collab.round, "text_ref": collab.text_ref }),
        )?
        .patch(&json!({ "collaboration": collab }))?
        .next("critique"))
}

fn finalize(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { collab } = input.state()?;
    let result = json!({
        "topic": collab.topic,
        "text": collab.text,
        "text_ref": collab.text_ref,
        "rounds": collab.round,
        "approved": collab.approved,
        "critiques": collab.critiques.iter().map(|c| json!({
            "round": c.round,
            "approved": c.approved,
            "critique": c.text,
        })).collect::<Vec<_>>(),
    });
    StepOutput::new().result(&result)?.event(
        "collaboration.finalized",
        &json!({ "topic": collab.topic, "rounds": collab.round, "approved": collab.approved }),
    )
}

/// The critic's verdict: the last line that mentions `verdict`, case-insensitive and with
/// markdown emphasis ignored. `Some(true)` approved, `Some(false)` revise, `None` no verdict.
fn verdict(text: &str) -> Option<bool> {
    text.lines().rev().find_map(|line| {
        let line = line.to_ascii_lowercase();
        let (_, after) = line.split_once("verdict")?;
        let word: String = after
            .trim_start_matches(|c: char| !c.is_ascii_alphabetic())
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        match word.as_str() {
            "approved" | "approve" => Some(true),
            "revise" | "revision" => Some(false),
            _ => None,
        }
    })
}

ksi_sdk::export!(CollaborationPlugin);

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn verdict_is_read_from_the_last_verdict_line_in_any_case() {
        assert_eq!(verdict("Good.\nVERDICT: APPROVED"), Some(true));
        assert_eq!(verdict("Meh.\n**Verdict:** revise\n"), Some(false));
        assert_eq!(verdict("verdict: Approved."), Some(true));
        assert_eq!(
            verdict("My verdict: REVISE\n...\n`VERDICT: APPROVED`"),
            Some(true)
        );
    }

    #[test]
    fn a_critique_without_a_verdict_has_none() {
        assert_eq!(verdict("Looks fine to me."), None);
        assert_eq!(verdict("The verdict is pending."), None);
    }
}
