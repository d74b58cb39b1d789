//! `husk build` (issue 20): real Dockerfiles built from a local context on
//! husk's busybox image, every `RUN` in a microVM, the images run with
//! `husk run`; the cache; a failing step; a context escape.
//!
//! Every test has a `--root` of its own; the warm-start cache is the
//! suite's, so no guest boots cold here.

mod common;

use std::path::{Path, PathBuf};

use common::{Husk, text};

/// A build context, removed when dropped.
struct Context(PathBuf);

impl std::ops::Deref for Context {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A build context: `files` written under a new directory.
fn context(name: &str, files: &[(&str, &str)]) -> Context {
    let dir = common::scratch("build", name);
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
    }
    Context(dir)
}

/// Nothing of a build is left in `root`: no mount, no step's directory,
/// no container.
fn nothing_left(root: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&root.display().to_string()),
        "a mount is left under {}",
        root.display()
    );
    let steps: Vec<_> = std::fs::read_dir(root.join("build"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(steps.is_empty(), "left in build/: {steps:?}");
    let containers: Vec<_> = std::fs::read_dir(root.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(containers.is_empty(), "containers left: {containers:?}");
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
FROM husk/busybox AS base
ARG GREETING=hello
ENV WHO=world
WORKDIR /app
COPY greet.txt ./
COPY sub /app/sub/
COPY . /ctx/
RUN echo "$GREETING $WHO" > out.txt \
 && cat greet.txt >> out.txt \
 && ls /app/sub >> out.txt \
 && test ! -e /ctx/secret.txt \
 && rm /bin/vi

FROM husk/busybox
COPY --from=base /app/out.txt /out.txt
LABEL built=by-husk
EXPOSE 8080
CMD ["cat", "/out.txt"]
"#;

/// A two-stage build: ARG, ENV, WORKDIR, COPY from the context (a file, a
/// directory, everything but what .dockerignore leaves out), RUN in a
/// microVM seeing the ENV and ARG, COPY --from the first stage, LABEL,
/// EXPOSE, CMD; the image runs. A build argument changes what the RUN
/// makes; the same build again makes no VM (every step cached).
#[test]
fn a_dockerfile_builds_runs_and_rebuilds_from_the_cache() {
    let husk = Husk::new("build");
    let ctx = context(
        "two-stage",
        &[
            ("Dockerfile", DOCKERFILE),
            ("greet.txt", "from the context\n"),
            ("secret.txt", "not to be copied\n"),
            (".dockerignore", "secret.txt\n"),
            ("sub/inner.txt", "inner\n"),
        ],
    );
    let ctx_arg = ctx.to_str().unwrap();
    let built = husk.ok(&["build", "-t", "localhost/hello:1", ctx_arg]);
    assert!(built.contains("[7/7] RUN echo"), "{built}");
    assert!(!built.contains("CACHED"), "{built}");
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/hello:1"]),
        "hello world\nfrom the context\ninner.txt\n"
    );
    // The config: the last stage's label, port and command.
    let inspect: serde_json::Value =
        serde_json::from_str(&husk.ok(&["inspect", "localhost/hello:1"])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["Labels"]["built"], "by-husk", "{inspect}");
    assert_eq!(config["Cmd"], serde_json::json!(["cat", "/out.txt"]));
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    // Again: every layer step from the cache, no VM.
    let again = husk.ok(&["build", "-t", "localhost/hello:1", ctx_arg]);
    for step in [
        "COPY greet.txt",
        "COPY sub",
        "COPY . /ctx/",
        "RUN echo",
        "COPY --from=base",
    ] {
        assert!(again.contains(&format!("CACHED {step}")), "{step}: {again}");
    }
    // A build argument: the RUN and what follows it run again.
    let other = husk.ok(&[
        "build",
        "--build-arg",
        "GREETING=hi",
        "-t",
        "localhost/hello:2",
        ctx_arg,
    ]);
    assert!(other.contains("CACHED COPY greet.txt"), "{other}");
    assert!(!other.contains("CACHED RUN"), "{other}");
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/hello:2"]),
        "hi world\nfrom the context\ninner.txt\n"
    );
    // A changed file in the context: its COPY and every step after it
    // run again (their parent changed).
    std::fs::write(ctx.join("greet.txt"), "changed\n").unwrap();
    let changed = husk.ok(&["build", "-t", "localhost/hello:3", ctx_arg]);
    assert!(!changed.contains("CACHED"), "{changed}");
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/hello:3"]),
        "hello world\nchanged\ninner.txt\n"
    );
    // --target: the first stage alone, whose RUN removed /bin/vi.
    husk.ok(&[
        "build",
        "--target",
        "base",
        "-t",
        "localhost/base:1",
        ctx_arg,
    ]);
    let out = husk.run(&["run", "--rm", "localhost/base:1", "ls", "/bin/vi"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    nothing_left(&husk.root);
}

/// A RUN that fails stops the build with its status and output; no image
/// is named and nothing of the step is left.
#[test]
fn a_failing_step_stops_the_build_and_leaves_nothing() {
    let husk = Husk::new("build-fail");
    let ctx = context(
        "failing",
        &[(
            "Dockerfile",
            "FROM husk/busybox\nRUN echo before the failure; exit 3\nRUN echo never\n",
        )],
    );
    let out = husk.run(&["build", "-t", "localhost/broken:1", ctx.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains(
            "Dockerfile:2: RUN echo before the failure; exit 3: the command exited with status 3"
        ),
        "{said}"
    );
    assert!(
        text(&out.stdout).contains("before the failure"),
        "{}",
        text(&out.stdout)
    );
    assert!(!text(&out.stdout).contains("never"));
    assert!(!husk.ok(&["images"]).contains("localhost/broken"));
    nothing_left(&husk.root);
}

/// A source leaving the context, through `..` or a symbolic link, is
/// refused by name before any VM; so are an unsupported instruction's
/// flag and a missing source, each naming its line.
#[test]
fn context_escapes_and_unsupported_input_are_refused_by_name() {
    let husk = Husk::new("build-refused");
    let ctx = context("refused", &[("inside.txt", "in\n")]);
    std::os::unix::fs::symlink("/etc/passwd", ctx.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../..", ctx.join("up")).unwrap();
    let build = |dockerfile: &str| {
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        husk.fails(&["build", "-t", "localhost/refused:1", ctx.to_str().unwrap()])
    };
    let said = build("FROM husk/busybox\nCOPY ../outside /x\n");
    assert!(
        said.contains("Dockerfile:2: COPY ../outside /x: ../outside: leaves the build context"),
        "{said}"
    );
    let said = build("FROM husk/busybox\nCOPY passwd /x\n");
    assert!(
        said.contains(
            "passwd is a symbolic link to /etc/passwd, which leads out of the build context"
        ),
        "{said}"
    );
    let said = build("FROM husk/busybox\nCOPY up/etc/shadow /x\n");
    assert!(
        said.contains("Dockerfile:2: COPY up/etc/shadow /x: up/etc/shadow:"),
        "{said}"
    );
    let said = build("FROM husk/busybox\n\nRUN --mount=type=cache,target=/c true\n");
    assert!(
        said.contains("Dockerfile:3: RUN --mount is not supported"),
        "{said}"
    );
    let said = build("FROM husk/busybox\nCOPY missing.txt /x\n");
    assert!(
        said.contains("missing.txt: no such file or directory in the build context"),
        "{said}"
    );
    // Values a step cannot take, each named with its line.
    let said = build("FROM husk/busybox\nCOPY --chmod=9z inside.txt /x\n");
    assert!(
        said.contains("Dockerfile:2: COPY --chmod=9z inside.txt /x: --chmod=9z: not an octal mode"),
        "{said}"
    );
    let said = build("FROM husk/busybox\nCOPY <<EOF /dir/\nx\nEOF\n");
    assert!(
        said.contains("Dockerfile:2:")
            && said.contains("a here-document copied into a directory is not supported yet"),
        "{said}"
    );
    std::fs::write(ctx.join("archive.tgz"), [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let said = build("FROM husk/busybox\nADD archive.tgz /\n");
    assert!(said.contains("Dockerfile:2: ADD archive.tgz /: ADD archive.tgz: unpacking an archive is not supported yet"), "{said}");
    let said = build("FROM --platform=linux/arm64 husk/busybox\nRUN true\n");
    assert!(
        said.contains("--platform=linux/arm64: husk builds linux/amd64 only"),
        "{said}"
    );
    // The command's own flags.
    std::fs::write(ctx.join("Dockerfile"), "FROM husk/busybox\n").unwrap();
    let c = ctx.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--platform", "linux/arm64"],
            "--platform linux/arm64: husk builds linux/amd64 only",
        ),
        (vec!["--label", "nokey"], "--label nokey: not KEY=VALUE"),
        (
            vec!["--output", "type=oci"],
            "--output type=oci: it needs type=oci and dest=FILE",
        ),
        (
            vec!["--output", "dest"],
            "--output dest: \"dest\" is not type=... or dest=...",
        ),
        (vec!["--target", "nope"], "--target nope: no such stage"),
    ] {
        let mut all = vec!["build"];
        all.extend(&args);
        all.push(c);
        let said = husk.fails(&all);
        assert!(said.contains(says), "{args:?}: {said}");
    }
    assert!(!husk.ok(&["images"]).contains("localhost/refused"));
    nothing_left(&husk.root);
}

/// Here-documents: `COPY <<EOF /file` makes a file of their text (its
/// variables expanded unless the delimiter is quoted), `RUN <<EOF` runs
/// one as the stage's shell script; one after a command is not read as
/// one yet, and the error names the line its body starts on.
#[test]
fn here_documents_make_files_and_scripts() {
    let husk = Husk::new("build-heredoc");
    let ctx = context(
        "heredoc",
        &[(
            "Dockerfile",
            "FROM husk/busybox\nENV NAME=husk\nCOPY <<EOF /greeting\nhello $NAME\nEOF\n\
             COPY <<'EOF' /literal\nhello $NAME\nEOF\n\
             RUN <<EOF\nset -e\necho from a script > /script-out\ncat /greeting >> /script-out\nEOF\n\
             CMD [\"cat\", \"/script-out\", \"/literal\"]\n",
        )],
    );
    husk.ok(&["build", "-t", "localhost/heredoc:1", ctx.to_str().unwrap()]);
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/heredoc:1"]),
        "from a script\nhello husk\nhello $NAME\n"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM husk/busybox\nRUN cat <<EOF\nmore\nEOF\n",
    )
    .unwrap();
    // A here-document after a command is not read as one yet: its body
    // is taken for instructions, and the first is named with its line.
    let said = husk.fails(&["build", "-t", "localhost/heredoc:2", ctx.to_str().unwrap()]);
    assert!(
        said.contains("Dockerfile:3: unknown instruction 'more'"),
        "{said}"
    );
    nothing_left(&husk.root);
}

/// `--output type=oci,dest=FILE`: the image is also written as an OCI
/// archive, which `husk load` takes into another root with its name and
/// config; an output of another type is refused by name.
#[test]
fn a_built_image_is_written_to_an_oci_archive() {
    let husk = Husk::new("build-output");
    let ctx = context(
        "output",
        &[
            (
                "Dockerfile",
                "FROM scratch\nCOPY hello.txt /hello.txt\nLABEL kind=archive\n",
            ),
            ("hello.txt", "hi\n"),
        ],
    );
    let archive = ctx.join("image.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    husk.ok(&[
        "build",
        "-t",
        "localhost/archived:1",
        "--output",
        &dest,
        ctx.to_str().unwrap(),
    ]);
    let mut names = Vec::new();
    let mut tar = tar::Archive::new(std::fs::File::open(&archive).unwrap());
    for e in tar.entries().unwrap() {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert!(names.iter().any(|n| n == "oci-layout"), "{names:?}");
    assert!(names.iter().any(|n| n == "index.json"), "{names:?}");
    let other = Husk::new("build-output-load");
    other.ok(&["load", "-i", archive.to_str().unwrap()]);
    let inspect: serde_json::Value =
        serde_json::from_str(&other.ok(&["inspect", "localhost/archived:1"])).unwrap();
    assert_eq!(
        inspect[0]["Config"]["Labels"]["kind"], "archive",
        "{inspect}"
    );
    let said = husk.fails(&[
        "build",
        "--output",
        "type=registry,dest=x",
        ctx.to_str().unwrap(),
    ]);
    assert!(
        said.contains("--output type=registry,dest=x: type registry is not supported"),
        "{said}"
    );
    nothing_left(&husk.root);
}
