//! `events publish | tail | list`: the bus from the command line.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::{Opened, clock, ellipsize, parse_json_arg, table};
use crate::bus::{DeliveryStatus, EventQuery, NewEvent};

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

/// Runs an `events` subcommand.
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
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if rows.is_empty() {
                println!("no events");
                return Ok(());
            }
            let mut t = if status.is_some() {
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
            for r in &rows {
                let data = ellipsize(&r.event.data.to_string(), 60);
                if status.is_some() {
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
    let stdout = std::io::stdout();
    loop {
        let evs = o.bus.events_after(last, pattern.as_deref(), 500)?;
        for e in &evs {
            let mut out = stdout.lock();
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
