//! The container's seccomp profile (the spec's `linux.seccomp`), compiled
//! to one classic BPF program before the fork and loaded by the child
//! just before it executes the container's process.
//!
//! seccompiler (rust-vmm's, Firecracker's) turns each argument rule into
//! BPF; the program around the rules is built here, because seccompiler
//! tests syscall numbers one after another (a profile of 350 syscalls
//! runs ~175 comparisons per system call on average) and gives every rule
//! of a filter the same action. Guest kernel code is slow wherever
//! kernel mode is emulated, and every system call of a confined process
//! runs the program, so syscall numbers are found here by binary search
//! (about nine comparisons) and each rule keeps its own action, as
//! libseccomp's optimised trees do. docs/runtime.md says what is and is
//! not honoured.

use std::collections::BTreeMap;
use std::io;

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};

// Classic BPF, as <linux/bpf_common.h> numbers it (BPF_LD | BPF_W |
// BPF_ABS is 0x00 | 0x00 | 0x20).
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x05 | 0x10;
const JMP_JGE_K: u16 = 0x05 | 0x30;
const RET_K: u16 = 0x06;
/// `struct seccomp_data`: `nr` then `arch`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The kernel's limit on one program (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// Conditions one rule may have: few enough that seccompiler's jumps
/// within a rule never need its long-jump helpers.
const MAX_CONDITIONS: usize = 12;

/// A compiled profile: one program and the flags it is loaded with.
pub struct Program {
    filter: Vec<libc::sock_filter>,
    flags: libc::c_ulong,
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

/// The kernel's return value for `action` (OCI's names, libseccomp's
/// meanings; `errno`: the rule's `errnoRet`, EPERM when absent).
fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, String> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    Ok(u32::from(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported: \
                 no notification listener outside the guest can be reached"
                .into());
        }
    }))
}

/// The rules one system call has, in the order they are tried: rules
/// with conditions first (in the profile's order), then the first rule
/// without any (which ends the chain).
#[derive(Default)]
struct Chain {
    conditional: Vec<(SeccompRule, u32)>,
    unconditional: Option<u32>,
}

/// Compiles `profile` for x86_64. A syscall name this architecture does
/// not have is skipped, as runc (libseccomp) skips it; everything else
/// that cannot be honoured is an error naming it.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, String> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    if profile.listener_path().is_some() {
        return Err("a seccomp listenerPath is not supported: \
             no notification listener outside the guest can be reached"
            .into());
    }
    let mut flags: libc::c_ulong = 0;
    for flag in profile.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // One thread: the child that execs.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            // Meaningful with a notification listener only.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }
    let mut chains: BTreeMap<u32, Chain> = BTreeMap::new();
    for (i, entry) in profile.syscalls().iter().flatten().enumerate() {
        let ret = action(entry.action(), entry.errno_ret())?;
        let args = entry.args().as_deref().unwrap_or_default();
        if args.len() > MAX_CONDITIONS {
            return Err(format!(
                "seccomp rule {i} ({}) has {} argument conditions, more than {MAX_CONDITIONS}",
                entry.names().join(","),
                args.len()
            ));
        }
        let rule = if args.is_empty() {
            None
        } else {
            let conditions = args
                .iter()
                .map(|arg| {
                    let (op, value) = match arg.op() {
                        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
                        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
                        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
                        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
                        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
                        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
                        // libseccomp's: `value` is the mask, `valueTwo`
                        // what the masked argument must equal.
                        LinuxSeccompOperator::ScmpCmpMaskedEq => (
                            SeccompCmpOp::MaskedEq(arg.value()),
                            arg.value_two().unwrap_or(0),
                        ),
                    };
                    let index = u8::try_from(arg.index()).ok().filter(|&i| i < 6);
                    let index = index.ok_or_else(|| {
                        format!(
                            "seccomp rule {i} ({}) tests argument {}: system calls have six (0-5)",
                            entry.names().join(","),
                            arg.index()
                        )
                    })?;
                    // Whole 64-bit arguments, as libseccomp compares them.
                    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                        .map_err(|e| format!("seccomp rule {i}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(SeccompRule::new(conditions).map_err(|e| format!("seccomp rule {i}: {e}"))?)
        };
        for name in entry.names() {
            let Ok(sysno) = name.parse::<syscalls::Sysno>() else {
                continue;
            };
            let chain = chains.entry(sysno.id() as u32).or_default();
            match &rule {
                Some(rule) => chain.conditional.push((rule.clone(), ret)),
                None => {
                    chain.unconditional.get_or_insert(ret);
                }
            }
        }
    }
    // A chain that always ends in the default is no chain.
    chains.retain(|_, c| {
        c.conditional.retain(|(_, ret)| *ret != default);
        !(c.conditional.is_empty() && c.unconditional.is_none_or(|ret| ret == default))
    });
    let mut program = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, u32::from(SeccompAction::KillProcess)),
        stmt(LD_W_ABS, DATA_NR),
    ];
    let chains: Vec<(u32, Chain)> = chains.into_iter().collect();
    program.extend(tree(&chains, default));
    if program.len() > MAX_INSNS {
        return Err(format!(
            "the seccomp profile compiles to {} BPF instructions, more than the kernel's {MAX_INSNS}",
            program.len()
        ));
    }
    Ok(Program {
        filter: program
            .into_iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect(),
        flags,
    })
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

/// Loads `program` into the calling thread. Runs in the forked child:
/// nothing is allocated. Needs `no_new_privs` or CAP_SYS_ADMIN.
pub fn load(program: &Program) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.filter.len() as u16,
        filter: program.filter.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program from `prog`, which points at
    // `program.filter` for its whole length and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            program.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    /// Runs `program` as the kernel would on `nr` with `args` (classic
    /// BPF's few instructions, those this compiler and seccompiler's
    /// conditions emit).
    fn run(p: &Program, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &p.filter[pc];
            pc += 1;
            match i.code {
                0x20 => {
                    let k = i.k as usize;
                    a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                0x54 => a &= i.k,
                0x06 => return i.k,
                0x05 => pc += i.k as usize,
                code => {
                    let taken = match code & 0xf0 {
                        0x10 => a == i.k,
                        0x20 => a > i.k,
                        0x30 => a >= i.k,
                        0x40 => a & i.k != 0,
                        other => panic!("opcode {other:#x}"),
                    };
                    assert_eq!(code & 0x0f, 0x05, "jump opcode {code:#x}");
                    pc += if taken { i.jt } else { i.jf } as usize;
                }
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    #[test]
    fn an_allow_list_with_argument_rules_is_followed() {
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "write", "exit_group", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0x7e020000u64, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["kill"], "action": "SCMP_ACT_KILL_PROCESS"},
                {"names": ["mmap"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 2, "value": 0x1_0000_0000u64, "op": "SCMP_CMP_LT"}]}
            ]
        })))
        .unwrap();
        let none = [0; 6];
        assert_eq!(run(&p, libc::SYS_read as u32, none), ALLOW);
        assert_eq!(run(&p, libc::SYS_write as u32, none), ALLOW);
        assert_eq!(run(&p, libc::SYS_exit_group as u32, none), ALLOW);
        assert_eq!(run(&p, libc::SYS_open as u32, none), errno(libc::EPERM));
        assert_eq!(run(&p, 0, none), ALLOW, "read is 0");
        assert_eq!(run(&p, 1000, none), errno(libc::EPERM));
        assert_eq!(
            run(&p, libc::SYS_personality as u32, [8, 0, 0, 0, 0, 0]),
            ALLOW
        );
        assert_eq!(
            run(&p, libc::SYS_personality as u32, [9, 0, 0, 0, 0, 0]),
            errno(libc::EPERM)
        );
        // A 64-bit comparison: the high word counts.
        assert_eq!(
            run(
                &p,
                libc::SYS_personality as u32,
                [8 | 1 << 32, 0, 0, 0, 0, 0]
            ),
            errno(libc::EPERM)
        );
        assert_eq!(
            run(&p, libc::SYS_clone as u32, [0x11, 0, 0, 0, 0, 0]),
            ALLOW
        );
        assert_eq!(
            run(&p, libc::SYS_clone as u32, [0x2000_0000, 0, 0, 0, 0, 0]),
            errno(libc::EPERM),
            "CLONE_NEWUTS"
        );
        assert_eq!(run(&p, libc::SYS_clone3 as u32, none), errno(libc::ENOSYS));
        assert_eq!(
            run(&p, libc::SYS_kill as u32, none),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(run(&p, libc::SYS_mmap as u32, [0, 0, 7, 0, 0, 0]), ALLOW);
        assert_eq!(
            run(&p, libc::SYS_mmap as u32, [0, 0, 1 << 32, 0, 0, 0]),
            errno(libc::EPERM)
        );
    }

    #[test]
    fn a_deny_list_blocks_only_what_it_names() {
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["sethostname", "setdomainname"], "action": "SCMP_ACT_ERRNO"}]
        })))
        .unwrap();
        assert_eq!(
            run(&p, libc::SYS_sethostname as u32, [0; 6]),
            errno(libc::EPERM)
        );
        assert_eq!(
            run(&p, libc::SYS_setdomainname as u32, [0; 6]),
            errno(libc::EPERM)
        );
        assert_eq!(run(&p, libc::SYS_getpid as u32, [0; 6]), ALLOW);
    }

    #[test]
    fn every_syscall_of_a_large_profile_is_found() {
        // Every x86_64 syscall allowed but one: each is found by the
        // search, and the program stays within the kernel's limit.
        let names: Vec<String> = syscalls::Sysno::iter()
            .filter(|s| *s != syscalls::Sysno::ptrace)
            .map(|s| s.name().to_string())
            .collect();
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]
        })))
        .unwrap();
        assert!(p.filter.len() <= MAX_INSNS);
        for s in syscalls::Sysno::iter() {
            let want = if s == syscalls::Sysno::ptrace {
                errno(1)
            } else {
                ALLOW
            };
            assert_eq!(run(&p, s.id() as u32, [0; 6]), want, "{s}");
        }
    }

    #[test]
    fn the_kernel_takes_the_program_and_follows_it() {
        // A child of the test loads a profile that makes getppid fail
        // with ENOSYS and reports what getppid and getpid then return.
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["getuid"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}
            ]
        })))
        .unwrap();
        // SAFETY: the child makes system calls only, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain system calls in the child.
            let code = unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if load(&p).is_err() {
                    libc::_exit(10);
                }
                let ppid = libc::syscall(libc::SYS_getppid);
                let errno = *libc::__errno_location();
                let own = libc::syscall(libc::SYS_getpid);
                match (ppid, errno, own > 0) {
                    (-1, 38, true) => 0,
                    (-1, _, _) => 11,
                    _ => 12,
                }
            };
            // SAFETY: ends the child without running the parent's exit code.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "10: not loaded, 11: wrong errno, 12: allowed"
        );
    }

    #[test]
    fn another_architecture_is_killed() {
        let p = compile(&profile(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW"}),
        ))
        .unwrap();
        assert_eq!(p.filter[2].k, libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(p.filter[1].k, AUDIT_ARCH_X86_64);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let err = |json| compile(&profile(json)).err().unwrap();
        assert!(
            err(serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}))
                .contains("SCMP_ACT_NOTIFY")
        );
        assert!(
            err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "listenerPath": "/run/listener.sock"}))
            .contains("listenerPath")
        );
        let e = err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}));
        assert!(e.contains("argument 6") && e.contains("read"), "{e}");
        let thirteen: Vec<_> = (0..13)
            .map(|v| serde_json::json!({"index": 0, "value": v, "op": "SCMP_CMP_NE"}))
            .collect();
        let e = err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["write"], "action": "SCMP_ACT_ERRNO", "args": thirteen}]}));
        assert!(e.contains("13 argument conditions, more than 12"), "{e}");
    }
}
