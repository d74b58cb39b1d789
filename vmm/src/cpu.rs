//! vCPU set-up: CPUID, boot MSRs, FPU and the local APIC's LINT pins.
//!
//! What each vCPU is told before its first KVM_RUN. Nothing here runs a vCPU
//! or touches guest memory.

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry};

use crate::snapshot::VcpuState;
use kvm_ioctls::VcpuFd;
use thiserror::Error;

/// Errors configuring a vCPU.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A vCPU ioctl failed.
    #[error("cannot {0} of vCPU {1}")]
    Ioctl(&'static str, u8, #[source] kvm_ioctls::Error),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set only {0} of {1} boot MSRs on vCPU {2}")]
    Msrs(usize, usize, u8),
    /// A saved CPUID table larger than KVM takes.
    #[error("vCPU {id}'s saved CPUID table has {count} entries, more than KVM takes")]
    CpuidEntries {
        /// Entries in the table.
        count: usize,
        /// The vCPU.
        id: u8,
    },
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_HTT: u32 = 1 << 28;

/// Adjusts the host-supported CPUID table for vCPU `id` of `count`: its APIC
/// ID, the number of logical CPUs, and the hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx |= CPUID_HYPERVISOR;
                if count > 1 {
                    entry.edx |= CPUID_HTT;
                } else {
                    entry.edx &= !CPUID_HTT;
                }
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

/// The MSRs a vCPU starts with (the values Linux expects from firmware).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    ]
}

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as i8;
    }
}

/// Sets a LVT entry's delivery mode (bits 8-10), keeping its other bits.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures vCPU `id` of `count` for boot: CPUID, MSRs, FPU, and on the
/// local APIC LINT0 as ExtINT and LINT1 as NMI (as a PC's firmware does).
pub fn configure_vcpu(vcpu: &VcpuFd, supported: &CpuId, id: u8, count: u8) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&vcpu_cpuid(supported, id, count))
        .map_err(|e| CpuError::Ioctl("set CPUID", id, e))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs(0, entries.len(), id))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuError::Ioctl("set boot MSRs", id, e))?;
    if set != entries.len() {
        return Err(CpuError::Msrs(set, entries.len(), id));
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Ioctl("set FPU state", id, e))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Ioctl("read local APIC", id, e))?;
    let lint0 = with_delivery_mode(lapic_reg(&lapic, APIC_LVT0), APIC_MODE_EXTINT);
    let lint1 = with_delivery_mode(lapic_reg(&lapic, APIC_LVT1), APIC_MODE_NMI);
    set_lapic_reg(&mut lapic, APIC_LVT0, lint0);
    set_lapic_reg(&mut lapic, APIC_LVT1, lint1);
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Ioctl("set local APIC", id, e))?;
    Ok(())
}

/// Sets a restored vCPU's CPUID table, the one it was saved with; the
/// rest of its state comes from [`restore_vcpu`].
pub fn restore_cpuid(vcpu: &VcpuFd, state: &VcpuState, id: u8) -> Result<(), CpuError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| CpuError::CpuidEntries {
        count: state.cpuid.len(),
        id,
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuError::Ioctl("set CPUID", id, e))
}

/// Reads every MSR in `indices` that KVM will read, skipping the ones it
/// refuses (KVM_GET_MSRS stops at the first it cannot read).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32], id: u8) -> Result<Vec<(u32, u64)>, CpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs(0, entries.len(), id))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| CpuError::Ioctl("read MSRs", id, e))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the one that failed and go on after it.
        rest.drain(..(read + 1).min(rest.len()));
    }
    Ok(out)
}

/// Saves vCPU `id`'s state. The vCPU must not be running.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32], id: u8) -> Result<VcpuState, CpuError> {
    let e = |what| move |err| CpuError::Ioctl(what, id, err);
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(e("read the MP state"))?,
        regs: vcpu.get_regs().map_err(e("read registers"))?,
        sregs: vcpu.get_sregs().map_err(e("read special registers"))?,
        xsave: vcpu.get_xsave().map_err(e("read XSAVE state"))?,
        xcrs: vcpu.get_xcrs().map_err(e("read XCR0"))?,
        debugregs: vcpu.get_debug_regs().map_err(e("read debug registers"))?,
        lapic: vcpu.get_lapic().map_err(e("read local APIC"))?,
        msrs: read_msrs(vcpu, msr_indices, id)?,
        events: vcpu.get_vcpu_events().map_err(e("read vCPU events"))?,
        cpuid: vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(e("read CPUID"))?
            .as_slice()
            .to_vec(),
    })
}

/// Restores vCPU `id` from `state`, in the order KVM needs (Firecracker's:
/// MP state, registers, special registers, XSAVE, debug registers, LAPIC,
/// MSRs, events last, as they depend on the rest).
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState, id: u8) -> Result<(), CpuError> {
    let e = |what| move |err| CpuError::Ioctl(what, id, err);
    vcpu.set_mp_state(state.mp_state)
        .map_err(e("set the MP state"))?;
    vcpu.set_regs(&state.regs).map_err(e("set registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(e("set special registers"))?;
    // SAFETY: the XSAVE area comes from KVM_GET_XSAVE of a vCPU of the same
    // VM shape on this host (the snapshot checks both), so its size and
    // layout are what KVM_SET_XSAVE expects.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(e("set XSAVE state"))?;
    // After the special registers: the guest's CR4.OSXSAVE is what makes
    // KVM load this XCR0 while the guest runs.
    vcpu.set_xcrs(&state.xcrs).map_err(e("set XCR0"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(e("set debug registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(e("set local APIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs(0, entries.len(), id))?;
    let set = vcpu.set_msrs(&msrs).map_err(e("set MSRs"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs(set, entries.len(), id));
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(e("set vCPU events"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn cpuid_names_each_vcpu_and_the_count() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 99,
                ..Default::default()
            },
        ];
        let supported = CpuId::from_entries(&entries).unwrap();
        let cpuid = vcpu_cpuid(&supported, 3, 4);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & CPUID_HTT, 0);
        assert_eq!(cpuid.as_slice()[1].edx, 3);
        let single = vcpu_cpuid(&supported, 0, 1);
        assert_eq!(single.as_slice()[0].edx & CPUID_HTT, 0);
    }

    #[test]
    fn lapic_delivery_modes_keep_other_bits() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0000);
        let reg = with_delivery_mode(lapic_reg(&state, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(reg, 0x0001_0700);
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }
}
