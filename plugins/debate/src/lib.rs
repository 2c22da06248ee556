//! debate: two Claude agents argue a topic, a third judges.
//!
//! Steps, in order: `opening` (both sides at once), `rebuttal` (repeated `rounds` times, both
//! sides at once, each answering the other's last statement), `closing`, `judge`. Each debater is
//! a named agent that keeps its Claude session across steps: the session ids live in the
//! workflow state and are passed back with every call.

use ksi_sdk::claude::{self, Request, Response};
use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput, log, templates};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Params of the `opening` step (later steps read the state it writes).
#[derive(Deserialize)]
struct OpeningParams {
    topic: String,
    #[serde(default = "default_rounds")]
    rounds: u32,
    #[serde(default)]
    model: Option<String>,
}

fn default_rounds() -> u32 {
    1
}

/// One debater, as kept in the workflow state.
#[derive(Serialize, Deserialize, Clone, Default)]
struct Side {
    agent: String,
    session: Option<String>,
    last: String,
}

/// The slice of the workflow state this plugin owns (under the `debate` key).
#[derive(Serialize, Deserialize, Clone, Default)]
struct Debate {
    topic: String,
    rounds: u32,
    round: u32,
    model: Option<String>,
    pro: Side,
    con: Side,
    transcript: Vec<Turn>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Turn {
    step: String,
    speaker: String,
    text: String,
    response_ref: String,
}

#[derive(Deserialize)]
struct State {
    debate: Debate,
}

struct DebatePlugin;

impl Plugin for DebatePlugin {
    fn describe() -> PluginInfo {
        PluginInfo::new("debate", env!("CARGO_PKG_VERSION"))
            .description("Two Claude agents debate a topic; a judge summarises")
            .step_with_schema(
                "opening",
                "Both sides state their case (in parallel)",
                json!({
                    "type": "object",
                    "required": ["topic"],
                    "properties": {
                        "topic": {"type": "string"},
                        "rounds": {"type": "integer", "minimum": 0, "default": 1},
                        "model": {"type": "string"}
                    }
                }),
            )
            .step("rebuttal", "Each side answers the other's last statement")
            .step("closing", "Both sides close")
            .step("judge", "A judge weighs the debate and names a winner")
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        match input.step.as_str() {
            "opening" => opening(&input),
            "rebuttal" | "closing" => exchange(&input),
            "judge" => judge(&input),
            other => Err(StepError::fatal(format!("debate has no step {other}"))),
        }
    }
}

fn prompt(template: &str, vars: serde_json::Value, fallback: String) -> String {
    // A host template overrides the built-in prompt when the operator configured one.
    templates::render(template, &vars).unwrap_or(fallback)
}

fn request(debate: &Debate, side: &Side, prompt: String) -> Request {
    let mut request = Request::new(prompt)
        .agent(side.agent.clone())
        .resume_opt(side.session.clone())
        .max_turns(1);
    if let Some(model) = &debate.model {
        request = request.model(model.clone());
    }
    request
}

/// Ask both sides at once and record their answers.
fn ask_both(
    debate: &mut Debate,
    step: &str,
    pro_prompt: String,
    con_prompt: String,
) -> Result<(), StepError> {
    let requests = [
        request(debate, &debate.pro, pro_prompt),
        request(debate, &debate.con, con_prompt),
    ];
    let mut answers = claude::complete_all(&requests).into_iter();
    let pro = answers
        .next()
        .ok_or_else(|| StepError::fatal("no answer for pro"))??;
    let con = answers
        .next()
        .ok_or_else(|| StepError::fatal("no answer for con"))??;
    record(debate, step, "pro", pro);
    record(debate, step, "con", con);
    Ok(())
}

fn record(debate: &mut Debate, step: &str, speaker: &str, answer: Response) {
    let side = if speaker == "pro" {
        &mut debate.pro
    } else {
        &mut debate.con
    };
    side.session = Some(answer.session_id);
    side.last = answer.text.clone();
    debate.transcript.push(Turn {
        step: step.to_string(),
        speaker: speaker.to_string(),
        text: answer.text,
        response_ref: answer.response_ref.path,
    });
}

fn opening(input: &StepInput) -> Result<StepOutput, StepError> {
    let params: OpeningParams = input.params()?;
    let mut debate = Debate {
        topic: params.topic.clone(),
        rounds: params.rounds,
        model: params.model,
        pro: Side {
            agent: format!("debate-{}-pro", input.workflow_id),
            ..Side::default()
        },
        con: Side {
            agent: format!("debate-{}-con", input.workflow_id),
            ..Side::default()
        },
        ..Debate::default()
    };
    log::info!(
        "debate on {:?}: {} rebuttal round(s)",
        debate.topic,
        debate.rounds
    );
    let for_side = |side: &str| {
        prompt(
            "debate/opening",
            json!({ "topic": params.topic, "side": side }),
            format!(
                "You are debating the motion: \"{}\". You argue {side} it. \
                 Give your opening statement in at most 150 words.",
                params.topic
            ),
        )
    };
    ask_both(&mut debate, "opening", for_side("for"), for_side("against"))?;
    let next = if debate.rounds > 0 {
        "rebuttal"
    } else {
        "closing"
    };
    finish(debate, next)
}

fn exchange(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { mut debate } = input.state()?;
    let step = input.step.as_str();
    let ask = |opponent: &str| {
        if step == "closing" {
            prompt(
                "debate/closing",
                json!({ "topic": debate.topic, "opponent": opponent }),
                format!(
                    "Your opponent's last words: \"{opponent}\". \
                     Give your closing statement in at most 100 words."
                ),
            )
        } else {
            prompt(
                "debate/rebuttal",
                json!({ "topic": debate.topic, "opponent": opponent }),
                format!("Your opponent said: \"{opponent}\". Rebut it in at most 120 words."),
            )
        }
    };
    let (pro_prompt, con_prompt) = (ask(&debate.con.last), ask(&debate.pro.last));
    ask_both(&mut debate, step, pro_prompt, con_prompt)?;
    let next = if step == "closing" {
        "judge"
    } else {
        debate.round += 1;
        if debate.round < debate.rounds {
            "rebuttal"
        } else {
            "closing"
        }
    };
    finish(debate, next)
}

fn judge(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { debate } = input.state()?;
    let transcript: String = debate
        .transcript
        .iter()
        .map(|t| format!("[{} / {}] {}\n", t.step, t.speaker, t.text))
        .collect();
    let text = prompt(
        "debate/judge",
        json!({ "topic": debate.topic, "transcript": transcript }),
        format!(
            "You judge a debate on \"{}\". Transcript:\n{transcript}\n\
             Summarise each side's strongest point, then name the winner and why.",
            debate.topic
        ),
    );
    let mut request = Request::new(text).agent(format!("debate-{}-judge", input.workflow_id));
    if let Some(model) = &debate.model {
        request = request.model(model.clone());
    }
    let verdict = claude::complete(request)?;
    StepOutput::new()
        .result(&json!({
            "topic": debate.topic,
            "verdict": verdict.text,
            "verdict_ref": verdict.response_ref.path,
            "turns": debate.transcript.len(),
        }))?
        .patch(&json!({ "debate": { "verdict": verdict.text } }))?
        .event("debate.judged", &json!({ "topic": debate.topic }))
}

fn finish(debate: Debate, next: &str) -> Result<StepOutput, StepError> {
    let result = json!({
        "pro": debate.pro.last,
        "con": debate.con.last,
        "round": debate.round,
    });
    StepOutput::new()
        .result(&result)?
        .patch(&json!({ "debate": debate }))
        .map(|out| out.next(next))
}

ksi_sdk::export!(DebatePlugin);
