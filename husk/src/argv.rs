//! What husk does to its arguments before clap parses them: `run`, `ps`
//! and `checkpoint` are runc's and docker's both, told apart by their
//! arguments (docs/runtime.md), and Go-style one-dash long flags get
//! their second dash.

/// Flags (of runc's and docker's `run` and the global ones) that take a
/// value, for finding positional arguments.
const VALUED: &[&str] = &[
    "--root",
    "--log",
    "--log-format",
    "--rootless",
    "--criu",
    "-b",
    "--bundle",
    "--pid-file",
    "--console-socket",
    "--name",
    "-e",
    "--env",
    "-v",
    "--volume",
    "-w",
    "--workdir",
    "-u",
    "--user",
    "--entrypoint",
    "-m",
    "--memory",
    "--cpus",
    "--network",
    "--net",
    "-p",
    "--publish",
    "--hostname",
    "--add-host",
    "--dns",
    "-f",
    "--format",
    "--image-path",
    "--work-path",
    "--checkpoint",
    "--checkpoint-dir",
];

/// `husk run` and `husk ps` are runc's and docker's both: runc's `run`
/// names a bundle (`--bundle`), runc's `ps` a container. The others are
/// docker's, and go to the hidden commands that are.
pub fn docker_form(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut i = 1;
    let mut sub = None;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if !a.starts_with('-') {
            sub = Some(i);
            break;
        }
        i += if VALUED.contains(&a.as_ref()) { 2 } else { 1 };
    }
    let Some(sub) = sub else { return args };
    let rest: Vec<String> = args[sub + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut positional = None;
    let mut bundle = false;
    let mut j = 0;
    while j < rest.len() {
        let a = rest[j].as_str();
        if a == "-b" || a == "--bundle" || a.starts_with("--bundle=") {
            bundle = true;
        }
        if !a.starts_with('-') {
            positional = Some(a);
            break;
        }
        j += if VALUED.contains(&a) { 2 } else { 1 };
    }
    match (args[sub].to_str(), positional) {
        (Some("run"), _) if !bundle => args[sub] = "_docker-run".into(),
        (Some("ps"), None) => args[sub] = "_docker-ps".into(),
        // docker's `checkpoint create|ls|rm CONTAINER ...`; runc's is
        // `checkpoint ID` alone.
        (Some("checkpoint"), Some("create" | "ls" | "rm")) if rest.len() > j + 1 => {
            args[sub] = "_docker-checkpoint".into();
        }
        _ => {}
    }
    args
}

/// runc's long flags that callers pass with one dash, as Go's flag
/// parsing allows (containerd's go-runc passes `-no-subreaper` to
/// `restore`).
const ONE_DASH: &[&str] = &["-no-subreaper", "-no-pivot", "-no-new-keyring"];

/// `args` with [`ONE_DASH`] flags given their second dash.
pub fn go_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some(flag) if ONE_DASH.contains(&flag) => format!("-{flag}").into(),
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;
    use crate::checkpoints::RestoreArgs;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Cli {
        let args = args.iter().map(Into::into).collect();
        Cli::try_parse_from(docker_form(go_flags(args))).unwrap()
    }

    #[test]
    fn go_runcs_one_dash_flags_and_restores_arguments_parse() {
        // As containerd's shim runs it.
        let cli = parse(&[
            "husk",
            "--root",
            "/run/r",
            "--log",
            "/x/log.json",
            "--log-format",
            "json",
            "restore",
            "--image-path",
            "/tmp/ck",
            "--work-path",
            "/x/work",
            "--detach",
            "--pid-file",
            "/x/init.pid",
            "-no-subreaper",
            "--bundle",
            "/x",
            "c3",
        ]);
        match cli.command {
            Command::Restore(RestoreArgs {
                image_path,
                bundle,
                detach,
                no_subreaper,
                id,
                ..
            }) => {
                assert_eq!(image_path, Path::new("/tmp/ck"));
                assert_eq!(bundle.as_deref(), Some(Path::new("/x")));
                assert!(detach && no_subreaper);
                assert_eq!(id, "c3");
            }
            _ => panic!("not restore"),
        }
        // A docker-style `-it` is left alone.
        let cli = parse(&["husk", "run", "-it", "husk/busybox", "sh"]);
        assert!(matches!(cli.command, Command::DockerRun(_)));
    }
}
