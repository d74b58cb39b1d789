//! The container's seccomp profile (the spec's `linux.seccomp`), compiled
//! to one classic BPF program before the fork and loaded by the child
//! just before it executes the container's process.
//!
//! seccompiler (rust-vmm's, Firecracker's) turns each argument rule into
//! BPF; husk-seccomp builds the program around the rules, because
//! seccompiler tests syscall numbers one after another (a profile of 350
//! syscalls runs ~175 comparisons per system call on average) and gives
//! every rule of a filter the same action. Guest kernel code is slow
//! wherever kernel mode is emulated, and every system call of a confined
//! process runs the program, so syscall numbers are found by binary
//! search (about nine comparisons) and each rule keeps its own action, as
//! libseccomp's optimised trees do. docs/runtime.md says what is and is
//! not honoured.

use std::collections::BTreeMap;
use std::io;

use husk_seccomp::Chain;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// Conditions one rule may have (husk-seccomp's limit).
const MAX_CONDITIONS: usize = husk_seccomp::MAX_CONDITIONS;

/// A compiled profile: one program and the flags it is loaded with.
pub struct Program {
    filter: Vec<libc::sock_filter>,
    flags: libc::c_ulong,
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
    Ok(Program {
        filter: husk_seccomp::program(chains, default)?,
        flags,
    })
}

/// Loads `program` into the calling thread. Runs in the forked child:
/// nothing is allocated. Needs `no_new_privs` or CAP_SYS_ADMIN.
pub fn load(program: &Program) -> io::Result<()> {
    husk_seccomp::load(&program.filter, program.flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    fn run(p: &Program, nr: u32, args: [u64; 6]) -> u32 {
        husk_seccomp::evaluate(&p.filter, nr, args)
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
        assert!(p.filter.len() <= husk_seccomp::MAX_INSNS);
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
        assert_eq!(p.filter[1].k, husk_seccomp::AUDIT_ARCH_X86_64);
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
