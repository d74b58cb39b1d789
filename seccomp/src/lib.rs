//! Seccomp programs that find a system call's rules by binary search.
//!
//! seccompiler (rust-vmm's, Firecracker's) compiles each argument rule to
//! classic BPF, and is used here for that. Its programs test syscall
//! numbers one after another, though: a call not in the list runs past
//! every entry. That costs twice where kernel mode is emulated, as on
//! husk's hosts and in its guests:
//! - every system call of a confined thread runs the program (the
//!   kernel's action cache spares only calls allowed whatever their
//!   arguments);
//! - loading a program, the kernel runs it for every syscall number to
//!   fill that cache, so the load costs the program's length times ~450
//!   (about 0.3 ms for a 537-instruction chain here, 0.1 ms for the tree:
//!   `husk-bench-seccomp`, docs/benchmarks.md).
//!
//! So the program is built here as libseccomp's optimised trees are: the
//! number is found in about log2(n) comparisons, and each rule keeps its
//! own action. Used by the guest agent (a container's `linux.seccomp`)
//! and by husk-vmm (a filter per kind of thread).

use std::collections::BTreeMap;
use std::io;

pub use libc::sock_filter;
use seccompiler::{BpfProgram, SeccompRule};

// Classic BPF, as <linux/bpf_common.h> numbers it (BPF_LD | BPF_W |
// BPF_ABS is 0x00 | 0x00 | 0x20).
const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x05 | 0x10;
const JMP_JGE_K: u16 = 0x05 | 0x30;
const RET_K: u16 = 0x06;
/// `struct seccomp_data`: `nr` then `arch`, then the instruction pointer,
/// then the six arguments from byte 16.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// The only architecture a program lets through; any other is killed.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The kernel's limit on one program (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;
/// Conditions one rule may have: few enough that seccompiler's jumps
/// within a rule never need its long-jump helpers.
pub const MAX_CONDITIONS: usize = 12;

/// The rules of one system call, in the order they are tried: rules with
/// conditions first, each with the action it returns when its conditions
/// hold; then the action of the call whatever its arguments (the
/// program's default when `None`).
#[derive(Default, Clone)]
pub struct Chain {
    /// Rules with conditions, and their actions (`SECCOMP_RET_*`).
    pub conditional: Vec<(SeccompRule, u32)>,
    /// The action when no rule above matched.
    pub unconditional: Option<u32>,
}

fn stmt(code: u16, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// The program for x86_64: each syscall number of `chains` runs its
/// chain, any other returns `default`; another architecture is killed.
/// Refused when it would pass the kernel's limit of instructions.
pub fn program(mut chains: BTreeMap<u32, Chain>, default: u32) -> Result<Vec<sock_filter>, String> {
    // A chain that always ends in the default is no chain.
    chains.retain(|_, c| {
        c.conditional.retain(|(_, ret)| *ret != default);
        !(c.conditional.is_empty() && c.unconditional.is_none_or(|ret| ret == default))
    });
    let mut program = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
    ];
    let chains: Vec<(u32, Chain)> = chains.into_iter().collect();
    program.extend(tree(&chains, default));
    if program.len() > MAX_INSNS {
        return Err(format!(
            "the seccomp filter compiles to {} BPF instructions, more than the kernel's {MAX_INSNS}",
            program.len()
        ));
    }
    Ok(from_seccompiler(program))
}

/// A program of seccompiler's as the kernel's (libc's) instructions.
pub fn from_seccompiler(program: BpfProgram) -> Vec<sock_filter> {
    program
        .into_iter()
        .map(|i| sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// The binary search over `chains` (sorted by syscall number), with the
/// syscall number in the accumulator; every path ends in a return.
fn tree(chains: &[(u32, Chain)], default: u32) -> BpfProgram {
    match chains {
        [] => vec![stmt(RET_K, default)],
        [(nr, chain)] => {
            // Not this syscall: the default. This one: its rules in
            // order, each returning its action when its conditions hold.
            let mut out = vec![jump(JMP_JEQ_K, *nr, 1, 0), stmt(RET_K, default)];
            for (rule, ret) in &chain.conditional {
                let mut bpf: BpfProgram = rule.clone().into();
                bpf.push(stmt(RET_K, *ret));
                out.extend(bpf);
            }
            out.push(stmt(RET_K, chain.unconditional.unwrap_or(default)));
            out
        }
        _ => {
            // A rule's conditions load the arguments over the syscall
            // number, but a chain ends in returns: the number is still in
            // the accumulator at every node.
            let mid = chains.len() / 2;
            let left = tree(&chains[..mid], default);
            let right = tree(&chains[mid..], default);
            // At or above the middle number: over the left half.
            let mut out = vec![
                jump(JMP_JGE_K, chains[mid].0, 0, 1),
                stmt(JMP_JA, left.len() as u32),
            ];
            out.extend(left);
            out.extend(right);
            out
        }
    }
}

/// Loads `filter` into the calling thread with `flags`
/// (`SECCOMP_FILTER_FLAG_*`). Allocates nothing (a forked child may call
/// it). Needs `no_new_privs` or CAP_SYS_ADMIN.
pub fn load(filter: &[sock_filter], flags: libc::c_ulong) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program from `prog`, which points at
    // `filter` for its whole length and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs `filter` as the kernel would on system call `nr` of x86_64 with
/// `args`, and returns its action: what tests check a program against.
/// Knows the instructions this crate and seccompiler emit; panics on any
/// other, and on a jump out of the program.
pub fn evaluate(filter: &[sock_filter], nr: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let (mut a, mut pc) = (0u32, 0usize);
    loop {
        let i = &filter[pc];
        pc += 1;
        match i.code {
            LD_W_ABS => {
                let k = i.k as usize;
                a = u32::from_ne_bytes(data[k..k + 4].try_into().expect("four bytes"));
            }
            ALU_AND_K => a &= i.k,
            RET_K => return i.k,
            JMP_JA => pc += i.k as usize,
            code => {
                assert_eq!(code & 0x0f, 0x05, "opcode {code:#x}");
                let taken = match code & 0xf0 {
                    0x10 => a == i.k,
                    0x20 => a > i.k,
                    0x30 => a >= i.k,
                    0x40 => a & i.k != 0,
                    other => panic!("jump opcode {other:#x}"),
                };
                pc += if taken { i.jt } else { i.jf } as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    };

    use super::*;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const TRAP: u32 = libc::SECCOMP_RET_TRAP;

    fn eq(arg: u8, value: u64) -> SeccompCondition {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).unwrap()
    }

    /// An allow list of `n` calls, every third with a rule on argument 0
    /// or 1, as a map for seccompiler and as chains for [`program`].
    fn lists(n: u32) -> (BTreeMap<i64, Vec<SeccompRule>>, BTreeMap<u32, Chain>) {
        let mut map = BTreeMap::new();
        let mut chains = BTreeMap::new();
        for k in 0..n {
            let nr = k * 7 % 457;
            let rules = match k % 3 {
                0 => vec![
                    SeccompRule::new(vec![eq(0, u64::from(k))]).unwrap(),
                    SeccompRule::new(vec![eq(1, 5), eq(0, 1)]).unwrap(),
                ],
                _ => Vec::new(),
            };
            let chain = Chain {
                conditional: rules.iter().map(|r| (r.clone(), ALLOW)).collect(),
                unconditional: rules.is_empty().then_some(ALLOW),
            };
            map.insert(i64::from(nr), rules);
            chains.insert(nr, chain);
        }
        (map, chains)
    }

    #[test]
    fn the_tree_decides_every_call_as_seccompilers_chain_does() {
        for n in [0, 1, 2, 3, 17, 64, 130] {
            let (map, chains) = lists(n);
            let linear: BpfProgram = SeccompFilter::new(
                map,
                SeccompAction::Trap,
                SeccompAction::Allow,
                seccompiler::TargetArch::x86_64,
            )
            .unwrap()
            .try_into()
            .unwrap();
            let linear = from_seccompiler(linear);
            let tree = program(chains, TRAP).unwrap();
            for nr in (0..520).chain([0x4000_0000, u32::MAX]) {
                for args in [
                    [0; 6],
                    [1, 5, 0, 0, 0, 0],
                    [u64::from(nr / 7), 0, 0, 0, 0, 0],
                ] {
                    assert_eq!(
                        evaluate(&tree, nr, args),
                        evaluate(&linear, nr, args),
                        "{n} calls: nr {nr}, args {args:?}"
                    );
                }
            }
            if n >= 64 {
                assert!(
                    tree.len() < linear.len() * 2,
                    "{} {}",
                    tree.len(),
                    linear.len()
                );
            }
        }
    }

    #[test]
    fn a_call_is_found_in_few_comparisons() {
        // The deepest path through a tree of 130 calls: the comparisons
        // the kernel makes for a call the list does not have.
        let (_, chains) = lists(130);
        let tree = program(chains, TRAP).unwrap();
        let mut longest = 0;
        for nr in 0..520 {
            let (mut pc, mut steps) = (4usize, 0);
            while tree[pc].code != RET_K && steps < 1000 {
                let i = &tree[pc];
                pc += 1 + match i.code {
                    JMP_JA => i.k as usize,
                    JMP_JEQ_K if nr == i.k => usize::from(i.jt),
                    JMP_JEQ_K => usize::from(i.jf),
                    JMP_JGE_K if nr >= i.k => usize::from(i.jt),
                    JMP_JGE_K => usize::from(i.jf),
                    _ => break,
                };
                steps += 1;
            }
            longest = longest.max(steps);
        }
        assert!(longest <= 2 * 8 + 1, "{longest} steps");
    }

    #[test]
    fn another_architecture_is_killed() {
        let p = program(BTreeMap::new(), ALLOW).unwrap();
        assert_eq!(p[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(p[2].k, libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn a_program_past_the_kernels_limit_is_refused_by_name() {
        let chains = (0..1500)
            .map(|nr| {
                let rule = SeccompRule::new(vec![eq(0, 1), eq(1, 2)]).unwrap();
                (
                    nr,
                    Chain {
                        conditional: vec![(rule, ALLOW)],
                        unconditional: None,
                    },
                )
            })
            .collect();
        let e = program(chains, TRAP).unwrap_err();
        assert!(e.contains("more than the kernel's 4096"), "{e}");
    }
}
