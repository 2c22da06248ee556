//! A fault for the host's tests: a component whose function table has over 30,000 elements
//! (see `build.rs`). The table limit is 100,000, so `plugin check` and the daemon must both
//! load it and run its step, which calls through the table.

use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput};

struct BigTable;

fn double(x: u64) -> u64 {
    x * 2
}

fn triple(x: u64) -> u64 {
    x * 3
}

impl Plugin for BigTable {
    fn describe() -> PluginInfo {
        PluginInfo::new("big-table", "0.1.0")
            .description("Has a function table of over 30,000 elements (a test fault)")
            .step("call", "Calls a function through the table")
    }

    fn run(input: StepInput) -> Result<StepOutput, StepError> {
        let pick: fn(u64) -> u64 = if std::hint::black_box(input.step_index) % 2 == 0 {
            double
        } else {
            triple
        };
        let f = std::hint::black_box(pick);
        StepOutput::new().result(&f(21))
    }
}

ksi_sdk::export!(BigTable);
