//! What the VMM needs to know about the host it runs on.
//!
//! On hosts whose `/dev/kvm` has no hardware virtualization behind it (PVM,
//! see docs/guest-kernel.md), guest kernel mode is run by KVM's instruction
//! emulator, which lacks some instructions. The guest sees the machine's
//! real CPUID there whatever the VMM sets, so the only way to keep the guest
//! kernel off those instructions is the kernel's own command line. On hosts
//! with VMX or SVM nothing is added.

/// Kernel arguments that keep a guest off instructions KVM's emulator lacks:
/// `noxsave` (xrstor, and every AVX feature with it) and a `clearcpuid=`
/// list of the features the kernel would otherwise use in kernel mode
/// (cmpxchg16b in SLUB, popcnt, stac/clac, rdrand, rdgsbase, rep movsb
/// variants, invpcid, pku, umip, clflushopt, clwb, rdpid). The kernel reads
/// at most 128 characters of `clearcpuid=`, so only kernel-mode features
/// are listed: user space runs natively and may use everything.
/// `husk_xstate=bounce` makes the Husk guest kernel save user mode's AVX and
/// AVX-512 state across preemption, which `noxsave` leaves it unable to do
/// itself (docs/guest-kernel.md, "Vector state").
pub const EMULATED_KERNEL_MODE_ARGS: &str = "noxsave husk_xstate=bounce clearcpuid=cx16,popcnt,smap,smep,rdrand,rdseed,fsgsbase,erms,fsrm,invpcid,pku,ospke,umip,clflushopt,clwb,rdpid";

/// True when the host CPU offers neither VMX nor SVM, so `/dev/kvm` runs
/// guest kernel mode in an emulator. Read from CPUID (leaf 1 ECX bit 5,
/// leaf 0x8000_0001 ECX bit 2), the source of /proc/cpuinfo's `vmx` and
/// `svm` flags, at a fraction of the cost of reading that file.
pub fn kernel_mode_emulated() -> bool {
    use std::arch::x86_64::__cpuid;
    // CPUID exists on every x86_64 CPU and never faults.
    let vmx = __cpuid(1).ecx & (1 << 5) != 0;
    let svm = __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 2) != 0;
    !(vmx || svm)
}

/// The host's total memory in MiB, from sysinfo(2): no file to read, so
/// it answers inside the VMM's jail too.
pub fn total_memory_mib() -> Option<u64> {
    let info = rustix::system::sysinfo();
    let unit = u64::from(info.mem_unit.max(1));
    Some((info.totalram * unit) >> 20)
}

#[cfg(test)]
fn meminfo_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_agrees_with_proc_cpuinfo() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flagged = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        assert_eq!(kernel_mode_emulated(), !flagged);
    }

    #[test]
    fn clearcpuid_fits_the_kernels_buffer() {
        let list = EMULATED_KERNEL_MODE_ARGS
            .split_whitespace()
            .find_map(|a| a.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(
            list.len() < 128,
            "clearcpuid list is {} characters",
            list.len()
        );
    }

    #[test]
    fn total_memory_agrees_with_proc_meminfo() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        assert_eq!(total_memory_mib(), meminfo_total_mib(&meminfo));
    }

    #[test]
    fn reads_total_memory() {
        let meminfo = "MemTotal:       24573412 kB\nMemFree: 1 kB\n";
        assert_eq!(meminfo_total_mib(meminfo), Some(23997));
        assert_eq!(meminfo_total_mib("nothing"), None);
    }
}
