//! analysis: a lead agent splits a topic into sub-questions, analysts answer them all at once,
//! and the lead combines their answers into one report.
//!
//! Steps, in order: `decompose` (the lead asks itself for `parts` sub-questions, as a JSON array
//! or, failing that, numbered lines), `analyze` (one analyst agent per sub-question, all in one
//! `claude.complete-all` call: the fan-out depends on the data, so it lives inside one step
//! rather than in a `parallel` group of the definition), `synthesize` (the lead, resuming the
//! session in which it set the questions, writes the report). Everything the steps share lives
//! under the `analysis` key of the workflow state.

use ksi_sdk::Agent;
use ksi_sdk::claude::{self, Request, Response};
use ksi_sdk::params::lenient_u32;
use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput, log, templates};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The most sub-questions one analysis fans out to (each is a concurrent Claude call).
const MAX_PARTS: u32 = 10;

/// Params of the `decompose` step (later steps read the state it writes).
#[derive(Deserialize)]
struct DecomposeParams {
    topic: String,
    #[serde(default = "default_parts", deserialize_with = "lenient_u32")]
    parts: u32,
    #[serde(default)]
    model: Option<String>,
}

fn default_parts() -> u32 {
    3
}

/// One sub-question and, after `analyze`, its answer.
#[derive(Serialize, Deserialize, Clone, Default)]
struct Part {
    question: String,
    analyst: Agent,
    answer: Option<String>,
    response_ref: Option<String>,
}

/// The slice of the workflow state this plugin owns (under the `analysis` key).
#[derive(Serialize, Deserialize, Clone, Default)]
struct Analysis {
    topic: String,
    parts: u32,
    model: Option<String>,
    lead: Agent,
    questions: Vec<Part>,
    report: Option<String>,
}

#[derive(Deserialize)]
struct State {
    analysis: Analysis,
}

struct AnalysisPlugin;

impl Plugin for AnalysisPlugin {
    fn describe() -> PluginInfo {
        PluginInfo::new("analysis", env!("CARGO_PKG_VERSION"))
            .description("Decomposes a topic into sub-questions, analyses them in parallel, synthesises a report")
            .step_with_schema(
                "decompose",
                "The lead agent breaks the topic into `parts` sub-questions",
                json!({
                    "type": "object",
                    "required": ["topic"],
                    "properties": {
                        "topic": {"type": "string"},
                        "parts": {"type": "integer", "minimum": 1, "maximum": MAX_PARTS, "default": 3},
                        "model": {"type": "string"}
                    }
                }),
            )
            .step("analyze", "One analyst per sub-question answers it (all in parallel)")
            .step("synthesize", "The lead combines the answers into a final report")
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        match input.step.as_str() {
            "decompose" => decompose(&input),
            "analyze" => analyze(&input),
            "synthesize" => synthesize(&input),
            other => Err(StepError::fatal(format!("analysis has no step {other}"))),
        }
    }
}

fn prompt(template: &str, vars: Value, fallback: String) -> String {
    // A host template overrides the built-in prompt when the operator configured one.
    templates::render(template, &vars).unwrap_or(fallback)
}

fn request(analysis: &Analysis, agent: &Agent, prompt: String) -> Request {
    let mut request = Request::new(prompt)
        .agent(agent.agent.clone())
        .resume_opt(agent.session.clone())
        .max_turns(1);
    if let Some(model) = &analysis.model {
        request = request.model(model.clone());
    }
    request
}

fn decompose(input: &StepInput) -> Result<StepOutput, StepError> {
    let params: DecomposeParams = input.params()?;
    if params.parts == 0 || params.parts > MAX_PARTS {
        return Err(StepError::fatal(format!(
            "parts must be between 1 and {MAX_PARTS}, not {}",
            params.parts
        )));
    }
    let mut analysis = Analysis {
        topic: params.topic.clone(),
        parts: params.parts,
        model: params.model,
        lead: Agent {
            agent: format!("analysis-{}-lead", input.workflow_id),
            session: None,
        },
        ..Analysis::default()
    };
    let text = prompt(
        "analysis/decompose",
        json!({ "topic": analysis.topic, "parts": analysis.parts }),
        format!(
            "You lead an analysis of: \"{}\".\n\
             Break it into exactly {} distinct sub-questions that together cover it, \
             each answerable on its own by a separate analyst.\n\
             Answer with only a JSON array of {} strings, one sub-question each, and nothing else.",
            analysis.topic, analysis.parts, analysis.parts
        ),
    );
    let answer = claude::complete(request(&analysis, &analysis.lead, text))?;
    analysis.lead.session = Some(answer.session_id.clone());
    let mut questions = parse_questions(&answer.text);
    if questions.is_empty() {
        // Let the retry policy ask again (journal entries are kept per attempt).
        return Err(StepError::retryable(format!(
            "the lead's answer holds no sub-questions: {:?}",
            answer.text
        )));
    }
    if questions.len() > analysis.parts as usize {
        questions.truncate(analysis.parts as usize);
    } else if questions.len() < analysis.parts as usize {
        log::warn!(
            "asked for {} sub-questions, got {}",
            analysis.parts,
            questions.len()
        );
    }
    analysis.questions = questions
        .into_iter()
        .enumerate()
        .map(|(i, question)| Part {
            question,
            analyst: Agent {
                agent: format!("analysis-{}-analyst-{}", input.workflow_id, i + 1),
                session: None,
            },
            ..Part::default()
        })
        .collect();
    log::info!(
        "analysis of {:?}: {} sub-question(s)",
        analysis.topic,
        analysis.questions.len()
    );
    let result = json!({
        "topic": analysis.topic,
        "questions": analysis.questions.iter().map(|p| &p.question).collect::<Vec<_>>(),
        "response_ref": answer.response_ref.path,
    });
    StepOutput::new()
        .result(&result)?
        .patch(&json!({ "analysis": analysis }))
}

fn analyze(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { mut analysis } = input.state()?;
    let count = analysis.questions.len();
    let requests: Vec<Request> = analysis
        .questions
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let text = prompt(
                "analysis/analyze",
                json!({
                    "topic": analysis.topic,
                    "question": part.question,
                    "index": i + 1,
                    "count": count,
                }),
                format!(
                    "You are analyst {} of {count} on the topic \"{}\".\n\
                     Your sub-question: {}\n\
                     Answer it in at most 250 words: the key facts and reasoning, \
                     what is uncertain, and a one-sentence conclusion.",
                    i + 1,
                    analysis.topic,
                    part.question
                ),
            );
            request(&analysis, &part.analyst, text)
        })
        .collect();
    let answers = claude::complete_all(&requests);
    if answers.len() != count {
        return Err(StepError::fatal(format!(
            "asked {count} analysts, got {} answers",
            answers.len()
        )));
    }
    for (part, answer) in analysis.questions.iter_mut().zip(answers) {
        let answer: Response = answer?;
        part.analyst.session = Some(answer.session_id);
        part.answer = Some(answer.text);
        part.response_ref = Some(answer.response_ref.path);
    }
    StepOutput::new()
        .result(&json!({ "answers": sub_answers(&analysis) }))?
        .patch(&json!({ "analysis": analysis }))
}

fn synthesize(input: &StepInput) -> Result<StepOutput, StepError> {
    let State { mut analysis } = input.state()?;
    let findings: String = analysis
        .questions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "### {}. {}\n{}\n\n",
                i + 1,
                p.question,
                p.answer.as_deref().unwrap_or("(no answer)")
            )
        })
        .collect();
    let text = prompt(
        "analysis/synthesize",
        json!({ "topic": analysis.topic, "findings": findings }),
        format!(
            "Your analysts have answered the sub-questions you set for \"{}\":\n\n{findings}\
             Combine their answers into a final report: a short summary first, then the main \
             findings, where the answers agree or conflict, open questions, and a conclusion. \
             At most 500 words.",
            analysis.topic
        ),
    );
    let report = claude::complete(request(&analysis, &analysis.lead, text))?;
    analysis.lead.session = Some(report.session_id);
    analysis.report = Some(report.text.clone());
    StepOutput::new()
        .result(&json!({
            "topic": analysis.topic,
            "report": report.text,
            "report_ref": report.response_ref.path,
            "sub_answers": sub_answers(&analysis),
        }))?
        .patch(&json!({ "analysis": analysis }))?
        .event("analysis.completed", &json!({ "topic": analysis.topic }))
}

fn sub_answers(analysis: &Analysis) -> Vec<Value> {
    analysis
        .questions
        .iter()
        .map(|p| {
            json!({
                "question": p.question,
                "answer": p.answer,
                "analyst": p.analyst.agent,
                "response_ref": p.response_ref,
            })
        })
        .collect()
}

/// The sub-questions in the lead's answer: the first JSON array in it (of strings, or of
/// objects with a `question` field), else its numbered or bulleted lines, else its other
/// non-empty lines (a model that ignored the format still yields something to analyse).
fn parse_questions(text: &str) -> Vec<String> {
    if let Some(questions) = json_array(text) {
        return questions;
    }
    let items: Vec<String> = text
        .lines()
        .filter_map(list_item)
        .filter(|q| !q.is_empty())
        .collect();
    if !items.is_empty() {
        return items;
    }
    text.lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .filter(|l| !l.is_empty() && !l.starts_with("```") && !l.ends_with(':'))
        .map(str::to_string)
        .collect()
}

fn json_array(text: &str) -> Option<Vec<String>> {
    let start = text.find('[')?;
    let end = text.rfind(']')?;
    if end <= start {
        return None;
    }
    let items: Vec<Value> = serde_json::from_str(&text[start..=end]).ok()?;
    let questions: Vec<String> = items
        .into_iter()
        .filter_map(|item| match item {
            Value::String(s) => Some(s),
            Value::Object(mut o) => match o.remove("question") {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            _ => None,
        })
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    (!questions.is_empty()).then_some(questions)
}

/// `1. text`, `2) text`, `**3.** text`, `- text`, `* text` → `text`; anything else is not an item.
fn list_item(line: &str) -> Option<String> {
    let line = line.trim();
    let rest = if let Some(rest) = line.strip_prefix(['-', '•']).or(line.strip_prefix("* ")) {
        rest
    } else {
        let core = line.trim_start_matches(['*', '#']).trim_start();
        let digits = core.len() - core.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return None;
        }
        core[digits..].strip_prefix(['.', ')'])?
    };
    Some(rest.trim().trim_matches('*').trim().to_string())
}

ksi_sdk::export!(AnalysisPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_come_from_a_json_array_inside_prose() {
        let text = "Here you go:\n```json\n[\"Why?\", \"How?\", {\"question\": \"When?\"}]\n```";
        assert_eq!(parse_questions(text), ["Why?", "How?", "When?"]);
    }

    #[test]
    fn questions_fall_back_to_numbered_and_bulleted_lines() {
        let text = "Sub-questions:\n1. Why?\n2) How?\n- When?\n**4.** Where?\nnot an item";
        assert_eq!(parse_questions(text), ["Why?", "How?", "When?", "Where?"]);
    }

    #[test]
    fn an_answer_without_a_list_falls_back_to_its_lines() {
        let text = "Questions:\n\nWhy is it so?\nHow does it work?\n";
        assert_eq!(
            parse_questions(text),
            ["Why is it so?", "How does it work?"]
        );
    }

    #[test]
    fn an_empty_answer_yields_no_questions() {
        assert!(parse_questions(" \n```\n").is_empty());
    }
}
