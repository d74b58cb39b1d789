//! husk-vector-check: does the guest kernel keep this process's vector
//! registers when it preempts it?
//!
//! It asks the CPU and the kernel what user mode may use, as glibc, musl,
//! Go and Rust's `is_x86_feature_detected!` do (CPUID leaf 1 OSXSAVE and
//! AVX, leaf 7 AVX512F, then XGETBV for the state the kernel enabled), and
//! then, round after round, fills every register of each usable width
//! (XMM0-15; YMM0-15 when AVX is usable; ZMM0-31 when AVX-512 is) with a
//! pattern of its own (pid, round, register), spins for about a timer tick
//! without a system call, and reads them back. Run several at once on one
//! vCPU: the timer preempts them inside the window, and any state the
//! kernel does not keep across that shows as another process's pattern or
//! as zeros. (Across a system call the C ABI treats every vector register
//! as clobbered; docs/guest-kernel.md says what Husk's guest keeps there.)
//!
//! Usage: `husk-vector-check [ROUNDS]` (default 200). Prints one line,
//! `husk-vector-check: ok ...` and exits 0, or `husk-vector-check: FAIL ...`
//! naming the register, round, expected and found bytes and exits 1.

use std::arch::asm;
use std::arch::x86_64::{__cpuid, __cpuid_count};

/// What user mode may use, as programs find out.
struct Usable {
    xcr0: Option<u64>,
    avx: bool,
    avx512: bool,
}

fn usable() -> Usable {
    let leaf1 = __cpuid(1);
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    let xcr0 = osxsave.then(|| {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX=0 is valid whenever CPUID says OSXSAVE,
        // checked just above; it reads a register and touches no memory.
        unsafe {
            asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack))
        };
        (u64::from(hi) << 32) | u64::from(lo)
    });
    let x = xcr0.unwrap_or(0);
    let avx = leaf1.ecx & (1 << 28) != 0 && x & 0b110 == 0b110;
    let avx512f = __cpuid(0).eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 16) != 0;
    let avx512 = avx && avx512f && x & 0xe6 == 0xe6;
    Usable { xcr0, avx, avx512 }
}

/// Spin iterations between filling and checking: about 10 ms natively, a
/// guest timer tick (HZ=100), so that with several copies running on one
/// vCPU most rounds are preempted inside the window.
const SPIN: u64 = 20_000_000;

/// Fills XMM0-15 from `src`, spins, stores them to `dst`.
fn round_xmm(src: &[u8; 16 * 16], dst: &mut [u8; 16 * 16]) {
    // SAFETY: src and dst are 256 bytes, exactly the 16 unaligned 16-byte
    // loads and stores; r8 is declared and the vector registers are
    // declared clobbered through the C ABI.
    unsafe {
        asm!(
            "movdqu xmm0, [rsi]", "movdqu xmm1, [rsi+16]", "movdqu xmm2, [rsi+32]",
            "movdqu xmm3, [rsi+48]", "movdqu xmm4, [rsi+64]", "movdqu xmm5, [rsi+80]",
            "movdqu xmm6, [rsi+96]", "movdqu xmm7, [rsi+112]", "movdqu xmm8, [rsi+128]",
            "movdqu xmm9, [rsi+144]", "movdqu xmm10, [rsi+160]", "movdqu xmm11, [rsi+176]",
            "movdqu xmm12, [rsi+192]", "movdqu xmm13, [rsi+208]", "movdqu xmm14, [rsi+224]",
            "movdqu xmm15, [rsi+240]",
            "mov r8, {spin}", "2:", "dec r8", "jnz 2b",
            "movdqu [rdi], xmm0", "movdqu [rdi+16], xmm1", "movdqu [rdi+32], xmm2",
            "movdqu [rdi+48], xmm3", "movdqu [rdi+64], xmm4", "movdqu [rdi+80], xmm5",
            "movdqu [rdi+96], xmm6", "movdqu [rdi+112], xmm7", "movdqu [rdi+128], xmm8",
            "movdqu [rdi+144], xmm9", "movdqu [rdi+160], xmm10", "movdqu [rdi+176], xmm11",
            "movdqu [rdi+192], xmm12", "movdqu [rdi+208], xmm13", "movdqu [rdi+224], xmm14",
            "movdqu [rdi+240], xmm15",
            in("rsi") src.as_ptr(),
            in("rdi") dst.as_mut_ptr(),
            out("r8") _,
            spin = const SPIN,
            clobber_abi("C"),
        );
    }
}

/// Fills YMM0-15 from `src`, spins, stores them to `dst`.
///
/// # Safety
/// The CPU and the kernel must let user mode use AVX ([`usable`]).
#[target_feature(enable = "avx")]
unsafe fn round_ymm(src: &[u8; 16 * 32], dst: &mut [u8; 16 * 32]) {
    // SAFETY: as in round_xmm, with 32-byte registers; the caller checked
    // that AVX is usable.
    unsafe {
        asm!(
            "vmovdqu ymm0, [rsi]", "vmovdqu ymm1, [rsi+32]", "vmovdqu ymm2, [rsi+64]",
            "vmovdqu ymm3, [rsi+96]", "vmovdqu ymm4, [rsi+128]", "vmovdqu ymm5, [rsi+160]",
            "vmovdqu ymm6, [rsi+192]", "vmovdqu ymm7, [rsi+224]", "vmovdqu ymm8, [rsi+256]",
            "vmovdqu ymm9, [rsi+288]", "vmovdqu ymm10, [rsi+320]", "vmovdqu ymm11, [rsi+352]",
            "vmovdqu ymm12, [rsi+384]", "vmovdqu ymm13, [rsi+416]", "vmovdqu ymm14, [rsi+448]",
            "vmovdqu ymm15, [rsi+480]",
            "mov r8, {spin}", "2:", "dec r8", "jnz 2b",
            "vmovdqu [rdi], ymm0", "vmovdqu [rdi+32], ymm1", "vmovdqu [rdi+64], ymm2",
            "vmovdqu [rdi+96], ymm3", "vmovdqu [rdi+128], ymm4", "vmovdqu [rdi+160], ymm5",
            "vmovdqu [rdi+192], ymm6", "vmovdqu [rdi+224], ymm7", "vmovdqu [rdi+256], ymm8",
            "vmovdqu [rdi+288], ymm9", "vmovdqu [rdi+320], ymm10", "vmovdqu [rdi+352], ymm11",
            "vmovdqu [rdi+384], ymm12", "vmovdqu [rdi+416], ymm13", "vmovdqu [rdi+448], ymm14",
            "vmovdqu [rdi+480], ymm15",
            "vzeroupper",
            in("rsi") src.as_ptr(),
            in("rdi") dst.as_mut_ptr(),
            out("r8") _,
            spin = const SPIN,
            clobber_abi("C"),
        );
    }
}

/// Fills ZMM0-31 from `src`, spins, stores them to `dst`.
///
/// # Safety
/// The CPU and the kernel must let user mode use AVX-512F ([`usable`]).
#[target_feature(enable = "avx512f")]
unsafe fn round_zmm(src: &[u8; 32 * 64], dst: &mut [u8; 32 * 64]) {
    // SAFETY: as in round_xmm, with 32 registers of 64 bytes; the caller
    // checked that AVX-512F is usable.
    unsafe {
        asm!(
            "vmovdqu64 zmm0, [rsi]", "vmovdqu64 zmm1, [rsi+64]", "vmovdqu64 zmm2, [rsi+128]",
            "vmovdqu64 zmm3, [rsi+192]", "vmovdqu64 zmm4, [rsi+256]", "vmovdqu64 zmm5, [rsi+320]",
            "vmovdqu64 zmm6, [rsi+384]", "vmovdqu64 zmm7, [rsi+448]", "vmovdqu64 zmm8, [rsi+512]",
            "vmovdqu64 zmm9, [rsi+576]", "vmovdqu64 zmm10, [rsi+640]", "vmovdqu64 zmm11, [rsi+704]",
            "vmovdqu64 zmm12, [rsi+768]", "vmovdqu64 zmm13, [rsi+832]", "vmovdqu64 zmm14, [rsi+896]",
            "vmovdqu64 zmm15, [rsi+960]", "vmovdqu64 zmm16, [rsi+1024]", "vmovdqu64 zmm17, [rsi+1088]",
            "vmovdqu64 zmm18, [rsi+1152]", "vmovdqu64 zmm19, [rsi+1216]", "vmovdqu64 zmm20, [rsi+1280]",
            "vmovdqu64 zmm21, [rsi+1344]", "vmovdqu64 zmm22, [rsi+1408]", "vmovdqu64 zmm23, [rsi+1472]",
            "vmovdqu64 zmm24, [rsi+1536]", "vmovdqu64 zmm25, [rsi+1600]", "vmovdqu64 zmm26, [rsi+1664]",
            "vmovdqu64 zmm27, [rsi+1728]", "vmovdqu64 zmm28, [rsi+1792]", "vmovdqu64 zmm29, [rsi+1856]",
            "vmovdqu64 zmm30, [rsi+1920]", "vmovdqu64 zmm31, [rsi+1984]",
            "mov r8, {spin}", "2:", "dec r8", "jnz 2b",
            "vmovdqu64 [rdi], zmm0", "vmovdqu64 [rdi+64], zmm1", "vmovdqu64 [rdi+128], zmm2",
            "vmovdqu64 [rdi+192], zmm3", "vmovdqu64 [rdi+256], zmm4", "vmovdqu64 [rdi+320], zmm5",
            "vmovdqu64 [rdi+384], zmm6", "vmovdqu64 [rdi+448], zmm7", "vmovdqu64 [rdi+512], zmm8",
            "vmovdqu64 [rdi+576], zmm9", "vmovdqu64 [rdi+640], zmm10", "vmovdqu64 [rdi+704], zmm11",
            "vmovdqu64 [rdi+768], zmm12", "vmovdqu64 [rdi+832], zmm13", "vmovdqu64 [rdi+896], zmm14",
            "vmovdqu64 [rdi+960], zmm15", "vmovdqu64 [rdi+1024], zmm16", "vmovdqu64 [rdi+1088], zmm17",
            "vmovdqu64 [rdi+1152], zmm18", "vmovdqu64 [rdi+1216], zmm19", "vmovdqu64 [rdi+1280], zmm20",
            "vmovdqu64 [rdi+1344], zmm21", "vmovdqu64 [rdi+1408], zmm22", "vmovdqu64 [rdi+1472], zmm23",
            "vmovdqu64 [rdi+1536], zmm24", "vmovdqu64 [rdi+1600], zmm25", "vmovdqu64 [rdi+1664], zmm26",
            "vmovdqu64 [rdi+1728], zmm27", "vmovdqu64 [rdi+1792], zmm28", "vmovdqu64 [rdi+1856], zmm29",
            "vmovdqu64 [rdi+1920], zmm30", "vmovdqu64 [rdi+1984], zmm31",
            "vzeroupper",
            in("rsi") src.as_ptr(),
            in("rdi") dst.as_mut_ptr(),
            out("r8") _,
            spin = const SPIN,
            clobber_abi("C"),
        );
    }
}

/// A pattern no other process or round shares: every 8 bytes hold the pid,
/// the round, the register and the lane.
fn fill(buf: &mut [u8], width: usize, pid: u32, round: u32) {
    for (lane, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let reg = (lane * 8 / width) as u64;
        let v = (u64::from(pid) << 40) ^ (u64::from(round) << 16) ^ (reg << 8) ^ lane as u64;
        chunk.copy_from_slice(&v.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
}

/// The first register whose bytes differ, as a message.
fn compare(kind: &str, width: usize, round: u32, want: &[u8], got: &[u8]) -> Result<(), String> {
    for (reg, (w, g)) in want.chunks(width).zip(got.chunks(width)).enumerate() {
        if w != g {
            let hex = |b: &[u8]| {
                b.iter()
                    .rev()
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            };
            return Err(format!(
                "{kind}{reg} changed in round {round}: wrote {} found {}",
                hex(w),
                hex(g)
            ));
        }
    }
    Ok(())
}

fn run(rounds: u32, u: &Usable) -> Result<(), String> {
    let pid = std::process::id();
    let (mut xs, mut xd) = ([0u8; 256], [0u8; 256]);
    let (mut ys, mut yd) = ([0u8; 512], [0u8; 512]);
    let (mut zs, mut zd) = ([0u8; 2048], [0u8; 2048]);
    for round in 0..rounds {
        fill(&mut xs, 16, pid, round);
        round_xmm(&xs, &mut xd);
        compare("xmm", 16, round, &xs, &xd)?;
        if u.avx {
            fill(&mut ys, 32, pid, round);
            // SAFETY: usable() found AVX enabled by the CPU and the kernel.
            unsafe { round_ymm(&ys, &mut yd) };
            compare("ymm", 32, round, &ys, &yd)?;
        }
        if u.avx512 {
            fill(&mut zs, 64, pid, round);
            // SAFETY: usable() found AVX-512F enabled by the CPU and the kernel.
            unsafe { round_zmm(&zs, &mut zd) };
            compare("zmm", 64, round, &zs, &zd)?;
        }
    }
    Ok(())
}

fn main() {
    // As a VM's init (PID 1) it gets the boot arguments the kernel did not
    // know ("noxsave"): those are not a round count.
    let init = std::process::id() == 1;
    let arg = std::env::args().nth(1).filter(|_| !init);
    let rounds: u32 = match arg.map(|a| a.parse()) {
        None => 200,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("husk-vector-check: usage: husk-vector-check [ROUNDS]");
            std::process::exit(2);
        }
    };
    let u = usable();
    let xcr0 = u.xcr0.map_or("none".to_owned(), |x| format!("{x:#x}"));
    let widths = match (u.avx, u.avx512) {
        (false, _) => "xmm",
        (true, false) => "xmm,ymm",
        (true, true) => "xmm,ymm,zmm",
    };
    match run(rounds, &u) {
        Ok(()) => println!("husk-vector-check: ok xcr0={xcr0} checked={widths} rounds={rounds}"),
        Err(e) => {
            println!("husk-vector-check: FAIL xcr0={xcr0} checked={widths}: {e}");
            std::process::exit(1);
        }
    }
}
