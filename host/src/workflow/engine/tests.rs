//! Engine tests with in-process handlers (closures) and a counting Claude double.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::config::SyncMode;
use crate::store::StoreOptions;
use crate::workflow::{BoxFuture, ClaudeAnswer, ClaudeFailure, ClaudeRequest, ResolvedStep};

type Handler = Arc<
    dyn Fn(StepInput, Arc<StepContext>) -> BoxFuture<'static, Result<StepOutput, StepError>>
        + Send
        + Sync,
>;

#[derive(Default, Clone)]
struct FnRunner {
    handlers: Arc<Mutex<HashMap<String, Handler>>>,
}

impl FnRunner {
    fn on<F, Fut>(&self, name: &str, f: F) -> &Self
    where
        F: Fn(StepInput, Arc<StepContext>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<StepOutput, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.handlers
            .lock()
            .unwrap()
            .insert(name.to_string(), Arc::new(move |i, c| Box::pin(f(i, c))));
        self
    }
}

impl StepRunner for FnRunner {
    fn resolve(&self, h: &HandlerRef) -> Result<ResolvedStep, String> {
        let key = format!("{}.{}", h.plugin, h.step);
        let handler = self
            .handlers
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("no handler {key}"))?;
        Ok(ResolvedStep {
            plugin: h.plugin.clone(),
            version: "1.0.0".into(),
            sha256: "test".into(),
            step: h.step.clone(),
            handle: Arc::new(handler),
        })
    }

    fn run(
        &self,
        step: ResolvedStep,
        input: StepInput,
        ctx: Arc<StepContext>,
    ) -> BoxFuture<'static, Result<StepOutput, StepError>> {
        let h = step.handle.downcast_ref::<Handler>().unwrap().clone();
        h(input, ctx)
    }
}

#[derive(Default)]
struct CountingClaude {
    calls: AtomicUsize,
    delay_ms: u64,
}

impl ClaudeApi for CountingClaude {
    fn complete(
        &self,
        process_id: String,
        _wf: Option<String>,
        req: ClaudeRequest,
    ) -> BoxFuture<'static, Result<ClaudeAnswer, ClaudeFailure>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms;
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok(ClaudeAnswer {
                text: format!("answer to {}", req.prompt),
                session_id: "s1".into(),
                cost_usd: 0.01,
                tokens_in: 10,
                tokens_out: 5,
                process_id,
                ..Default::default()
            })
        })
    }

    fn recover(&self, _process_id: String) -> BoxFuture<'static, Option<ClaudeAnswer>> {
        Box::pin(async { None })
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    engine: Engine,
    claude: Arc<CountingClaude>,
    shutdown: watch::Sender<bool>,
    workers: tokio::task::JoinHandle<()>,
}

async fn harness(runner: &FnRunner, def: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_path(
        &dir.path().join("ksi.db"),
        &StoreOptions {
            sync: SyncMode::Normal,
            ..Default::default()
        },
    )
    .unwrap();
    let refs = Refs::open(dir.path()).unwrap();
    let claude = Arc::new(CountingClaude::default());
    let engine = Engine::new(
        store,
        refs,
        Arc::new(runner.clone()),
        claude.clone(),
        EngineOptions {
            workers: 4,
            lease: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let d =
        Definition::parse(Path::new("t.toml"), def, &|h| runner.resolve(h).map(|_| ())).unwrap();
    engine.add_definition(d);
    let (shutdown, rx) = watch::channel(false);
    let e = engine.clone();
    let workers = tokio::spawn(async move { e.run_workers(rx).await });
    Harness {
        _dir: dir,
        engine,
        claude,
        shutdown,
        workers,
    }
}

async fn finish(h: &Harness, id: &str) -> InstanceView {
    match tokio::time::timeout(Duration::from_secs(20), h.engine.wait(id)).await {
        Ok(v) => v.unwrap(),
        Err(_) => panic!(
            "workflow did not finish: {:?}\nhistory: {:#?}\nevents: {:#?}",
            h.engine.get(id),
            h.engine.history(id),
            h.engine.bus().list(&crate::bus::EventQuery {
                limit: 50,
                ..Default::default()
            })
        ),
    }
}

fn out(patch: Value) -> StepOutput {
    StepOutput {
        state_patch: patch,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_sequence_runs_in_order_and_accumulates_state() {
    let r = FnRunner::default();
    r.on(
        "t.a",
        |i, _| async move { Ok(out(json!({"trail": [i.step]}))) },
    );
    r.on("t.b", |i, _| async move {
        let mut trail = i.state["trail"].as_array().cloned().unwrap_or_default();
        trail.push(json!(i.step));
        Ok(out(json!({"trail": trail, "x": i.params["x"]})))
    });
    let h = harness(&r, "name='seq'\nversion='1.0.0'\n[params]\nx=1\n[[steps]]\nname='a'\nhandler='t.a'\n[[steps]]\nname='b'\nhandler='t.b'\n").await;
    let id = h.engine.start("seq", json!({"x": 7})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "completed");
    assert_eq!(v.state, json!({"trail": ["a", "b"], "x": 7}));
    let hist = h.engine.history(&id).unwrap();
    assert_eq!(
        hist.iter()
            .map(|s| (s.step.as_str(), s.status.as_str()))
            .collect::<Vec<_>>(),
        [("a", "completed"), ("b", "completed")]
    );
    assert_eq!(hist[0].plugin.as_deref(), Some("t@1.0.0"));
}

#[tokio::test]
async fn a_false_condition_skips_the_step() {
    let r = FnRunner::default();
    r.on("t.set", |_, _| async { Ok(out(json!({"ok": false}))) });
    r.on("t.never", |_, _| async { Ok(out(json!({"ran": true}))) });
    r.on("t.last", |_, _| async { Ok(out(json!({"last": true}))) });
    let def = "name='cond'\nversion='1.0.0'\n[[steps]]\nname='set'\nhandler='t.set'\n[[steps]]\nname='maybe'\nhandler='t.never'\nwhen='state.ok'\n[[steps]]\nname='last'\nhandler='t.last'\n";
    let h = harness(&r, def).await;
    let id = h.engine.start("cond", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.state, json!({"ok": false, "last": true}));
    let hist = h.engine.history(&id).unwrap();
    assert_eq!(hist[1].status, "skipped");
    assert!(hist[1].error.as_deref().unwrap().contains("state.ok"));
}

#[tokio::test]
async fn a_step_output_chooses_the_branch_and_loops_until_done() {
    let r = FnRunner::default();
    r.on("t.round", |i, _| async move {
        let n = i.state["rounds"].as_u64().unwrap_or(0) + 1;
        let next = if n < 3 { "round" } else { "wrap" };
        Ok(StepOutput {
            state_patch: json!({"rounds": n}),
            next: Some(next.into()),
            ..Default::default()
        })
    });
    r.on("t.wrap", |_, _| async { Ok(out(json!({"wrapped": true}))) });
    let def = "name='br'\nversion='1.0.0'\n[[steps]]\nname='round'\nhandler='t.round'\nbranches=['round','wrap']\n[[steps]]\nname='wrap'\nhandler='t.wrap'\n";
    let h = harness(&r, def).await;
    let id = h.engine.start("br", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.state, json!({"rounds": 3, "wrapped": true}));
    assert_eq!(h.engine.history(&id).unwrap().len(), 4);
}

#[tokio::test]
async fn a_branch_outside_the_declared_ones_fails_the_instance() {
    let r = FnRunner::default();
    r.on("t.bad", |_, _| async {
        Ok(StepOutput {
            next: Some("elsewhere".into()),
            ..Default::default()
        })
    });
    let h = harness(
        &r,
        "name='b'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.bad'\n",
    )
    .await;
    let id = h.engine.start("b", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "failed");
    assert!(
        v.error
            .unwrap()
            .contains("\"elsewhere\", which is not among its branches")
    );
}

#[tokio::test]
async fn a_parallel_group_joins_all_results_before_going_on() {
    let r = FnRunner::default();
    r.on("t.slow", |i, _| async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok(StepOutput {
            state_patch: json!({"slow_done": true}),
            result: json!({"who": i.step}),
            ..Default::default()
        })
    });
    r.on("t.fast", |i, _| async move {
        Ok(StepOutput {
            state_patch: json!({"fast_done": true}),
            result: json!({"who": i.step}),
            ..Default::default()
        })
    });
    r.on("t.after", |i, _| async move {
        assert!(
            i.state["results"]["s"].is_object() && i.state["results"]["f"].is_object(),
            "join sees all: {}",
            i.state
        );
        Ok(out(json!({"after": true})))
    });
    let def = "name='par'\nversion='1.0.0'\n[[steps]]\nname='fan'\nparallel=['s','f']\n[[steps]]\nname='s'\nhandler='t.slow'\n[[steps]]\nname='f'\nhandler='t.fast'\n[[steps]]\nname='after'\nhandler='t.after'\n";
    let h = harness(&r, def).await;
    let id = h.engine.start("par", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "completed", "{:?}", v.error);
    assert_eq!(
        v.state["results"],
        json!({"s": {"who": "s"}, "f": {"who": "f"}})
    );
    assert_eq!(v.state["after"], true);
    assert_eq!(v.state["slow_done"], true);
    let hist = h.engine.history(&id).unwrap();
    let after = hist.iter().find(|s| s.step == "after").unwrap();
    let slow = hist.iter().find(|s| s.step == "s").unwrap();
    assert!(
        after.started_at >= slow.finished_at.unwrap(),
        "after waited for the slow member"
    );
}

#[tokio::test]
async fn a_retryable_error_is_retried_then_succeeds() {
    let r = FnRunner::default();
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    r.on("t.flaky", move |i, _| {
        let t = t.clone();
        async move {
            t.fetch_add(1, Ordering::SeqCst);
            if i.attempt < 3 {
                Err(StepError::retryable(format!("flake {}", i.attempt)))
            } else {
                Ok(out(json!({"ok": i.attempt})))
            }
        }
    });
    let def = "name='rt'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.flaky'\nretry={max_attempts=3, backoff_ms=10}\n";
    let h = harness(&r, def).await;
    let id = h.engine.start("rt", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "completed");
    assert_eq!(v.state, json!({"ok": 3}));
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    let st: Vec<String> = h
        .engine
        .history(&id)
        .unwrap()
        .into_iter()
        .map(|s| s.status)
        .collect();
    assert_eq!(st, ["retrying", "retrying", "completed"]);
}

#[tokio::test]
async fn a_fatal_error_fails_the_instance_with_the_message() {
    let r = FnRunner::default();
    r.on("t.boom", |_, _| async {
        Err(StepError::fatal("the sky fell"))
    });
    r.on("t.never", |_, _| async { panic!("must not run") });
    let h = harness(&r, "name='f'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.boom'\n[[steps]]\nname='b'\nhandler='t.never'\n").await;
    let id = h.engine.start("f", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "failed");
    assert_eq!(
        v.error.as_deref(),
        Some("step \"a\" failed on attempt 1: the sky fell")
    );
    let hist = h.engine.history(&id).unwrap();
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].error.as_deref(), Some("the sky fell"));
}

#[tokio::test]
async fn retries_exhausted_fail_the_instance() {
    let r = FnRunner::default();
    r.on("t.always", |_, _| async {
        Err(StepError::retryable("still down"))
    });
    let h = harness(&r, "name='x'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.always'\nretry={max_attempts=2, backoff_ms=5}\n").await;
    let id = h.engine.start("x", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "failed");
    assert!(v.error.unwrap().contains("attempt 2: still down"));
}

#[tokio::test]
async fn cancel_stops_a_running_step_and_runs_nothing_after() {
    let r = FnRunner::default();
    r.on("t.hang", |_, _| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(out(json!({})))
    });
    r.on("t.never", |_, _| async { panic!("must not run") });
    let h = harness(&r, "name='c'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.hang'\n[[steps]]\nname='b'\nhandler='t.never'\n").await;
    let id = h.engine.start("c", json!({})).await.unwrap();
    while h.engine.get(&id).unwrap().current_step.as_deref() != Some("a")
        || h.engine.history(&id).unwrap().is_empty()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.engine.cancel(&id).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "cancelled");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hist = h.engine.history(&id).unwrap();
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].status, "discarded");
    assert!(matches!(
        h.engine.cancel(&id).await,
        Err(WorkflowError::WrongStatus { .. })
    ));
}

#[tokio::test]
async fn pause_holds_the_next_step_until_resume() {
    let r = FnRunner::default();
    r.on("t.a", |_, _| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(out(json!({"a": true})))
    });
    r.on("t.b", |_, _| async { Ok(out(json!({"b": true}))) });
    let h = harness(&r, "name='p'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.a'\n[[steps]]\nname='b'\nhandler='t.b'\n").await;
    let id = h.engine.start("p", json!({})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.engine.pause(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = h.engine.get(&id).unwrap();
    assert_eq!(v.status, "paused");
    assert_eq!(v.state, json!({"a": true}), "the running step finished");
    assert!(
        h.engine.history(&id).unwrap().iter().all(|s| s.step != "b"),
        "b waits"
    );
    h.engine.resume(&id).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "completed");
    assert_eq!(v.state, json!({"a": true, "b": true}));
}

#[tokio::test]
async fn retry_from_reruns_a_failed_instance_from_the_named_step() {
    let r = FnRunner::default();
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = fixed.clone();
    r.on("t.a", |_, _| async { Ok(out(json!({"a": 1}))) });
    r.on("t.b", move |_, _| {
        let f = f.clone();
        async move {
            if f.load(Ordering::SeqCst) {
                Ok(out(json!({"b": 1})))
            } else {
                Err(StepError::fatal("bug"))
            }
        }
    });
    let h = harness(&r, "name='r'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.a'\n[[steps]]\nname='b'\nhandler='t.b'\n").await;
    let id = h.engine.start("r", json!({})).await.unwrap();
    assert_eq!(finish(&h, &id).await.status, "failed");
    fixed.store(true, Ordering::SeqCst);
    h.engine.retry_from(&id, "b").await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "completed");
    assert_eq!(v.error, None);
    assert_eq!(v.state, json!({"a": 1, "b": 1}));
    let steps: Vec<String> = h
        .engine
        .history(&id)
        .unwrap()
        .into_iter()
        .map(|s| format!("{}:{}", s.step, s.status))
        .collect();
    assert_eq!(steps, ["a:completed", "b:failed", "b:completed"]);
    let e = h.engine.retry_from(&id, "zzz").await.unwrap_err();
    assert!(e.to_string().contains("no step \"zzz\""), "{e}");
}

#[tokio::test]
async fn large_state_goes_to_a_checkpoint_file_and_reads_back() {
    let r = FnRunner::default();
    r.on("t.big", |_, _| async {
        Ok(out(json!({"blob": "x".repeat(20_000)})))
    });
    r.on("t.check", |i, _| async move {
        assert_eq!(
            i.state["blob"].as_str().unwrap().len(),
            20_000,
            "the next step reads it back"
        );
        Ok(out(json!({"checked": true})))
    });
    let h = harness(&r, "name='big'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.big'\n[[steps]]\nname='b'\nhandler='t.check'\n").await;
    let id = h.engine.start("big", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(v.status, "completed", "{:?}", v.error);
    let cp = v.checkpoint_file.clone().expect("checkpoint reference");
    assert!(
        cp.path.starts_with(&format!("state/workflows/{id}/step_")),
        "{}",
        cp.path
    );
    assert!(cp.bytes > INLINE_STATE_MAX as u64);
    assert_eq!(v.state["checked"], true);
    assert_eq!(v.state["blob"].as_str().unwrap().len(), 20_000);
}

#[tokio::test]
async fn claude_calls_are_journaled_and_totals_recorded() {
    let r = FnRunner::default();
    r.on("t.ask", |_, ctx| async move {
        let a = ctx
            .claude_complete(ClaudeRequest {
                prompt: "hi".into(),
                ..Default::default()
            })
            .await
            .map_err(|e| StepError::fatal(e.message))?;
        let both = ctx
            .claude_complete_all(vec![
                ClaudeRequest {
                    prompt: "x".into(),
                    ..Default::default()
                },
                ClaudeRequest {
                    prompt: "y".into(),
                    ..Default::default()
                },
            ])
            .await;
        let texts: Vec<String> = both.into_iter().map(|r| r.unwrap().text).collect();
        Ok(out(json!({"first": a.text, "both": texts})))
    });
    let h = harness(
        &r,
        "name='c'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.ask'\n",
    )
    .await;
    let id = h.engine.start("c", json!({})).await.unwrap();
    let v = finish(&h, &id).await;
    assert_eq!(
        v.state,
        json!({"first": "answer to hi", "both": ["answer to x", "answer to y"]})
    );
    assert_eq!(v.claude_calls, 3);
    assert!((v.cost_usd - 0.03).abs() < 1e-9);
    assert_eq!(h.claude.calls.load(Ordering::SeqCst), 3);
}

/// A step whose second Claude call never returns, so the "daemon" can die mid-step.
fn two_calls(
    second_hangs: Arc<std::sync::atomic::AtomicBool>,
    second_prompt: &'static str,
) -> FnRunner {
    let r = FnRunner::default();
    r.on("t.two", move |_, ctx| {
        let hang = second_hangs.clone();
        async move {
            let a = ctx
                .claude_complete(ClaudeRequest {
                    prompt: "one".into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| StepError::fatal(e.message))?;
            if hang.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let b = ctx
                .claude_complete(ClaudeRequest {
                    prompt: second_prompt.into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| StepError::fatal(e.message))?;
            Ok(out(json!({"a": a.text, "b": b.text})))
        }
    });
    r
}

async fn crash_mid_step(second_prompt: &'static str) -> (InstanceView, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let def = "name='j'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.two'\n";
    let open = |runner: FnRunner, claude: Arc<CountingClaude>| {
        let path = dir.path().to_path_buf();
        async move {
            let store = Store::open_path(&path.join("ksi.db"), &StoreOptions::default()).unwrap();
            let engine = Engine::new(
                store.clone(),
                Refs::open(&path).unwrap(),
                Arc::new(runner.clone()),
                claude,
                EngineOptions {
                    workers: 2,
                    lease: Duration::from_secs(60),
                },
            )
            .await
            .unwrap();
            engine.add_definition(
                Definition::parse(Path::new("j.toml"), def, &|h| runner.resolve(h).map(|_| ()))
                    .unwrap(),
            );
            (store, engine)
        }
    };
    // First life: the first call completes, the second hangs; then the process "dies".
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let claude1 = Arc::new(CountingClaude::default());
    let (store1, e1) = open(two_calls(hang.clone(), "two"), claude1.clone()).await;
    let id = e1.start("j", json!({})).await.unwrap();
    let (tx1, rx1) = watch::channel(false);
    let e = e1.clone();
    let workers = tokio::spawn(async move { e.run_workers(rx1).await });
    while claude1.calls.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    workers.abort();
    drop(tx1);
    drop(e1);
    store1.close();
    // Second life: recovery re-runs the step; the completed call is replayed, not re-run.
    hang.store(false, Ordering::SeqCst);
    let claude2 = Arc::new(CountingClaude::default());
    let (_store2, e2) = open(two_calls(hang, second_prompt), claude2.clone()).await;
    e2.recover().await.unwrap();
    let (_tx2, rx2) = watch::channel(false);
    let e = e2.clone();
    tokio::spawn(async move { e.run_workers(rx2).await });
    let v = tokio::time::timeout(Duration::from_secs(20), e2.wait(&id))
        .await
        .unwrap()
        .unwrap();
    (
        v,
        claude1.calls.load(Ordering::SeqCst),
        claude2.calls.load(Ordering::SeqCst),
    )
}

#[tokio::test]
async fn a_rerun_after_a_crash_replays_completed_claude_calls() {
    let (v, first_life, second_life) = crash_mid_step("two").await;
    assert_eq!(v.status, "completed", "{:?}", v.error);
    assert_eq!(v.state, json!({"a": "answer to one", "b": "answer to two"}));
    assert_eq!(first_life, 1);
    assert_eq!(
        second_life, 1,
        "only the call that never completed ran again"
    );
    assert_eq!(v.claude_calls, 2);
}

#[tokio::test]
async fn a_rerun_making_a_different_call_is_a_journal_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_path(&dir.path().join("ksi.db"), &StoreOptions::default()).unwrap();
    let claude = Arc::new(CountingClaude::default());
    let ctx = StepContext::new(
        store.clone(),
        Refs::open(dir.path()).unwrap(),
        claude.clone(),
        "wf_x".into(),
        "j".into(),
        1,
        1,
        json!({}),
    );
    ctx.claude_complete(ClaudeRequest {
        prompt: "original".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rerun = StepContext::new(
        store,
        Refs::open(dir.path()).unwrap(),
        claude.clone(),
        "wf_x".into(),
        "j".into(),
        1,
        1,
        json!({}),
    );
    let e = rerun
        .claude_complete(ClaudeRequest {
            prompt: "changed".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.class, "journal_mismatch");
    assert!(
        e.message.contains("journal mismatch") && e.message.contains("retry-from"),
        "{}",
        e.message
    );
    assert_eq!(
        claude.calls.load(Ordering::SeqCst),
        1,
        "the changed call did not run"
    );
}

#[tokio::test]
async fn an_unknown_workflow_type_names_the_known_ones() {
    let r = FnRunner::default();
    r.on("t.a", |_, _| async { Ok(out(json!({}))) });
    let h = harness(
        &r,
        "name='known'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.a'\n",
    )
    .await;
    let e = h.engine.start("nope", json!({})).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "no workflow type \"nope\" is defined (known: known). Add a definition to the definitions directory"
    );
    let _ = h.shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), h.workers).await;
}

#[tokio::test]
async fn a_schedule_fires_once_per_tick_even_if_fired_again() {
    use crate::workflow::schedule;
    let r = FnRunner::default();
    r.on("t.a", |_, _| async { Ok(out(json!({"ran": true}))) });
    let h = harness(
        &r,
        "name='sch'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.a'\n",
    )
    .await;
    let s = schedule::add(&h.engine, "*/5 * * * *", "sch", json!({"from": "cron"}))
        .await
        .unwrap();
    let tick = s.next_fire_at.unwrap();
    assert!(tick > crate::store::now_ms());
    assert!(
        schedule::fire_due(&h.engine, tick - 1)
            .await
            .unwrap()
            .is_empty(),
        "not before its tick"
    );
    let first = schedule::fire_due(&h.engine, tick).await.unwrap();
    assert_eq!(first.len(), 1);
    // The same tick again (a crash and restart re-reading an old view) starts nothing.
    assert!(
        schedule::fire_due(&h.engine, tick)
            .await
            .unwrap()
            .is_empty()
    );
    let after = schedule::get(h.engine.store(), &s.id).unwrap().unwrap();
    assert_eq!(after.last_fired_at, Some(tick));
    assert_eq!(after.next_fire_at, Some(tick + 5 * 60 * 1000));
    let v = finish(&h, &first[0]).await;
    assert_eq!(v.params["from"], "cron");
    assert_eq!(v.state, json!({"ran": true}));
    // Ticks missed while the daemon was down fire once, not once per missed tick.
    let late = schedule::fire_due(&h.engine, tick + 60 * 60 * 1000)
        .await
        .unwrap();
    assert_eq!(late.len(), 1);
    assert!(
        schedule::get(h.engine.store(), &s.id)
            .unwrap()
            .unwrap()
            .next_fire_at
            .unwrap()
            > tick + 60 * 60 * 1000
    );
    schedule::remove(h.engine.store(), &s.id).await.unwrap();
    assert!(schedule::list(h.engine.store()).unwrap().is_empty());
}

#[tokio::test]
async fn a_bad_cron_or_unknown_workflow_is_refused() {
    use crate::workflow::schedule;
    let r = FnRunner::default();
    r.on("t.a", |_, _| async { Ok(out(json!({}))) });
    let h = harness(
        &r,
        "name='sch'\nversion='1.0.0'\n[[steps]]\nname='a'\nhandler='t.a'\n",
    )
    .await;
    let e = schedule::add(&h.engine, "every tuesday", "sch", json!({}))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cron expression \"every tuesday\" is invalid"),
        "{e}"
    );
    let e = schedule::add(&h.engine, "0 * * * *", "nope", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(e, WorkflowError::UnknownType { .. }), "{e}");
}
