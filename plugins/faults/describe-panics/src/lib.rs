//! A fault for the host's tests: `describe()` panics (the panic message goes to stderr, then
//! the guest aborts). It must be refused, never take the host down.

use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput};

struct DescribePanics;

impl Plugin for DescribePanics {
    fn describe() -> PluginInfo {
        panic!("describe-panics cannot describe itself");
    }

    fn run(_input: StepInput) -> Result<StepOutput, StepError> {
        Ok(StepOutput::new())
    }
}

ksi_sdk::export!(DescribePanics);
