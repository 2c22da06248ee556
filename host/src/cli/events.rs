//! `events publish | tail | list`: the bus from the command line — on an opened data dir for
//! `ksi-host events` ([`run`]), through the daemon's API for `ksi events` ([`run_client`]).

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::client::{DaemonClient, encode};
use super::{Opened, clock, ellipsize, parse_json_arg, table};
use crate::bus::{DeliveryRow, DeliveryStatus, Event, EventQuery, NewEvent};

/// Commands on the event bus.
#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// Publish one event (durable when the command returns)
    Publish {
        /// Dotted topic, e.g. demo.hello
        topic: String,
        /// JSON payload, e.g. '{"n": 1}'
        json: String,
        /// Correlation id to attach
        #[arg(long)]
        correlation: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json_output: bool,
    },
    /// Follow events as they are published, like tail -f
    Tail {
        /// Topic pattern: `*` one segment, `>` the rest (default: everything)
        pattern: Option<String>,
        /// Start after this event id instead of at the end
        #[arg(long)]
        after: Option<i64>,
        /// Show the last N events first
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Stop after printing this many events
        #[arg(long)]
        count: Option<usize>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// List events, or deliveries in a status (e.g. --status dead for the dead letters)
    List {
        /// Only deliveries in this status
        #[arg(long, value_enum)]
        status: Option<DeliveryStatus>,
        /// Topic pattern
        #[arg(long)]
        topic: Option<String>,
        /// Only events after this id
        #[arg(long)]
        after: Option<i64>,
        /// At most this many rows
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
}

/// Runs an `events` subcommand on an opened data dir (`ksi-host events`).
pub async fn run(cmd: EventsCmd, o: Opened) -> anyhow::Result<()> {
    match cmd {
        EventsCmd::Publish {
            topic,
            json: payload,
            correlation,
            json_output,
        } => {
            let data = parse_json_arg("the event payload", &payload)?;
            let mut ev = NewEvent::new(topic.clone(), data);
            ev.correlation_id = correlation;
            let id = o.bus.publish(ev).await?;
            if json_output {
                println!("{}", json!({ "id": id, "topic": topic }));
            } else {
                println!("published event {id} on {topic}");
            }
        }
        EventsCmd::Tail {
            pattern,
            after,
            lines,
            count,
            json,
        } => tail(&o, pattern, after, lines, count, json).await?,
        EventsCmd::List {
            status,
            topic,
            after,
            limit,
            json,
        } => {
            let rows = o.bus.list(&EventQuery {
                pattern: topic,
                status,
                after_id: after,
                limit,
            })?;
            print_list(&rows, status.is_some(), json)?;
        }
    }
    Ok(())
}

/// Prints listed events (or deliveries, with a status filter) as a table or JSON.
fn print_list(rows: &[DeliveryRow], deliveries: bool, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no events");
        return Ok(());
    }
    let mut t = if deliveries {
        table(&[
            "id",
            "time",
            "topic",
            "subscription",
            "status",
            "attempts",
            "last error",
            "data",
        ])
    } else {
        table(&["id", "time", "topic", "data"])
    };
    for r in rows {
        let data = ellipsize(&r.event.data.to_string(), 60);
        if deliveries {
            t.add_row(vec![
                r.event.id.to_string(),
                clock(r.event.created_at),
                r.event.topic.clone(),
                r.subscription.clone(),
                r.status.clone(),
                r.attempts.to_string(),
                ellipsize(r.last_error.as_deref().unwrap_or(""), 50),
                data,
            ]);
        } else {
            t.add_row(vec![
                r.event.id.to_string(),
                clock(r.event.created_at),
                r.event.topic.clone(),
                data,
            ]);
        }
    }
    println!("{t}");
    Ok(())
}

/// One followed event as a line (or JSON with `json`).
fn print_event(e: &Event, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(e)?)?;
    } else {
        writeln!(
            out,
            "{:>8}  {}  {:<32}  {}",
            e.id,
            clock(e.created_at),
            e.topic,
            ellipsize(&e.data.to_string(), 100)
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Runs an `events` subcommand through the daemon's API (`ksi events`).
///
/// # Errors
/// Bad input (the daemon names it) or an unreachable daemon.
pub async fn run_client(cmd: EventsCmd, client: &DaemonClient) -> anyhow::Result<()> {
    match cmd {
        EventsCmd::Publish {
            topic,
            json: payload,
            correlation,
            json_output,
        } => {
            let data = parse_json_arg("the event payload", &payload)?;
            let b = client
                .call(
                    "POST",
                    "/events",
                    Some(json!({ "topic": topic, "data": data, "correlation_id": correlation })),
                )
                .await?;
            if json_output {
                println!("{}", json!({ "id": b["id"], "topic": topic }));
            } else {
                println!("published event {} on {topic}", b["id"]);
            }
        }
        EventsCmd::List {
            status,
            topic,
            after,
            limit,
            json,
        } => {
            let mut path = format!("/events?limit={limit}");
            if let Some(st) = status {
                path.push_str(&format!("&status={}", st.as_str()));
            }
            if let Some(t) = &topic {
                path.push_str(&format!("&topic={}", encode(t)));
            }
            if let Some(a) = after {
                path.push_str(&format!("&since={a}"));
            }
            let b = client.get(&path).await?;
            let rows: Vec<DeliveryRow> = serde_json::from_value(b["events"].clone())?;
            print_list(&rows, status.is_some(), json)?;
        }
        EventsCmd::Tail {
            pattern,
            after,
            lines,
            count,
            json,
        } => {
            let pattern = pattern.filter(|p| p != ">");
            let topic = pattern
                .as_deref()
                .map(|p| format!("topic={}", encode(p)))
                .unwrap_or_default();
            // The backlog (the last N, or everything after --after) is replayed by the stream
            // from its resume point, so no event falls between backlog and live.
            let last_id = match after {
                Some(id) => Some(id),
                None if lines == 0 => None,
                None => {
                    let b = client
                        .get(&format!("/events?latest={}&{topic}", lines.min(1000)))
                        .await?;
                    b["events"][0]["event"]["id"].as_i64().map(|id| id - 1)
                }
            };
            let mut path = format!("/events/stream?named=false&{topic}");
            if let Some(id) = last_id {
                path.push_str(&format!("&last_id={id}"));
            }
            let mut stream = client.stream(&path).await?;
            let mut printed = 0usize;
            while let Some(v) = stream.next_event().await? {
                let e: Event = serde_json::from_value(v)?;
                print_event(&e, json)?;
                printed += 1;
                if count.is_some_and(|c| printed >= c) {
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn tail(
    o: &Opened,
    pattern: Option<String>,
    after: Option<i64>,
    lines: usize,
    count: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    let pattern = pattern.filter(|p| p != ">");
    let mut last = match after {
        Some(id) => id,
        None => {
            let newest = *o.store.published().borrow();
            let recent = o.bus.latest(pattern.as_deref(), lines)?;
            recent.first().map(|e| e.id - 1).unwrap_or(newest)
        }
    };
    let mut printed = 0usize;
    let mut published = o.store.published();
    loop {
        let evs = o.bus.events_after(last, pattern.as_deref(), 500)?;
        for e in &evs {
            print_event(e, json)?;
            last = e.id;
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        if evs.len() == 500 {
            continue;
        }
        // Events from this process wake us at once; other processes' commits are seen
        // within the poll interval (the WAL is shared, the notification is not).
        tokio::select! {
            _ = published.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
