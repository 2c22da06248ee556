//! A fault for the host's tests: `describe()` never returns. It must be refused within the
//! describe time limit, without holding up any other plugin's load.

use ksi_sdk::{Plugin, PluginInfo, StepError, StepInput, StepOutput};

struct DescribeLoops;

impl Plugin for DescribeLoops {
    fn describe() -> PluginInfo {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }

    fn run(_input: StepInput) -> Result<StepOutput, StepError> {
        Ok(StepOutput::new())
    }
}

ksi_sdk::export!(DescribeLoops);
