//! teaching: a teacher agent explains a topic to a student agent, answers its questions,
//! checks its understanding and sums up the lesson.
//!
//! Steps: `explain` (the teacher explains `topic` at `level`), `ask` (the student, in its own
//! session, asks about what it did not understand), `answer` (the teacher, resuming its
//! session, answers), repeated `rounds` times (`answer` chooses `ask` or `check`; `explain`
//! goes straight to `check` when `rounds` is 0), `check` (two calls in sequence: the teacher
//! poses one check question, then the student answers it), `summary` (the teacher assesses
//! the student's answer and summarises what was learned). The teacher and the student each
//! keep one Claude session for the whole lesson. Everything the steps share lives under the
//! `teaching` key of the state.

use ksi_sdk::Agent;
use ksi_sdk::claude::{self, Request, Response};
use ksi_sdk::params::lenient_u32;
use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput, log, templates};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Params of the `explain` step (later steps read the state it writes).
#[derive(Deserialize)]
struct ExplainParams {
    topic: String,
    #[serde(default = "default_level")]
    level: String,
    #[serde(default = "default_rounds", deserialize_with = "lenient_u32")]
    rounds: u32,
    #[serde(default)]
    model: Option<String>,
}

fn default_level() -> String {
    "beginner".to_string()
}

fn default_rounds() -> u32 {
    1
}

/// One round of questions and answers.
#[derive(Serialize, Deserialize, Clone)]
struct Exchange {
    round: u32,
    question: String,
    answer: Option<String>,
}

/// The check question and the student's answer.
#[derive(Serialize, Deserialize, Clone)]
struct Check {
    question: String,
    answer: String,
}

/// The slice of the workflow state this plugin owns (under the `teaching` key).
#[derive(Serialize, Deserialize, Clone, Default)]
struct Teaching {
    topic: String,
    level: String,
    rounds: u32,
    model: Option<String>,
    teacher: Agent,
    student: Agent,
    explanation: String,
    explanation_ref: String,
    /// Question rounds completed.
    round: u32,
    qa: Vec<Exchange>,
    check: Option<Check>,
}

#[derive(Deserialize)]
struct State {
    teaching: Teaching,
}

struct TeachingPlugin;

impl Plugin for TeachingPlugin {
    fn describe() -> PluginInfo {
        PluginInfo::new("teaching", env!("CARGO_PKG_VERSION"))
            .description("A teacher explains a topic, a student asks, the teacher checks understanding and sums up")
            .step_with_schema(
                "explain",
                "The teacher explains the topic at the level (chooses ask, or check when rounds is 0)",
                json!({
                    "type": "object",
                    "required": ["topic"],
                    "properties": {
                        "topic": {"type": "string"},
                        "level": {"type": "string", "default": "beginner"},
                        "rounds": {"type": "integer", "minimum": 0, "default": 1},
                        "model": {"type": "string"}
                    }
                }),
            )
            .step("ask", "The student asks about what it did not understand")
            .step("answer", "The teacher answers (chooses ask again or check)")
            .step("check", "The teacher poses a check question; the student answers it")
            .step("summary", "The teacher assesses the answer and summarises the lesson")
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        match input.step.as_str() {
            "explain" => explain(&input),
            "ask" => ask(&input),
            "answer" => answer(&input),
            "check" => check(&input),
            "summary" => summary(&input),
            other => Err(StepError::fatal(format!("teaching has no step {other}"))),
        }
    }
}

fn prompt(template: &str, vars: Value, fallback: String) -> String {
    // A host template overrides the built-in prompt when the operator configured one.
    templates::render(template, &vars).unwrap_or(fallback)
}

/// One Claude call as `agent`, continuing its session; the new session id is kept.
fn call(model: &Option<String>, agent: &mut Agent, prompt: String) -> Result<Response, StepError> {
    let mut request = Request::new(prompt)
        .agent(agent.agent.clone())
        .resume_opt(agent.session.clone())
        .max_turns(1);
    if let Some(model) = model {
        request = request.model(model.clone());
    }
    let answer = claude::complete(request)?;
    agent.session = Some(answer.session_id.clone());
    Ok(answer)
}

fn explain(input: &StepInput) -> Result<StepOutput, StepError> {
    let params: ExplainParams = input.params()?;
    let mut lesson = Teaching {
        topic: params.topic,
        level: params.level,
        rounds: params.rounds,
        model: params.model,
        teacher: Agent {
            agent: format!("teaching-{}-teacher", input.workflow_id),
            session: None,
        },
        student: Agent {
            agent: format!("teaching-{}-student", input.workflow_id),
            session: None,
        },
        ..Teaching::default()
    };
    log::info!(
        "lesson on {:?} for a {} student, {} question round(s)",
        lesson.topic,
        lesson.level,
        lesson.rounds
    );
    let text = prompt(
        "teaching/explain",
        json!({ "topic": lesson.topic, "level": lesson.level }),
        format!(
            "You are a patient teacher. Explain \"{}\" to a {} student in at most 300 words: \
             the core idea, why it matters, and one concrete example. \
             The student will then ask you questions.",
            lesson.topic, lesson.level
        ),
    );
    let explanation = call(&lesson.model, &mut lesson.teacher, text)?;
    lesson.explanation = explanation.text;
    lesson.explanation_ref = explanation.response_ref.path;
    let next = if lesson.rounds > 0 { "ask" } else { "check" };
    Ok(StepOutput::new()
        .result(&json!({ "explanation": lesson.explanation, "explanation_ref": lesson.explanation_ref }))?
        .patch(&json!({ "teaching": lesson }))?
        .next(next))
}

fn ask(input: &StepInput) -> Result<StepOutput, StepError> {
    let State {
        teaching: mut lesson,
    } = input.state()?;
    // What the student reacts to: the explanation first, then the teacher's latest answer.
    let teacher = lesson
        .qa
        .last()
        .and_then(|e| e.answer.clone())
        .unwrap_or_else(|| lesson.explanation.clone());
    let round = lesson.round + 1;
    let text = prompt(
        "teaching/ask",
        json!({
            "topic": lesson.topic,
            "level": lesson.level,
            "teacher": teacher,
            "round": round,
        }),
        format!(
            "You are a {} student learning about \"{}\". Your teacher said:\n\n---\n{teacher}\n---\n\n\
             Ask the teacher at most three short questions about what you did not understand \
             or would like to know more about. Reply with the questions only.",
            lesson.level, lesson.topic
        ),
    );
    let questions = call(&lesson.model, &mut lesson.student, text)?;
    lesson.qa.push(Exchange {
        round,
        question: questions.text.clone(),
        answer: None,
    });
    StepOutput::new()
        .result(&json!({ "round": round, "questions": questions.text }))?
        .patch(&json!({ "teaching": lesson }))
}

fn answer(input: &StepInput) -> Result<StepOutput, StepError> {
    let State {
        teaching: mut lesson,
    } = input.state()?;
    let questions = lesson
        .qa
        .last()
        .map(|e| e.question.clone())
        .ok_or_else(|| StepError::fatal("answer runs after ask, but there are no questions"))?;
    let text = prompt(
        "teaching/answer",
        json!({ "topic": lesson.topic, "level": lesson.level, "questions": questions }),
        format!(
            "Your {} student asks:\n\n---\n{questions}\n---\n\n\
             Answer each question clearly and at the student's level, in at most 250 words in all.",
            lesson.level
        ),
    );
    let answer = call(&lesson.model, &mut lesson.teacher, text)?;
    if let Some(last) = lesson.qa.last_mut() {
        last.answer = Some(answer.text.clone());
    }
    lesson.round += 1;
    let next = if lesson.round < lesson.rounds {
        "ask"
    } else {
        "check"
    };
    Ok(StepOutput::new()
        .result(&json!({ "round": lesson.round, "answer": answer.text }))?
        .patch(&json!({ "teaching": lesson }))?
        .next(next))
}

fn check(input: &StepInput) -> Result<StepOutput, StepError> {
    let State {
        teaching: mut lesson,
    } = input.state()?;
    // Two calls in sequence: the student must see the teacher's question.
    let text = prompt(
        "teaching/check_question",
        json!({ "topic": lesson.topic, "level": lesson.level }),
        format!(
            "Now check your student's understanding: ask one question about \"{}\" that \
             the student can answer only if they understood the main idea. \
             Reply with the question only.",
            lesson.topic
        ),
    );
    let question = call(&lesson.model, &mut lesson.teacher, text)?.text;
    let text = prompt(
        "teaching/check_answer",
        json!({ "topic": lesson.topic, "question": question }),
        format!(
            "Your teacher asks you a question to check your understanding:\n\n{question}\n\n\
             Answer it in your own words, in at most 120 words."
        ),
    );
    let answer = call(&lesson.model, &mut lesson.student, text)?.text;
    lesson.check = Some(Check {
        question: question.clone(),
        answer: answer.clone(),
    });
    StepOutput::new()
        .result(&json!({ "question": question, "answer": answer }))?
        .patch(&json!({ "teaching": lesson }))
}

fn summary(input: &StepInput) -> Result<StepOutput, StepError> {
    let State {
        teaching: mut lesson,
    } = input.state()?;
    let check = lesson
        .check
        .clone()
        .ok_or_else(|| StepError::fatal("summary runs after check, but there is no check"))?;
    let text = prompt(
        "teaching/summary",
        json!({
            "topic": lesson.topic,
            "level": lesson.level,
            "question": check.question,
            "answer": check.answer,
        }),
        format!(
            "Your student answered your check question:\n\n---\n{}\n---\n\n\
             First say in one or two sentences whether the answer shows the student understood, \
             and correct any mistake. Then summarise what the student learned about \"{}\": \
             the key points as a short list. At most 200 words in all.",
            check.answer, lesson.topic
        ),
    );
    let summary = call(&lesson.model, &mut lesson.teacher, text)?;
    StepOutput::new()
        .result(&json!({
            "topic": lesson.topic,
            "level": lesson.level,
            "summary": summary.text,
            "summary_ref": summary.response_ref.path,
            "explanation": lesson.explanation,
            "qa": lesson.qa.iter().map(|e| json!({
                "round": e.round,
                "question": e.question,
                "answer": e.answer,
            })).collect::<Vec<_>>(),
            "check": { "question": check.question, "answer": check.answer },
        }))?
        .patch(&json!({ "teaching": { "summary": summary.text, "teacher": lesson.teacher } }))?
        .event("teaching.completed", &json!({ "topic": lesson.topic }))
}

ksi_sdk::export!(TeachingPlugin);
