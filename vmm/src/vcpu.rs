//! The vCPU threads: one per vCPU, each looping on KVM_RUN and routing port
//! and MMIO exits to the buses.
//!
//! A vCPU thread never decides the VM's fate: when its vCPU cannot go on it
//! reports why ([`VcpuStop`]) and ends; the VM's owner decides what that
//! means for the guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::thread::JoinHandle;

use kvm_bindings::KVM_SYSTEM_EVENT_CRASH;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::cpu::{self, CpuError};
use crate::devices::Bus;
use crate::snapshot::VcpuState;
use crate::timing::Clock;

/// What the owner of the VM asks of its vCPU threads while they run.
pub struct VcpuControl {
    /// The debug-port mark that makes every vCPU save its state, or
    /// `NO_MARK`.
    save_mark: AtomicU16,
    /// Counts the saves asked for: a vCPU saves once per count.
    save: AtomicU64,
    pause: AtomicBool,
    /// The MSRs KVM can save on this host.
    msr_indices: Vec<u32>,
}

const NO_MARK: u16 = u16::MAX;

impl VcpuControl {
    /// Nothing asked yet.
    pub fn new(msr_indices: Vec<u32>) -> Self {
        Self {
            save_mark: AtomicU16::new(NO_MARK),
            save: AtomicU64::new(0),
            pause: AtomicBool::new(false),
            msr_indices,
        }
    }

    /// Save state when the guest writes `mark` to the debug port. The vCPU
    /// that wrote it sees the request before it re-enters the guest.
    pub fn save_on_mark(&self, mark: u8) {
        self.save_mark.store(u16::from(mark), Ordering::Release);
    }

    /// Called by the debug port (on the writing vCPU's thread): the
    /// vCPUs stop and save their state once.
    pub fn mark_written(&self, mark: u8) {
        if self
            .save_mark
            .compare_exchange(
                u16::from(mark),
                NO_MARK,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.request_save();
        }
    }

    /// Ask every vCPU to save its state and stay stopped (paused) until
    /// [`VcpuControl::resume`].
    pub fn request_save(&self) {
        self.pause.store(true, Ordering::Release);
        self.save.fetch_add(1, Ordering::AcqRel);
    }

    /// Ask every vCPU to stop until [`VcpuControl::resume`].
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Let paused vCPUs go on (the owner unparks their threads).
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    /// Whether a pause is in force.
    pub fn paused(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// The save asked for last (0: none).
    fn save_requested(&self) -> u64 {
        self.save.load(Ordering::Acquire)
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what makes KVM_RUN return.
}

/// Installs the (empty) handler of the kick signal; idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Kicks a vCPU thread out of KVM_RUN (it sees EINTR).
pub fn kick(thread: &JoinHandle<()>) {
    // A thread that has already exited cannot be kicked; nothing to do.
    let _ = thread.kill(kick_signal());
}

/// KVM_INTERNAL_ERROR_EMULATION: an instruction the emulator cannot run.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// The emulation-failure exit carries the instruction bytes.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM could not emulate a guest instruction.
    EmulationFailure {
        /// Guest instruction pointer.
        rip: u64,
        /// The instruction's bytes, when KVM reported them.
        bytes: Vec<u8>,
    },
    /// Another KVM internal error.
    InternalError {
        /// KVM's suberror code.
        suberror: u32,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// Guest instruction pointer.
        rip: u64,
    },
    /// The guest reported a crash through a system event.
    Crash,
    /// The hardware refused to enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The guest stopped with an exit the VMM does not handle.
    Unexpected(String),
    /// KVM_RUN itself failed.
    RunFailed(String),
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::EmulationFailure { rip, bytes } => {
                write!(
                    f,
                    "KVM could not emulate the guest instruction at rip {rip:#x}"
                )?;
                if !bytes.is_empty() {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    write!(f, " (bytes {})", hex.join(" "))?;
                }
                Ok(())
            }
            VcpuStop::InternalError { suberror, rip } => {
                write!(f, "KVM internal error {suberror} at rip {rip:#x}")
            }
            VcpuStop::TripleFault { rip } => write!(f, "guest triple-faulted at rip {rip:#x}"),
            VcpuStop::Crash => write!(f, "guest reported a crash"),
            VcpuStop::FailEntry { reason } => {
                write!(
                    f,
                    "KVM could not enter the guest (hardware reason {reason:#x})"
                )
            }
            VcpuStop::Unexpected(exit) => write!(f, "unexpected vCPU exit {exit}"),
            VcpuStop::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

/// What a vCPU thread needs: its vCPU, the buses and somewhere to report.
pub struct VcpuThread {
    /// vCPU index (also its APIC ID).
    pub id: u8,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Boot clock (the boot vCPU records its first KVM_RUN).
    pub clock: Arc<Clock>,
    /// Set once the guest has said it is done (power-off, reset, panic):
    /// the vCPU then runs no further guest code while the VMM exits.
    pub ended: Arc<AtomicBool>,
    /// Requests from the VM's owner.
    pub control: Arc<VcpuControl>,
    /// Called once when the vCPU stops.
    pub on_stop: Box<dyn FnOnce(u8, VcpuStop) + Send>,
    /// Called once with the vCPU's state when a save was requested.
    pub on_saved: Box<dyn Fn(u8, Result<VcpuState, CpuError>) + Send>,
    /// Called each time the vCPU stops for a pause.
    pub on_paused: Box<dyn Fn(u8) + Send>,
    /// The virtio-fs shares this thread may serve (crate::confine).
    pub shares: Arc<Vec<crate::devices::virtio::fs::Share>>,
}

impl VcpuThread {
    /// Starts the thread `husk-vcpuN`.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("husk-vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        match crate::confine::vcpu_thread(&self.shares) {
            Ok(crate::confine::Landlocked::Fully) => {}
            Ok(how) if self.id == 0 => {
                eprintln!(
                    "husk-vmm: Landlock: {how:?} enforced by this kernel; seccomp still holds"
                );
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("husk-vmm: cannot confine vCPU {}: {e}", self.id);
                // SAFETY: _exit ends the process; it does not run the guest
                // unconfined.
                unsafe { libc::_exit(crate::seccomp::EXIT_SECCOMP) };
            }
        }
        crate::confine::enter(crate::seccomp::Thread::Vcpu);
        if self.id == 0 {
            self.clock.first_kvm_run();
        }
        let mut saved = 0;
        let stop = loop {
            if let Some(stop) = self.run_once() {
                break stop;
            }
            self.save_if_asked(&mut saved);
            if self.control.paused() {
                (self.on_paused)(self.id);
                while self.control.paused() {
                    // A snapshot of a paused VM is asked for here.
                    self.save_if_asked(&mut saved);
                    std::thread::park();
                }
            }
            if self.ended.load(Ordering::Acquire) {
                // The owner is ending the process; stay out of the guest.
                loop {
                    std::thread::park();
                }
            }
        };
        (self.on_stop)(self.id, stop);
    }

    /// When a save was asked for since the last one: completes the exit
    /// being handled, and gives the vCPU's state to the owner. The save
    /// also paused the vCPUs: the loop then waits for a resume, or for
    /// the owner to end the process.
    fn save_if_asked(&mut self, saved: &mut u64) {
        let asked = self.control.save_requested();
        if asked == *saved {
            return;
        }
        *saved = asked;
        // KVM finishes an I/O instruction only on the next KVM_RUN; with
        // immediate_exit set, that run completes it and returns at once.
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
        let state = cpu::save_vcpu(&self.vcpu, &self.control.msr_indices, self.id);
        (self.on_saved)(self.id, state);
    }

    fn rip(&self) -> u64 {
        self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Runs the vCPU to its next exit and handles it; returns why the vCPU
    /// stopped, or None to run again.
    fn run_once(&mut self) -> Option<VcpuStop> {
        let exit = self.vcpu.run();
        // CPU time in the device models counts as host-side work (CPU
        // time, not wall time: a thread the handler wakes may run on this
        // CPU meanwhile, and its time is its own). Measured only when the
        // timings are written: each read is a system call.
        let measuring = crate::timing::MEASURE_DEVICES.load(std::sync::atomic::Ordering::Relaxed);
        let handled = if measuring {
            crate::timing::thread_cpu_ns()
        } else {
            0
        };
        let device = || {
            if measuring {
                crate::timing::DEVICE_NS.fetch_add(
                    crate::timing::thread_cpu_ns().saturating_sub(handled),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            None
        };
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                device()
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
                device()
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                device()
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                device()
            }
            Ok(VcpuExit::Shutdown) => Some(VcpuStop::TripleFault { rip: self.rip() }),
            Ok(VcpuExit::InternalError) => Some(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, _)) => Some(VcpuStop::FailEntry { reason }),
            Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_CRASH => {
                Some(VcpuStop::Crash)
            }
            Ok(other) => Some(VcpuStop::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuStop::RunFailed(e.to_string())),
        }
    }

    fn internal_error(&mut self) -> VcpuStop {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, KVM has filled the
        // `internal` member of the exit union; `emulation_failure` overlays
        // it with the same leading suberror and ndata fields, and its flags
        // and instruction bytes are valid when ndata and flags say so
        // (checked below). Every field is plain integer data.
        let (suberror, flags, insn) = unsafe {
            let failure = run.__bindgen_anon_1.emulation_failure;
            let insn = failure.__bindgen_anon_1.__bindgen_anon_1;
            let len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            (
                failure.suberror,
                if failure.ndata >= 2 { failure.flags } else { 0 },
                insn.insn_bytes[..len].to_vec(),
            )
        };
        let rip = self.rip();
        if suberror == INTERNAL_ERROR_EMULATION {
            let bytes = if flags & EMULATION_FLAG_INSTRUCTION_BYTES != 0 {
                insn
            } else {
                Vec::new()
            };
            VcpuStop::EmulationFailure { rip, bytes }
        } else {
            VcpuStop::InternalError { suberror, rip }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_read_as_sentences_with_the_rip() {
        let s = VcpuStop::EmulationFailure {
            rip: 0xffff_ffff_8114_4833,
            bytes: vec![0xf0, 0x49, 0x0f, 0xc7],
        };
        assert_eq!(
            s.to_string(),
            "KVM could not emulate the guest instruction at rip 0xffffffff81144833 \
             (bytes f0 49 0f c7)"
        );
        assert_eq!(
            VcpuStop::TripleFault { rip: 0x1000 }.to_string(),
            "guest triple-faulted at rip 0x1000"
        );
    }
}
