//! The machine a run happened on: CPU count, kernel release and CPU model.
//!
//! Numbers without their machine mean little, so every report carries these. Probing reads
//! `/proc` and never fails: a missing or odd file gives `"unknown"`.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// CPUs this process may run on (what `nproc` prints).
    pub nproc: usize,
    /// The kernel release (what `uname -r` prints).
    pub kernel: String,
    /// The CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let nproc = std::thread::available_parallelism().map_or(1, |count| count.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_string())
            .ok()
            .filter(|text| !text.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model_from(&text))
            .unwrap_or_else(|| "unknown".to_string());
        Machine {
            nproc,
            kernel,
            cpu_model,
        }
    }
}

/// The first CPU model line of a `/proc/cpuinfo` text: `model name` on x86, else the keys other
/// architectures use.
pub fn cpu_model_from(cpuinfo: &str) -> Option<String> {
    for key in ["model name", "cpu model", "Model", "Hardware", "cpu"] {
        for line in cpuinfo.lines() {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.trim() == key && !value.is_empty() {
                return Some(value.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_is_read_from_x86_and_arm_cpuinfo() {
        // Proves the model line is found, whitespace-normalised, per architecture.
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\n\
                   model name\t: Intel(R) Xeon(R)  CPU @ 2.00GHz\nprocessor\t: 1\n";
        assert_eq!(
            cpu_model_from(x86).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.00GHz")
        );
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\n\nModel\t: Raspberry Pi 4 Model B\n";
        assert_eq!(
            cpu_model_from(arm).as_deref(),
            Some("Raspberry Pi 4 Model B")
        );
        assert_eq!(cpu_model_from("processor: 0\n"), None);
    }

    #[test]
    fn probing_this_machine_gives_something() {
        // Proves probing never fails and reports at least one CPU.
        let machine = Machine::probe();
        assert!(machine.nproc >= 1);
        assert!(!machine.kernel.is_empty());
        assert!(!machine.cpu_model.is_empty());
    }
}
