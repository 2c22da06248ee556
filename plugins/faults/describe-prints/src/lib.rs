//! A fault for the host's tests: `describe()` writes to stdout and stderr (as every panic
//! message does) and then describes itself properly. It must load.

use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput};

struct DescribePrints;

impl Plugin for DescribePrints {
    fn describe() -> PluginInfo {
        println!("describe() says hello on stdout");
        eprintln!("describe() says hello on stderr");
        PluginInfo::new("describe-prints", "0.1.0")
            .description("Writes to stdout and stderr in describe() (a test fault)")
            .step("noop", "Does nothing")
    }

    fn run(_input: StepInput) -> Result<StepOutput, StepError> {
        Ok(StepOutput::new())
    }
}

ksi_sdk::export!(DescribePrints);
