//! A container's timings (`HUSK_TIMINGS`), for benchmarks and debugging:
//! its monitor's phases and CPU time, and where the VMM writes its own.

/// Environment variable naming a path prefix: when set, a container's
/// monitor writes its timings to `<prefix>.runtime.json` (phases and its
/// own CPU time) and has the VMM write its own to `<prefix>.vmm.json`. For
/// benchmarks and debugging.
pub const TIMINGS_ENV: &str = "HUSK_TIMINGS";

/// Wall-clock phases of a container's monitor and its own CPU time.
pub struct Phases {
    start: std::time::Instant,
    marks: Vec<(&'static str, u64)>,
}

impl Default for Phases {
    fn default() -> Self {
        Self::new()
    }
}

impl Phases {
    /// Starts the clock.
    pub fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Records that `what` happened now.
    pub fn mark(&mut self, what: &'static str) {
        self.marks
            .push((what, self.start.elapsed().as_micros() as u64));
    }

    /// Writes the phases and this process's CPU time (all its threads, no
    /// children) where [`TIMINGS_ENV`] says.
    pub fn write(&self) {
        let Some(prefix) = std::env::var_os(TIMINGS_ENV) else {
            return;
        };
        // User and system time together, as getrusage's RUSAGE_SELF sums.
        let json = serde_json::json!({
            "phases_us": self.marks,
            "runtime_cpu_us": cpu_us(),
        });
        let mut path = prefix;
        path.push(".runtime.json");
        let _ = std::fs::write(path, json.to_string());
    }
}

/// This process's CPU time so far (all its threads, no children), µs.
pub fn cpu_us() -> u64 {
    let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    cpu.tv_sec as u64 * 1_000_000 + cpu.tv_nsec as u64 / 1000
}

/// Writes the CPU time of the process that ran `husk run` in the
/// foreground (its own, not its children's), at each of its steps, to
/// `<prefix>.client.json` where [`TIMINGS_ENV`] says: the benchmark's
/// split of host-side time.
pub fn write_client(steps: &[(&str, u64)]) {
    let Some(prefix) = std::env::var_os(TIMINGS_ENV) else {
        return;
    };
    let json = serde_json::json!({
        "client_cpu_us": cpu_us(),
        "steps_cpu_us": steps,
    });
    let mut path = prefix;
    path.push(".client.json");
    let _ = std::fs::write(path, json.to_string());
}
