//! `husk build` (issue 20): real Dockerfiles built from a local context on
//! husk's busybox image, every `RUN` in a microVM, the images run with
//! `husk run`; the cache; a failing step; a context escape.
//!
//! Every test has a `--root` of its own; the warm-start cache is the
//! suite's, so no guest boots cold here.

mod common;

use std::path::{Path, PathBuf};

use common::{Husk, Registry, text};

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

/// An image's config as `husk inspect` shows it.
fn image_config(husk: &Husk, image: &str) -> serde_json::Value {
    let inspect: serde_json::Value = serde_json::from_str(&husk.ok(&["inspect", image])).unwrap();
    inspect[0]["Config"].clone()
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
    let netns: Vec<_> = std::fs::read_dir(root.join("netns"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
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
    // Each layer step's time, as docker's builder prints it.
    let done = built
        .lines()
        .filter(|l| l.starts_with("DONE ") && l.ends_with('s'))
        .count();
    assert_eq!(done, 5, "{built}");
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/hello:1"]),
        "hello world\nfrom the context\ninner.txt\n"
    );
    // The config: the last stage's label, port and command.
    let config = image_config(&husk, "localhost/hello:1");
    assert_eq!(config["Labels"]["built"], "by-husk", "{config}");
    assert_eq!(config["Cmd"], serde_json::json!(["cat", "/out.txt"]));
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    // Again: every layer step from the cache, no VM.
    let again = husk.ok(&["build", "-t", "localhost/hello:1", ctx_arg]);
    assert!(!again.contains("DONE"), "{again}");
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

/// `FROM` an image in a registry (Debian's docker-registry on
/// 127.0.0.1), pulled by the build into a store that lacks it, and `COPY
/// --from` an image (not a stage); the base's config comes with it.
#[test]
fn a_build_pulls_its_base_from_a_registry_and_copies_from_an_image() {
    let registry = Registry::start("build-from");
    let base = format!("{}/base/marked:1", registry.host());
    let maker = Husk::new("build-registry-maker");
    let ctx = context(
        "registry",
        &[
            (
                "Dockerfile",
                "FROM husk/busybox\nCOPY marker.txt /marker.txt\nENV FROM_BASE=yes\n",
            ),
            ("marker.txt", "from the registry\n"),
        ],
    );
    maker.ok(&["build", "-t", &base, ctx.to_str().unwrap()]);
    maker.ok(&["push", &base]);
    let husk = Husk::new("build-registry");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY --from={base} /marker.txt /copied.txt\n\
             RUN cat /marker.txt /copied.txt > /both && echo $FROM_BASE >> /both\n\
             CMD [\"cat\", \"/both\"]\n"
        ),
    )
    .unwrap();
    husk.ok(&[
        "build",
        "-t",
        "localhost/on-pulled:1",
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/on-pulled:1"]),
        "from the registry\nfrom the registry\nyes\n"
    );
    assert!(husk.ok(&["images"]).contains("base/marked"));
    nothing_left(&husk.root);
}

/// A RUN step is on the build's network (the root's default husk
/// network: an interface besides loopback, a default route), as docker
/// build's steps are; `RUN --network=none` has loopback only; nothing of
/// either is left after the build.
#[test]
fn a_run_step_has_the_build_network_unless_none() {
    let husk = Husk::new("build-network");
    let ctx = context(
        "network",
        &[(
            "Dockerfile",
            "FROM husk/busybox\n\
             RUN cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort > /net.txt \
              && cut -f2 /proc/net/route | tail -n +2 > /route.txt\n\
             RUN --network=none cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' > /none.txt\n",
        )],
    );
    husk.ok(&["build", "-t", "localhost/net:1", ctx.to_str().unwrap()]);
    let seen = |file: &str| {
        husk.ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "localhost/net:1",
            "cat",
            file,
        ])
    };
    let net = seen("/net.txt");
    assert!(net.lines().any(|l| l == "lo"), "{net}");
    assert!(
        net.lines().any(|l| l != "lo"),
        "no interface besides loopback: {net}"
    );
    assert!(
        seen("/route.txt").lines().any(|l| l == "00000000"),
        "no default route"
    );
    assert_eq!(seen("/none.txt"), "lo\n");
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
    // Archives ADD would unpack: a broken one, one of a kind husk does
    // not unpack, and entries that leave it (by `..`, through a link it
    // made) are refused by name, and nothing is written outside.
    std::fs::write(ctx.join("archive.tgz"), [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let said = build("FROM husk/busybox\nADD archive.tgz /\n");
    assert!(
        said.contains("Dockerfile:2: ADD archive.tgz /: ADD archive.tgz: cannot unpack: layer:"),
        "{said}"
    );
    std::fs::write(
        ctx.join("archive.txz"),
        [0xfd, b'7', b'z', b'X', b'Z', 0, 0],
    )
    .unwrap();
    let said = build("FROM husk/busybox\nADD archive.txz /\n");
    assert!(
        said.contains("ADD archive.txz: xz archives are not unpacked yet"),
        "{said}"
    );
    raw_tar(
        &ctx.join("up.tar"),
        &[("../escaped.txt", tar::EntryType::Regular, None)],
    );
    let said = build("FROM husk/busybox\nADD up.tar /x/\n");
    assert!(
        said.contains("ADD up.tar: cannot unpack: layer entry \"../escaped.txt\""),
        "{said}"
    );
    raw_tar(
        &ctx.join("through.tar"),
        &[
            ("link", tar::EntryType::Symlink, Some("/tmp")),
            ("link/escaped.txt", tar::EntryType::Regular, None),
        ],
    );
    let said = build("FROM husk/busybox\nADD through.tar /x/\n");
    assert!(
        said.contains("ADD through.tar: cannot unpack: layer entry \"link/escaped.txt\""),
        "{said}"
    );
    assert!(!Path::new("/tmp/escaped.txt").exists());
    assert!(!husk.root.join("escaped.txt").exists());
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

/// A tar archive whose entries' names are written as given (`..`
/// included, which the tar crate's own writer refuses).
fn raw_tar(path: &Path, entries: &[(&str, tar::EntryType, Option<&str>)]) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(0);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        tar.append(&h, std::io::empty()).unwrap();
    }
    tar.into_inner().unwrap();
}

/// Here-documents: `COPY <<EOF /file` makes a file of their text (its
/// variables expanded unless the delimiter is quoted), several into a
/// directory are named by their delimiters beside a context file, one
/// starting with `#!` runs by its interpreter (awk here), `RUN <<EOF` runs
/// one as the stage's shell script; ones after a command are read by the
/// shell with it, and the lines after them keep their numbers.
#[test]
fn here_documents_make_files_and_scripts() {
    let husk = Husk::new("build-heredoc");
    let ctx = context(
        "heredoc",
        &[
            (
                "Dockerfile",
                "FROM husk/busybox\nENV NAME=husk\nCOPY <<EOF /greeting\nhello $NAME\nEOF\n\
                 COPY <<'EOF' /literal\nhello $NAME\nEOF\n\
                 RUN <<EOF\nset -e\necho from a script > /script-out\ncat /greeting >> /script-out\nEOF\n\
                 COPY <<ONE <<TWO greet.txt /docs/\n1 $NAME\nONE\n2\nTWO\n\
                 RUN <<EOF\n#!/usr/bin/awk -f\nBEGIN { print \"awk's \" ENVIRON[\"NAME\"] > \"/awk-out\" }\nEOF\n\
                 CMD [\"cat\", \"/script-out\", \"/literal\", \"/docs/ONE\", \"/docs/TWO\", \"/docs/greet.txt\", \"/awk-out\"]\n",
            ),
            ("greet.txt", "from the context\n"),
        ],
    );
    husk.ok(&["build", "-t", "localhost/heredoc:1", ctx.to_str().unwrap()]);
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/heredoc:1"]),
        "from a script\nhello husk\nhello $NAME\n1 husk\n2\nfrom the context\nawk's husk\n"
    );
    // Here-documents after a command: the shell reads them with it,
    // variables expanded by the shell unless the delimiter is quoted,
    // `<<-` taking leading tabs off; the lines after keep their numbers.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM husk/busybox\nENV NAME=husk\n\
         RUN cat <<EOF > /one; cat <<-'END' > /two\nhello $NAME\nEOF\n\tliteral $NAME\n\tEND\n\
         RUN cat /one /two > /both\nCMD [\"cat\", \"/both\"]\n",
    )
    .unwrap();
    husk.ok(&["build", "-t", "localhost/heredoc:2", ctx.to_str().unwrap()]);
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/heredoc:2"]),
        "hello husk\nliteral $NAME\n"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM husk/busybox\nRUN cat <<EOF\nmore\nEOF\nNOPE x\n",
    )
    .unwrap();
    let said = husk.fails(&["build", "-t", "localhost/heredoc:3", ctx.to_str().unwrap()]);
    assert!(
        said.contains("Dockerfile:5: unknown instruction 'NOPE'"),
        "{said}"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM husk/busybox\nRUN cat <<EOF\nnever ends\n",
    )
    .unwrap();
    let said = husk.fails(&["build", "-t", "localhost/heredoc:3", ctx.to_str().unwrap()]);
    assert!(
        said.contains("Dockerfile:2: RUN: the here-document <<EOF has no end line"),
        "{said}"
    );
    nothing_left(&husk.root);
}

/// HEALTHCHECK and ONBUILD are kept in the config as docker's builder
/// keeps them (`Healthcheck`, `OnBuild`); an image built on one runs its
/// triggers first, in order, and does not keep them; a bad option is
/// refused by name.
#[test]
fn healthcheck_and_onbuild_are_kept_and_triggers_run() {
    let husk = Husk::new("build-onbuild");
    let ctx = context(
        "onbuild",
        &[(
            "Dockerfile",
            "FROM husk/busybox\n\
             HEALTHCHECK --interval=5s --timeout=2s --retries=2 CMD test -e /onbuild.txt\n\
             ONBUILD RUN echo triggered > /onbuild.txt\n\
             ONBUILD LABEL from=trigger\n",
        )],
    );
    let c = ctx.to_str().unwrap();
    husk.ok(&["build", "-t", "localhost/parent:1", c]);
    let config = image_config(&husk, "localhost/parent:1");
    assert_eq!(
        config["Healthcheck"],
        serde_json::json!({
            "Test": ["CMD-SHELL", "test -e /onbuild.txt"],
            "Interval": 5_000_000_000u64,
            "Timeout": 2_000_000_000u64,
            "Retries": 2
        }),
        "{config}"
    );
    assert_eq!(
        config["OnBuild"],
        serde_json::json!(["RUN echo triggered > /onbuild.txt", "LABEL from=trigger"])
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM localhost/parent:1\nRUN cat /onbuild.txt > /child.txt\nCMD [\"cat\", \"/child.txt\"]\n",
    )
    .unwrap();
    let built = husk.ok(&["build", "-t", "localhost/child:1", c]);
    assert!(built.contains("[onbuild] RUN echo triggered"), "{built}");
    assert_eq!(
        husk.ok(&["run", "--rm", "localhost/child:1"]),
        "triggered\n"
    );
    let config = image_config(&husk, "localhost/child:1");
    assert!(config.get("OnBuild").is_none(), "{config}");
    assert_eq!(config["Labels"]["from"], "trigger", "{config}");
    assert_eq!(config["Healthcheck"]["Retries"], 2, "{config}");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM husk/busybox\nHEALTHCHECK --interval=soon CMD true\n",
    )
    .unwrap();
    let said = husk.fails(&["build", c]);
    assert!(
        said.contains("Dockerfile:2: HEALTHCHECK --interval=soon CMD true: HEALTHCHECK --interval=soon: not a duration"),
        "{said}"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM husk/busybox\nHEALTHCHECK --retries=0 CMD true\n",
    )
    .unwrap();
    let said = husk.fails(&["build", c]);
    assert!(
        said.contains("HEALTHCHECK --retries=0: not a count above 0"),
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
    let config = image_config(&other, "localhost/archived:1");
    assert_eq!(config["Labels"]["kind"], "archive", "{config}");
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

/// Debian's `buildah` with a root, run root and storage of the test's
/// own (vfs), its steps run by runc with no network (loopback only, as
/// husk's), no registry reachable or asked.
struct Buildah {
    dir: PathBuf,
}

impl Buildah {
    fn new(name: &str) -> Self {
        let dir = common::scratch("buildah", name);
        // No registry is searched for a short name: only what is loaded.
        std::fs::write(
            dir.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        Self { dir }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let d = &self.dir;
        let mut cmd = std::process::Command::new("buildah");
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .arg("--registries-conf")
            .arg(d.join("registries.conf"))
            .args(args)
            .env("TMPDIR", d)
            .env("BUILDAH_ISOLATION", "oci")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }

    /// `buildah args`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let child = self
            .cmd(args)
            .spawn()
            .expect("buildah (Debian's buildah; make test installs it)");
        let out = common::output_within(child, std::time::Duration::from_secs(300), "buildah");
        assert!(
            out.status.success(),
            "buildah {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// An image's full ID.
    fn id(&self, image: &str) -> String {
        self.ok(&["images", "--quiet", "--no-trunc", image])
            .trim()
            .trim_start_matches("sha256:")
            .to_string()
    }

    /// An image archive (an OCI layout, as husk writes it) loaded and
    /// named `name`; its ID.
    fn load(&self, archive: &Path, name: &str) -> String {
        let policy = self.dir.join("policy.json");
        let id = self.ok(&[
            "pull",
            "--signature-policy",
            policy.to_str().unwrap(),
            "--quiet",
            &format!("oci-archive:{}", archive.display()),
        ]);
        self.ok(&["tag", id.trim(), name]);
        id.trim().trim_start_matches("sha256:").to_string()
    }

    /// The image's file tree, as buildah's storage unpacks it.
    fn tree(&self, image: &str) -> std::collections::BTreeMap<String, String> {
        let container = self.ok(&["from", "--pull=never", image]);
        let container = container.trim();
        let mounted = self.ok(&["mount", container]);
        let tree = tree(Path::new(mounted.trim()));
        self.ok(&["umount", container]);
        self.ok(&["rm", container]);
        tree
    }

    /// The config fields the issue compares, buildah's own version label
    /// left out.
    fn config(&self, image: &str) -> serde_json::Value {
        let inspect: serde_json::Value =
            serde_json::from_str(&self.ok(&["inspect", "--type", "image", image])).unwrap();
        let config = &inspect["OCIv1"]["config"];
        let mut out = serde_json::Map::new();
        for key in [
            "Env",
            "Entrypoint",
            "Cmd",
            "WorkingDir",
            "User",
            "ExposedPorts",
            "Volumes",
            "Labels",
            "StopSignal",
        ] {
            let mut v = config.get(key).cloned().unwrap_or(serde_json::Value::Null);
            if let Some(labels) = v.as_object_mut() {
                if key == "Labels" {
                    labels.remove("io.buildah.version");
                }
            }
            // An empty value and none are the same to a runtime.
            let empty = match &v {
                serde_json::Value::String(s) => s.is_empty(),
                serde_json::Value::Array(a) => a.is_empty(),
                serde_json::Value::Object(o) => o.is_empty(),
                serde_json::Value::Null => true,
                _ => false,
            };
            if !empty {
                out.insert(key.into(), v);
            }
        }
        serde_json::Value::Object(out)
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "--all"]).output();
        let _ = self.cmd(&["umount", "--all"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file tree: each path's type, mode, owner and contents (a hash and
/// its number of links) or link target; times left out.
fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let path = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(root.join(&path)).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                todo.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!(
                    "link -> {}",
                    std::fs::read_link(root.join(&path)).unwrap().display()
                )
            } else if ft.is_file() {
                let bytes = std::fs::read(root.join(&path)).unwrap();
                format!(
                    "file {:x} links {}",
                    sha2::Sha256::digest(&bytes),
                    m.nlink()
                )
            } else {
                format!("special {:o} rdev {}", m.mode() & 0o170000, m.rdev())
            };
            out.insert(
                format!("/{}", path.display()),
                format!(
                    "{what} mode {:o} owner {}:{}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
        }
    }
    out
}

/// Where two trees differ, a line each.
fn differences(
    a: &std::collections::BTreeMap<String, String>,
    b: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only husk's: {k} {v}")),
            Some(w) if w != v => out.push(format!("{k}: husk {v}, buildah {w}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out.push(format!("only buildah's: {k} {v}"));
        }
    }
    out
}

/// A small Debian root made with Debian's tools: the files dpkg installed
/// on this host for dash, bash, coreutils, base-files and the libraries
/// they link (less
/// documentation, manual pages, locales and gconv modules), under
/// bookworm's merged `/usr` links, with dpkg's status of those packages.
fn debian_root(dir: &Path) {
    let packages = [
        "libc6",
        "libgmp10",
        "libselinux1",
        "libpcre2-8-0",
        "libtinfo6",
        "dash",
        "bash",
        "coreutils",
        "base-files",
    ];
    std::fs::create_dir_all(dir.join("usr")).unwrap();
    for d in ["bin", "sbin", "lib", "lib64"] {
        std::fs::create_dir_all(dir.join("usr").join(d)).unwrap();
        std::os::unix::fs::symlink(format!("usr/{d}"), dir.join(d)).unwrap();
    }
    let listed = std::process::Command::new("dpkg-query")
        .arg("-L")
        .args(packages)
        .output()
        .expect("dpkg-query");
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    for line in text(&listed.stdout).lines() {
        let path = Path::new(line);
        let skip = [
            "/usr/share/doc",
            "/usr/share/man",
            "/usr/share/locale",
            "/usr/share/info",
            "/usr/share/lintian",
        ];
        if skip.iter().any(|s| line.starts_with(s)) || line.contains("/gconv") {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if m.is_dir() {
            continue;
        }
        // Where it really is (its directory's links resolved), as the
        // merged /usr has it.
        let parent = std::fs::canonicalize(path.parent().unwrap()).unwrap();
        let dest = dir
            .join(parent.strip_prefix("/").unwrap())
            .join(path.file_name().unwrap());
        if std::fs::symlink_metadata(&dest).is_ok() {
            continue;
        }
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(path).unwrap(), &dest).unwrap();
        } else {
            std::fs::copy(path, &dest).unwrap();
        }
    }
    let status = std::process::Command::new("dpkg-query")
        .arg("-s")
        .args(packages)
        .output()
        .unwrap();
    std::fs::create_dir_all(dir.join("var/lib/dpkg")).unwrap();
    std::fs::write(dir.join("var/lib/dpkg/status"), &status.stdout).unwrap();
}

/// An archive for ADD: a directory, files with owners and modes of their
/// own, a symbolic and a hard link; gzip'd.
fn add_archive(path: &Path) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut entry = |path: &str,
                     kind: tar::EntryType,
                     mode: u32,
                     owner: u64,
                     data: &[u8],
                     link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner + 1);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        tar.append_data(&mut h, path, data).unwrap();
    };
    entry("pkg/", tar::EntryType::Directory, 0o750, 1234, b"", None);
    entry(
        "pkg/a.txt",
        tar::EntryType::Regular,
        0o600,
        1234,
        b"in the archive\n",
        None,
    );
    entry(
        "pkg/link",
        tar::EntryType::Symlink,
        0o777,
        0,
        b"",
        Some("a.txt"),
    );
    entry(
        "pkg/hard",
        tar::EntryType::Link,
        0o600,
        1234,
        b"",
        Some("pkg/a.txt"),
    );
    entry("top.txt", tar::EntryType::Regular, 0o644, 0, b"top\n", None);
    tar.into_inner().unwrap().finish().unwrap();
}

const COMPARED: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=husk/busybox
FROM scratch AS debian
COPY debian/ /
RUN echo 'root:x:0:0:root:/root:/bin/bash' > /etc/passwd \
 && echo 'app:x:1000:1000::/home/app:/bin/bash' >> /etc/passwd \
 && printf 'root:x:0:\napp:x:1000:\n' > /etc/group \
 && mkdir -p /home/app /tmp && chmod 1777 /tmp && chown app:app /home/app
SHELL ["/bin/bash", "-c"]
RUN [[ -n "$BASH_VERSION" ]] && echo "bash ${BASH_VERSINFO[0]}" > /shell.txt
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

FROM ${BASE} AS tools
ARG GREETING=hello
ENV WHO=world SPACED="a b"
WORKDIR /app
COPY greet.txt ./
COPY --chown=1000:1000 --chmod=640 sub/ /app/sub/
COPY *.conf /etc/conf/
ADD files.tar.gz /unpacked/
ADD plain.txt /added.txt
RUN echo "$GREETING $WHO" > out.txt \
 && mkdir -p /var/made && ln -s /app/out.txt /var/made/link \
 && chmod 4755 out.txt && rm /etc/conf/b.conf && rm /bin/vi \
 && mkdir /app/opq && touch /app/opq/x \
 && mkdir -p /home/u && chown 1000:1000 /home/u
RUN ["/bin/sh", "-c", "echo exec form >> /app/out.txt && ln /app/out.txt /app/hard.txt"]
RUN rm -rf /app/opq && mkdir /app/opq && echo new > /app/opq/y
USER 1000:1000
RUN touch /home/u/by-user

FROM debian
COPY --from=tools /app/ /app/
COPY --from=tools /unpacked/ /unpacked/
WORKDIR /home/app
COPY --chown=app:app greet.txt ./greet.txt
USER app
RUN echo "made by $(id -un)" > made.txt
LABEL org.example.built=both "org.example.other"="with space"
EXPOSE 8080 53/udp
VOLUME /data
ENV MODE=final
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/bash", "-c"]
CMD ["cat /app/out.txt"]
"#;

/// The same Dockerfile built by husk and by Debian's `buildah bud` (its
/// steps run by runc): both images, loaded into buildah's storage and
/// unpacked by it, have the same file trees (names, types, modes, owners,
/// contents, link targets) and the same config (Env, Entrypoint, Cmd,
/// WorkingDir, User, ExposedPorts, Volumes, Labels, StopSignal), for the
/// final stage and for a `--target` stage. Every instruction the issue
/// lists is in it: FROM a store image, `scratch` and a stage, ARG before
/// and after FROM, ENV, LABEL, WORKDIR, USER, RUN (both forms), SHELL,
/// COPY (glob, `--chown`, `--chmod`, `--from`), ADD (a file, a gzip'd tar
/// unpacked), EXPOSE, VOLUME, ENTRYPOINT, CMD, STOPSIGNAL; on busybox and
/// on a Debian root made with Debian's tools.
#[test]
fn husk_and_buildah_build_the_same_images() {
    let husk = Husk::new("build-vs-buildah");
    let buildah = Buildah::new("build-vs-buildah");
    let ctx = context(
        "vs-buildah",
        &[
            ("Dockerfile", COMPARED),
            ("greet.txt", "from the context\n"),
            ("sub/inner.txt", "inner\n"),
            ("sub/deeper/more.txt", "more\n"),
            ("a.conf", "a\n"),
            ("b.conf", "b\n"),
            ("plain.txt", "plain\n"),
            ("ignored.txt", "left out\n"),
            (".dockerignore", "ignored.txt\n"),
        ],
    );
    debian_root(&ctx.join("debian"));
    add_archive(&ctx.join("files.tar.gz"));
    // husk's busybox, as buildah's `husk/busybox`.
    let busybox = ctx.join("busybox.tar");
    husk.ok(&["busybox-image", "--output", busybox.to_str().unwrap()]);
    buildah.load(&busybox, "localhost/husk/busybox:latest");
    let c = ctx.to_str().unwrap();
    for (target, tag) in [(None, "final"), (Some("tools"), "tools")] {
        let name = format!("localhost/compared:{tag}");
        let mut args = vec!["build", "-t", &name];
        let mut bargs = vec![
            "bud",
            "--pull=never",
            "--runtime",
            "runc",
            "--network",
            "none",
            // docker's format: buildah honours SHELL only in it (as
            // BuildKit and husk do in any); the configs are compared as
            // OCI's.
            "--format",
            "docker",
            "-t",
        ];
        bargs.push(&name);
        if let Some(t) = target {
            args.extend(["--target", t]);
            bargs.extend(["--target", t]);
        }
        args.push(c);
        bargs.push(c);
        husk.ok(&args);
        buildah.ok(&bargs);
        // Each image by its ID (loading husk's archive may move the name).
        let theirs_id = buildah.id(&name);
        let archive = ctx.join(format!("husk-{tag}.tar"));
        husk.ok(&["save", "-o", archive.to_str().unwrap(), &name]);
        let ours_id = buildah.load(&archive, &format!("localhost/husk-built:{tag}"));
        assert_ne!(ours_id, theirs_id, "{tag}: the same image twice");
        let (ours, theirs) = (buildah.tree(&ours_id), buildah.tree(&theirs_id));
        let mut diff = differences(&ours, &theirs);
        // buildah leaves its runc containers' mount points behind, empty
        // (BuildKit removes its own; husk's guest makes none in the root).
        diff.retain(|d| {
            !d.starts_with("only buildah's: /etc/hostname file e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 links 1 ")
                && !d.starts_with("only buildah's: /run dir ")
        });
        assert!(
            diff.is_empty(),
            "{tag}: the trees differ:\n{}",
            diff.join("\n")
        );
        assert!(ours.len() > 100, "{tag}: {} entries", ours.len());
        assert_eq!(
            buildah.config(&ours_id),
            buildah.config(&theirs_id),
            "{tag}"
        );
    }
    // buildah builds on husk's image, its layer cache on (which checks
    // that the image's history lists each of its layers).
    let on_top = context(
        "on-husks",
        &[(
            "Dockerfile",
            "FROM localhost/husk-built:tools\nUSER root\nRUN test -e /app/out.txt\n",
        )],
    );
    buildah.ok(&[
        "bud",
        "--pull=never",
        "--runtime",
        "runc",
        "--network",
        "none",
        "--layers",
        "-t",
        "localhost/on-top",
        on_top.to_str().unwrap(),
    ]);
    // The final image runs, as the user and in the directory it names.
    assert_eq!(
        husk.ok(&[
            "run",
            "--rm",
            "localhost/compared:final",
            "cat /app/out.txt; cat made.txt; cat /shell.txt"
        ]),
        "hello world\nexec form\nmade by app\nbash 5\n"
    );
    nothing_left(&husk.root);
}
