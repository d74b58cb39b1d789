//! Running a build (docs/build.md): each stage from its base's layers,
//! each `RUN` in a microVM on an overlay of the stage's layers so far,
//! each `COPY` into such an overlay on the host, the upper directory of
//! either written as the step's layer; the other instructions change the
//! image's config. Steps that make layers are cached by a key of their
//! parent and what they do; the result is an image in husk's store.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use husk_image::store::{Image, Layer, Store};
use oci_spec::image::{
    Config, Descriptor, HistoryBuilder, ImageConfiguration, ImageManifestBuilder, MediaType,
};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::context::{Archive, archive_kind};
use crate::dockerfile::{Base, Command, CopySpec, Dockerfile, Kind, Source, Step};
use crate::lex::{self, Vars};

/// A build that failed: where and why.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile, its context or a step's values.
    #[error(transparent)]
    Dockerfile(#[from] crate::dockerfile::DockerfileError),
    /// A step that could not be done, naming it.
    #[error("Dockerfile:{line}: {step}: {message}")]
    Step {
        /// Its line.
        line: usize,
        /// Its text's first line.
        step: String,
        /// What failed.
        message: String,
    },
    /// A `RUN` whose command failed.
    #[error("Dockerfile:{line}: {step}: the command exited with status {status}")]
    Failed {
        /// Its line.
        line: usize,
        /// Its text's first line.
        step: String,
        /// Its exit status.
        status: i32,
    },
    /// Anything else, named.
    #[error("{0}")]
    Other(String),
}

/// What `husk build` was asked.
pub struct Options<'a> {
    /// Husk's root (its store, its runtime state).
    pub root: &'a Path,
    /// The build context.
    pub context: &'a Path,
    /// The Dockerfile (default `CONTEXT/Dockerfile`).
    pub dockerfile: Option<&'a Path>,
    /// `-t`: names for the image.
    pub tags: &'a [String],
    /// `--build-arg K=V`.
    pub build_args: &'a HashMap<String, String>,
    /// `--target`.
    pub target: Option<&'a str>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--label K=V`.
    pub labels: &'a [(String, String)],
    /// `SOURCE_DATE_EPOCH`: times in layers clamped to it.
    pub epoch: Option<u64>,
}

/// A stage as it is being built.
#[derive(Clone)]
struct State {
    layers: Vec<Layer>,
    config: Config,
    history: Vec<oci_spec::image::History>,
    /// The cache key of what the stage is so far.
    key: String,
    /// ARGs declared in the stage, with their values.
    args: Vars,
    shell: Vec<String>,
    /// docker's `Healthcheck` (its config's JSON form), which an OCI
    /// config has no field for: kept as BuildKit keeps it, an extra field
    /// of the config.
    healthcheck: Option<serde_json::Value>,
    /// `ONBUILD` triggers: the stage's own, or, at its start, its base's
    /// (run, then dropped).
    onbuild: Vec<String>,
}

/// The hex digits of `bytes`' sha256 (the store's digest, less its
/// `sha256:`).
fn sha256_hex(bytes: &[u8]) -> String {
    husk_image::store::sha256(bytes)["sha256:".len()..].to_owned()
}

fn random_hex() -> String {
    let mut buf = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty());
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn first_line(step: &Step) -> String {
    step.text.lines().next().unwrap_or_default().to_string()
}

impl State {
    /// The variables a step sees: the stage's ARGs, then its ENV over them.
    fn vars(&self) -> Vars {
        let mut v = self.args.clone();
        for kv in self.config.env().iter().flatten() {
            if let Some((k, val)) = kv.split_once('=') {
                v.insert(k.to_string(), val.to_string());
            }
        }
        v
    }

    fn set_env(&mut self, key: &str, value: &str) {
        let mut env: Vec<String> = self.config.env().clone().unwrap_or_default();
        env.retain(|kv| kv.split_once('=').map(|(k, _)| k) != Some(key));
        env.push(format!("{key}={value}"));
        self.config.set_env(Some(env));
    }

    /// The key of a step that makes a layer: its parent's and what it
    /// does, with every value it depends on expanded in `what` (the ARGs,
    /// ENV, user, working directory and shell a RUN sees; a COPY's
    /// sources' content), so a step that changes nothing a later one
    /// reads leaves that one cached, as BuildKit's cache does.
    fn chain(&mut self, what: &serde_json::Value) {
        self.key = sha256_hex(format!("{}\n{what}", self.key).as_bytes());
    }

    fn note(&mut self, step: &Step, empty_layer: bool) {
        if let Ok(h) = HistoryBuilder::default()
            .created_by(first_line(step))
            .empty_layer(empty_layer)
            .build()
        {
            self.history.push(h);
        }
    }
}

/// The overlay of a stage's layers with a fresh upper directory, mounted
/// for a step, and removed with it.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(root: &Path, store: &Store, layers: &[Layer], writable: bool) -> Result<Self, String> {
        let dir = root.join("build").join(random_hex());
        let m = Mounted { dir };
        for sub in ["rootfs", "upper", "work", "empty"] {
            std::fs::create_dir_all(m.dir.join(sub))
                .map_err(|e| format!("create {}: {e}", m.dir.join(sub).display()))?;
        }
        let mut lower = Vec::new();
        for l in layers.iter().rev() {
            lower.push(
                store
                    .layer_path(&l.diff_id)
                    .map_err(|e| e.to_string())?
                    .display()
                    .to_string(),
            );
        }
        if lower.is_empty() {
            lower.push(m.dir.join("empty").display().to_string());
        }
        let data = match (writable, lower.len()) {
            (false, 1) => None,
            (false, _) => Some(format!("lowerdir={}", lower.join(":"))),
            (true, _) => Some(format!(
                "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
                lower.join(":"),
                m.dir.join("upper").display(),
                m.dir.join("work").display()
            )),
        };
        let target = m.rootfs();
        let mounted = match data {
            None => rustix::mount::mount_bind(Path::new(&lower[0]), &target).and_then(|()| {
                rustix::mount::mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, c"")
            }),
            Some(d) => rustix::mount::mount(
                c"overlay",
                &target,
                c"overlay",
                MountFlags::NOSUID
                    | MountFlags::NODEV
                    | if writable {
                        MountFlags::empty()
                    } else {
                        MountFlags::RDONLY
                    },
                Some(CString::new(d).map_err(|e| e.to_string())?.as_c_str()),
            ),
        };
        mounted.map_err(|e| format!("mount the stage's {} layers: {e}", layers.len()))?;
        Ok(m)
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.rootfs(), UnmountFlags::DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `RUN <<EOF` whose script starts with `#!`: run by the interpreter it
/// names, as BuildKit runs it, not by the stage's shell. The script is
/// the interpreter's standard input (`/dev/stdin` its file), through a
/// quoted here-document of `/bin/sh` (so its text is not expanded), whose
/// delimiter is made from the script's digest: the same script, the same
/// command (and cache key). Nothing is written into the step's root.
fn shebang_script(text: &str) -> Option<Vec<String>> {
    let first = text.lines().next()?.strip_prefix("#!")?.trim();
    // As the kernel reads a `#!` line: the interpreter, then the rest of
    // the line as one argument.
    let words: Vec<&str> = match first.split_once([' ', '\t']) {
        Some((interpreter, arg)) => vec![interpreter, arg.trim()],
        None if !first.is_empty() => vec![first],
        None => return None,
    };
    let quote = |w: &str| format!("'{}'", w.replace('\'', "'\\''"));
    let delimiter = format!("HUSK_SCRIPT_{}", &sha256_hex(text.as_bytes())[..16]);
    let interpreter: Vec<String> = words.iter().map(|w| quote(w)).collect();
    let body = if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    };
    Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "exec {} /dev/stdin <<'{delimiter}'\n{body}{delimiter}\n",
            interpreter.join(" ")
        ),
    ])
}

/// A step's network attachment, taken down when dropped (the step
/// succeeded, failed or was interrupted by an error).
struct Attached {
    root: PathBuf,
    id: String,
}

impl Attached {
    /// Where its record is: `<root>/docker/<id>/`.
    fn dir(&self) -> PathBuf {
        self.root.join("docker").join(&self.id)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = husk_docker::network::detach(&self.root, &self.id);
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// The PATH an image built `FROM scratch` gets, as BuildKit's and
/// buildah's do.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A directory of the build's own (a here-document's, an unpacked
/// archive's), removed with it.
struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A new empty directory `<root>/build/<kind>-<random>`.
    fn new(root: &Path, kind: &str) -> Result<Self, String> {
        let dir = Self(root.join("build").join(format!("{kind}-{}", random_hex())));
        std::fs::create_dir_all(&dir.0).map_err(|e| format!("create {}: {e}", dir.0.display()))?;
        Ok(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cache: a step's key to the layer it made.
fn cache_path(root: &Path, key: &str) -> PathBuf {
    root.join("build-cache").join(format!("{key}.json"))
}

struct Builder<'a> {
    o: &'a Options<'a>,
    store: Store,
    file: Dockerfile,
    ignore: crate::ignore::Ignore,
    out: &'a mut dyn Write,
    /// Finished stages, by index.
    done: HashMap<usize, State>,
    /// Global ARGs with their values.
    globals: Vars,
    /// Steps that ran (not cached).
    pub ran: usize,
}

/// Builds the image `o` asks for; progress goes to `out`. Returns the
/// image's ID (its config's digest).
pub fn build(o: &Options<'_>, out: &mut dyn Write) -> Result<String, BuildError> {
    let path = o
        .dockerfile
        .map(Path::to_path_buf)
        .unwrap_or_else(|| o.context.join("Dockerfile"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BuildError::Other(format!("read {}: {e}", path.display())))?;
    let file = crate::dockerfile::parse(&text)?;
    let ignore = match std::fs::read_to_string(o.context.join(".dockerignore")) {
        Ok(t) => crate::ignore::Ignore::parse(&t).map_err(BuildError::Other)?,
        Err(_) => Default::default(),
    };
    let store = Store::open(o.root).map_err(|e| BuildError::Other(e.to_string()))?;
    // Held for the whole build, so that a garbage collection meanwhile
    // keeps the layers it makes and uses before an image names them.
    let _adding = store
        .adding()
        .map_err(|e| BuildError::Other(e.to_string()))?;
    let mut globals = Vars::new();
    for (name, default) in &file.global_args {
        let value = match (o.build_args.get(name), default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => lex::word(d, file.escape, &globals)
                .map_err(|e| BuildError::Other(format!("ARG {name}: {e}")))?,
            (None, None) => continue,
        };
        globals.insert(name.clone(), value);
    }
    let (target, stages) = file.stages_for(o.target).map_err(BuildError::Other)?;
    let mut b = Builder {
        o,
        store,
        file,
        ignore,
        out,
        done: HashMap::new(),
        globals,
        ran: 0,
    };
    for k in stages {
        let state = b.stage(k)?;
        b.done.insert(k, state);
    }
    let mut state = b.done.remove(&target).expect("the target was built");
    for (k, v) in o.labels {
        let mut labels = state.config.labels().clone().unwrap_or_default();
        labels.insert(k.clone(), v.clone());
        state.config.set_labels(Some(labels));
    }
    b.commit(state)
}

impl Builder<'_> {
    fn say(&mut self, line: String) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    fn stage(&mut self, k: usize) -> Result<State, BuildError> {
        let stage = self.file.stages[k].clone();
        let fail = |message: String| BuildError::Step {
            line: stage.line,
            step: format!("FROM {}", stage.name.clone().unwrap_or_default()),
            message,
        };
        let mut state = match &stage.base {
            // BuildKit's (and buildah's) empty image: PATH set.
            Base::Scratch => State {
                layers: Vec::new(),
                config: {
                    let mut c = Config::default();
                    c.set_env(Some(vec![DEFAULT_PATH.into()]));
                    c
                },
                history: Vec::new(),
                key: sha256_hex(b"scratch"),
                args: Vars::new(),
                shell: vec!["/bin/sh".into(), "-c".into()],
                healthcheck: None,
                onbuild: Vec::new(),
            },
            Base::Stage(b) => {
                let mut s = self
                    .done
                    .get(b)
                    .cloned()
                    .ok_or_else(|| fail("its base stage was not built".into()))?;
                s.args.clear();
                s
            }
            Base::Image(raw) => {
                let name = lex::word(raw, self.file.escape, &self.globals)
                    .map_err(|e| fail(e.to_string()))?;
                if name.is_empty() {
                    return Err(fail(format!("FROM {raw}: the image name is empty")));
                }
                if let Some(i) = self.file.stage_index(&name).filter(|&i| i < k) {
                    let mut s = self
                        .done
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| fail("its base stage was not built".into()))?;
                    s.args.clear();
                    s
                } else {
                    let (store, image) =
                        husk_docker::image(self.o.root, &name).map_err(|e| fail(e.to_string()))?;
                    let config =
                        husk_image::config(&store, &image).map_err(|e| fail(e.to_string()))?;
                    let (healthcheck, onbuild) = docker_extras(&store, &image.config);
                    State {
                        layers: image.layers.clone(),
                        config: config.config().clone().unwrap_or_default(),
                        history: whole_history(
                            config.history().clone().unwrap_or_default(),
                            image.layers.len(),
                        ),
                        key: sha256_hex(image.config.as_bytes()),
                        args: Vars::new(),
                        shell: vec!["/bin/sh".into(), "-c".into()],
                        healthcheck,
                        onbuild,
                    }
                }
            }
        };
        if let Some(p) = &stage.platform {
            let p =
                lex::word(p, self.file.escape, &self.globals).map_err(|e| fail(e.to_string()))?;
            if p != "linux/amd64" && !p.is_empty() {
                return Err(fail(format!(
                    "--platform={p}: husk builds linux/amd64 only"
                )));
            }
        }
        // The base's ONBUILD triggers run first, in order, as BuildKit
        // runs them; the image made here does not keep them.
        for trigger in std::mem::take(&mut state.onbuild) {
            self.say(format!("[onbuild] {trigger}"));
            let fail_trigger = |message: String| BuildError::Step {
                line: stage.line,
                step: format!("ONBUILD {trigger}"),
                message,
            };
            let parsed = crate::dockerfile::parse(&format!("FROM scratch\n{trigger}\n"))
                .map_err(|e| fail_trigger(e.message))?;
            let steps = &parsed.stages[0].steps;
            let [step] = steps.as_slice() else {
                return Err(fail_trigger("a trigger is one instruction".into()));
            };
            if matches!(step.kind, Kind::Onbuild(_)) {
                return Err(fail_trigger("ONBUILD is not allowed as a trigger".into()));
            }
            let step = Step {
                line: stage.line,
                ..step.clone()
            };
            self.step(&mut state, &step).map_err(|e| match e {
                BuildError::Other(message) => fail_trigger(message),
                e => e,
            })?;
        }
        let total = stage.steps.len();
        for (n, step) in stage.steps.iter().enumerate() {
            self.say(format!("[{}/{}] {}", n + 1, total, first_line(step)));
            let (started, ran) = (std::time::Instant::now(), self.ran);
            self.step(&mut state, step).map_err(|e| match e {
                BuildError::Other(message) => BuildError::Step {
                    line: step.line,
                    step: first_line(step),
                    message,
                },
                e => e,
            })?;
            // A layer made (not from the cache): its time, as docker's
            // builder prints it.
            if self.ran > ran {
                self.say(format!("DONE {:.1}s", started.elapsed().as_secs_f64()));
            }
        }
        Ok(state)
    }

    fn word(&self, state: &State, raw: &str) -> Result<String, BuildError> {
        lex::word(raw, self.file.escape, &state.vars())
            .map_err(|e| BuildError::Other(e.to_string()))
    }

    fn step(&mut self, state: &mut State, step: &Step) -> Result<(), BuildError> {
        let esc = self.file.escape;
        match &step.kind {
            Kind::Arg(args) => {
                for (name, default) in args {
                    let value = match (self.o.build_args.get(name), default, self.globals.get(name))
                    {
                        (Some(v), _, _) => Some(v.clone()),
                        (None, Some(d), _) => Some(self.word(state, d)?),
                        (None, None, Some(g)) => Some(g.clone()),
                        _ => None,
                    };
                    if let Some(v) = value {
                        state.args.insert(name.clone(), v);
                    }
                }
            }
            Kind::Env(pairs) => {
                let vars = state.vars();
                let mut set = Vec::new();
                for (k, v) in pairs {
                    let k =
                        lex::word(k, esc, &vars).map_err(|e| BuildError::Other(e.to_string()))?;
                    let v =
                        lex::word(v, esc, &vars).map_err(|e| BuildError::Other(e.to_string()))?;
                    set.push((k, v));
                }
                for (k, v) in &set {
                    state.set_env(k, v);
                }
                state.note(step, true);
            }
            Kind::Label(pairs) => {
                let mut labels = state.config.labels().clone().unwrap_or_default();
                for (k, v) in pairs {
                    labels.insert(self.word(state, k)?, self.word(state, v)?);
                }
                state.config.set_labels(Some(labels));
                state.note(step, true);
            }
            Kind::Workdir(raw) => {
                let w = self.word(state, raw)?;
                let base = state
                    .config
                    .working_dir()
                    .clone()
                    .unwrap_or_else(|| "/".into());
                let dir = if w.starts_with('/') {
                    w
                } else {
                    format!("{}/{w}", base.trim_end_matches('/'))
                };
                state.config.set_working_dir(Some(dir.clone()));
                state.note(step, true);
            }
            Kind::User(raw) => {
                let u = self.word(state, raw)?;
                state.config.set_user(Some(u.clone()));
                state.note(step, true);
            }
            Kind::Expose(raw) => {
                let words = lex::words(raw, esc, &state.vars())
                    .map_err(|e| BuildError::Other(e.to_string()))?;
                let mut ports = state.config.exposed_ports().clone().unwrap_or_default();
                for w in words {
                    let p = if w.contains('/') {
                        w
                    } else {
                        format!("{w}/tcp")
                    };
                    if !ports.contains(&p) {
                        ports.push(p);
                    }
                }
                state.config.set_exposed_ports(Some(ports));
                state.note(step, true);
            }
            Kind::Volume { json, raw } => {
                let paths = match json {
                    Some(j) => j
                        .iter()
                        .map(|p| self.word(state, p))
                        .collect::<Result<Vec<_>, _>>()?,
                    None => lex::words(raw, esc, &state.vars())
                        .map_err(|e| BuildError::Other(e.to_string()))?,
                };
                let mut volumes = state.config.volumes().clone().unwrap_or_default();
                for p in paths {
                    if !volumes.contains(&p) {
                        volumes.push(p);
                    }
                }
                state.config.set_volumes(Some(volumes));
                state.note(step, true);
            }
            Kind::Entrypoint(c) => {
                state.config.set_entrypoint(Some(self.argv(state, c)));
                // A new ENTRYPOINT resets CMD, as docker's builder does.
                state.config.set_cmd(None);
                state.note(step, true);
            }
            Kind::Cmd(c) => {
                state.config.set_cmd(Some(self.argv(state, c)));
                state.note(step, true);
            }
            Kind::Shell(s) => {
                state.shell = s.clone();
                state.note(step, true);
            }
            Kind::StopSignal(raw) => {
                let s = self.word(state, raw)?;
                state.config.set_stop_signal(Some(s));
                state.note(step, true);
            }
            Kind::Maintainer(_) => state.note(step, true),
            Kind::Healthcheck(h) => {
                state.healthcheck = Some(healthcheck(h).map_err(BuildError::Other)?);
                state.note(step, true);
            }
            Kind::Onbuild(trigger) => {
                state.onbuild.push(trigger.clone());
                state.note(step, true);
            }
            Kind::Run {
                command,
                here_docs,
                network,
            } => {
                // `RUN <<EOF ... EOF`: the here-document is the script the
                // stage's shell runs, as BuildKit runs it. Here-documents
                // after a command (`RUN cat <<EOF`) are in the command's
                // text already, for the shell to read (dockerfile.rs).
                let argv = match (here_docs.as_slice(), command) {
                    ([], _) => self.argv(state, command),
                    // The reader gives the command without its `<<EOF`
                    // marker when the here-document is all of it.
                    ([doc], Command::Shell(text))
                        if text.trim().is_empty()
                            || text.trim_start().starts_with("<<")
                                && !text
                                    .trim_start()
                                    .lines()
                                    .next()
                                    .unwrap_or_default()
                                    .trim_end()
                                    .contains(char::is_whitespace) =>
                    {
                        match shebang_script(&doc.text) {
                            Some(v) => v,
                            None => {
                                let mut v = state.shell.clone();
                                v.push(doc.text.clone());
                                v
                            }
                        }
                    }
                    _ => {
                        return Err(BuildError::Other(
                            "RUN with a here-document other than its whole script is not supported yet".into(),
                        ));
                    }
                };
                let payload = serde_json::json!({
                    "run": argv,
                    "env": state.config.env(),
                    "args": state.args,
                    "user": state.config.user(),
                    "workdir": state.config.working_dir(),
                    "network": network,
                });
                state.chain(&payload);
                if self.cached(state, step)? {
                    return Ok(());
                }
                self.run(state, step, &argv, network.as_deref())?;
            }
            Kind::Copy(spec) => self.copy(state, step, spec, false)?,
            Kind::Add(spec) => self.copy(state, step, spec, true)?,
        }
        Ok(())
    }

    /// A command's argv: the exec form as it is, the shell form through
    /// the stage's SHELL.
    fn argv(&self, state: &State, c: &Command) -> Vec<String> {
        match c {
            Command::Exec(v) => v.clone(),
            Command::Shell(s) => {
                let mut v = state.shell.clone();
                v.push(s.clone());
                v
            }
        }
    }

    /// A cached layer for the state's key, applied. False when there is
    /// none (or the cache is not to be used).
    fn cached(&mut self, state: &mut State, step: &Step) -> Result<bool, BuildError> {
        if self.o.no_cache {
            return Ok(false);
        }
        let Ok(bytes) = std::fs::read(cache_path(self.o.root, &state.key)) else {
            return Ok(false);
        };
        let Ok(layer) = serde_json::from_slice::<Layer>(&bytes) else {
            return Ok(false);
        };
        if self.store.unpack(&layer).is_err() {
            return Ok(false);
        }
        self.say(format!("CACHED {}", first_line(step)));
        state.layers.push(layer);
        state.note(step, false);
        Ok(true)
    }

    /// Writes `upper` as a layer into the store, records it for the
    /// state's key, and adds it to the stage.
    fn layer_from(
        &mut self,
        state: &mut State,
        step: &Step,
        upper: &Path,
    ) -> Result<(), BuildError> {
        let other = |e: String| BuildError::Other(e);
        let tmp = self
            .o
            .root
            .join("build")
            .join(format!("layer-{}.tar", random_hex()));
        let written = (|| {
            let file = std::fs::File::create(&tmp)
                .map_err(|e| format!("create {}: {e}", tmp.display()))?;
            let mut buffered = std::io::BufWriter::new(file);
            let w = crate::layer::write(upper, &mut buffered, self.o.epoch)
                .map_err(|e| e.to_string())?;
            buffered.flush().map_err(|e| e.to_string())?;
            drop(buffered);
            let file = std::fs::File::open(&tmp).map_err(|e| e.to_string())?;
            self.store
                .put_blob_from(&w.diff_id, file)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(w)
        })();
        let _ = std::fs::remove_file(&tmp);
        let w = written.map_err(other)?;
        let layer = Layer {
            digest: w.diff_id.clone(),
            diff_id: w.diff_id,
            size: w.size,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        };
        self.store
            .unpack(&layer)
            .map_err(|e| other(e.to_string()))?;
        let cache = cache_path(self.o.root, &state.key);
        if let Some(dir) = cache.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(&cache, serde_json::to_vec(&layer).unwrap_or_default());
        state.layers.push(layer);
        state.note(step, false);
        self.ran += 1;
        Ok(())
    }

    fn run(
        &mut self,
        state: &mut State,
        step: &Step,
        argv: &[String],
        network: Option<&str>,
    ) -> Result<(), BuildError> {
        let other = |e: String| BuildError::Other(e);
        let mounted = Mounted::new(self.o.root, &self.store, &state.layers, true).map_err(other)?;
        let rootfs = mounted.rootfs();
        let user = state.config.user().clone().unwrap_or_default();
        let (uid, gid, groups) = if user.is_empty() {
            (0, 0, Vec::new())
        } else {
            husk_docker::resolve_user(&rootfs, &user).map_err(|e| other(e.to_string()))?
        };
        let cwd = state
            .config
            .working_dir()
            .clone()
            .unwrap_or_else(|| "/".into());
        let mut env: Vec<String> = state.config.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        // ARGs are the command's environment too, under ENV.
        for (k, v) in &state.args {
            if !env
                .iter()
                .any(|e| e.split_once('=').map(|(n, _)| n) == Some(k))
            {
                env.push(format!("{k}={v}"));
            }
        }
        let mut spec =
            husk_docker::busybox::config(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        if let Some(p) = spec.process_mut() {
            p.set_env(Some(env));
            p.set_cwd(PathBuf::from(&cwd));
            let mut u = oci_spec::runtime::User::default();
            u.set_uid(uid);
            u.set_gid(gid);
            u.set_additional_gids(Some(groups));
            p.set_user(u);
            // docker's default capabilities, as `docker build` gives a
            // step (a step's `chown` works).
            p.set_capabilities(Some(husk_docker::default_capabilities()));
        }
        if let Some(r) = spec.root_mut() {
            r.set_path(rootfs.clone());
            r.set_readonly(Some(false));
        }
        // The working directory exists, as docker's builder makes it.
        let rel = cwd.trim_start_matches('/');
        if !rel.is_empty() {
            mkdir_in_root(&rootfs, rel, None).map_err(other)?;
        }
        let id = format!("husk-build-{}", random_hex());
        // The build's network, as docker build's default: the root's
        // default husk network (made on first use: a bridge with NAT),
        // through CNI, in a namespace of the step's own, taken down after
        // it. `RUN --network=none`: loopback only. Nothing of it (hosts
        // or resolv.conf) is written into the step's root.
        let _attached = match network {
            Some("none") => {
                husk_docker::drop_netns(&mut spec);
                None
            }
            _ => {
                let net = husk_docker::network::get_or_default(
                    self.o.root,
                    husk_docker::network::DEFAULT_NETWORK,
                )
                .map_err(|e| other(e.to_string()))?;
                // The attachment's record lives where a docker-style
                // container's does; the guard removes both.
                let guard = Attached {
                    root: self.o.root.to_path_buf(),
                    id: id.clone(),
                };
                let record = guard.dir();
                std::fs::create_dir_all(&record)
                    .map_err(|e| other(format!("create {}: {e}", record.display())))?;
                let a = husk_docker::network::attach(
                    self.o.root,
                    &id,
                    &id,
                    &net,
                    Vec::new(),
                    Vec::new(),
                )
                .map_err(|e| other(e.to_string()))?;
                husk_docker::set_netns(&mut spec, &a.netns);
                Some(guard)
            }
        };
        let bundle = mounted.dir.clone();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec(&spec).map_err(|e| other(e.to_string()))?,
        )
        .map_err(|e| other(e.to_string()))?;
        let options = husk_runtime::container::CreateOptions {
            root: self.o.root,
            id: &id,
            bundle: &bundle,
            pid_file: None,
            console_socket: None,
            detach: false,
            restore: None,
            stdio: None,
            pod: None,
        };
        let status = husk_runtime::run::run(&options).map_err(|e| other(e.to_string()))?;
        if status != 0 {
            return Err(BuildError::Failed {
                line: step.line,
                step: first_line(step),
                status,
            });
        }
        let _ = rustix::mount::unmount(&rootfs, UnmountFlags::empty());
        self.layer_from(state, step, &mounted.upper())
    }

    fn copy(
        &mut self,
        state: &mut State,
        step: &Step,
        spec: &CopySpec,
        add: bool,
    ) -> Result<(), BuildError> {
        let other = |e: String| BuildError::Other(e);
        // Where from: the context, or a stage's (or image's) root.
        let from_state = match &spec.from {
            None => None,
            Some(f) => {
                let f = self.word(state, f)?;
                match self.file.stage_index(&f) {
                    Some(i) => Some(self.done.get(&i).cloned().ok_or_else(|| {
                        other(format!(
                            "--from={f}: that stage is not built before this one"
                        ))
                    })?),
                    None => {
                        let (_, image) = husk_docker::image(self.o.root, &f)
                            .map_err(|e| other(e.to_string()))?;
                        Some(State {
                            layers: image.layers.clone(),
                            config: Config::default(),
                            history: Vec::new(),
                            key: sha256_hex(image.config.as_bytes()),
                            args: Vars::new(),
                            shell: Vec::new(),
                            healthcheck: None,
                            onbuild: Vec::new(),
                        })
                    }
                }
            }
        };
        let source_mount = match &from_state {
            Some(s) => {
                Some(Mounted::new(self.o.root, &self.store, &s.layers, false).map_err(other)?)
            }
            None => None,
        };
        // Here-documents (`COPY <<EOF /path`, `COPY <<A <<B /dir/`): files
        // of their text (variables expanded unless the delimiter was
        // quoted), named by their delimiters, in a directory of the
        // build's own, copied after the other sources.
        let mut heredocs = Vec::new();
        for s in &spec.sources {
            if let Source::HereDoc(doc) = s {
                // Expanded as a double-quoted word (quotes in it kept); a
                // variable it requires and lacks fails the step.
                let text = match doc.expand {
                    true => self.word(state, &format!("\"{}\"", doc.text.replace('"', "\\\"")))?,
                    false => doc.text.clone(),
                };
                let name = match doc.name.as_str() {
                    "" | "." | ".." => "heredoc".to_string(),
                    n => n.to_string(),
                };
                heredocs.push((name, text));
            }
        }
        let heredoc_dir = match heredocs.is_empty() {
            true => None,
            false => {
                let dir = ScratchDir::new(self.o.root, "heredoc").map_err(other)?;
                for (name, text) in &heredocs {
                    std::fs::write(dir.0.join(name), text.as_bytes())
                        .map_err(|e| other(format!("write the here-document {name}: {e}")))?;
                }
                Some(dir)
            }
        };
        let source_root = match &source_mount {
            Some(m) => m.rootfs(),
            None => self.o.context.to_path_buf(),
        };
        let mut sources = Vec::new();
        for s in &spec.sources {
            match s {
                Source::HereDoc(_) => {}
                Source::Path(p) => {
                    let p = self.word(state, p)?;
                    let found = crate::context::select(
                        &source_root,
                        &p,
                        match from_state {
                            Some(_) => None,
                            None => Some(&self.ignore),
                        },
                    )
                    .map_err(other)?;
                    sources.extend(found);
                }
            }
        }
        // ADD unpacks a local tar archive (plain, gzip, zstd) into the
        // destination, as a directory; anything else is copied.
        let mut archives = Vec::new();
        let mut copied = Vec::new();
        for s in sources {
            match add.then(|| archive_kind(&source_root, &s)) {
                Some(Archive::Tar) => archives.push(s),
                Some(Archive::Unsupported(kind)) => {
                    return Err(other(format!(
                        "ADD {s}: {kind} archives are not unpacked yet (plain tar, gzip and zstd are)"
                    )));
                }
                Some(Archive::No) | None => copied.push(s),
            }
        }
        let sources = copied;
        let dest = self.word(state, &spec.dest)?;
        let chown = spec
            .chown
            .as_ref()
            .map(|c| self.word(state, c))
            .transpose()?;
        let chmod = match &spec.chmod {
            Some(c) => Some(
                u32::from_str_radix(&self.word(state, c)?, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| other(format!("--chmod={c}: not an octal mode")))?,
            ),
            None => None,
        };
        let ignore_all = self.ignore.clone();
        // .dockerignore is the context's: not a stage's, nor a
        // here-document's.
        let ignore = match &from_state {
            None => Some(&ignore_all),
            Some(_) => None,
        };
        let digest = crate::context::digest(&source_root, &sources, ignore).map_err(other)?;
        let unpacked = crate::context::digest(&source_root, &archives, None).map_err(other)?;
        let payload = serde_json::json!({
            "copy": sources,
            "unpack": archives,
            "unpacked": unpacked,
            "heredocs": heredocs,
            "from": from_state.as_ref().map(|s| &s.key),
            "content": digest,
            "dest": dest,
            "workdir": state.config.working_dir(),
            "chown": chown,
            "chmod": chmod,
        });
        state.chain(&payload);
        if self.cached(state, step)? {
            return Ok(());
        }
        let target = Mounted::new(self.o.root, &self.store, &state.layers, true).map_err(other)?;
        let rootfs = target.rootfs();
        let (uid, gid) = match &chown {
            Some(c) => {
                let (u, g, _) =
                    husk_docker::resolve_user(&rootfs, c).map_err(|e| other(e.to_string()))?;
                (u, g)
            }
            None => (0, 0),
        };
        let cwd = state
            .config
            .working_dir()
            .clone()
            .unwrap_or_else(|| "/".into());
        let dest_abs = if dest.starts_with('/') {
            dest.clone()
        } else {
            format!("{}/{dest}", cwd.trim_end_matches('/'))
        };
        // Without --chown, the context's files are root's, and what comes
        // from a stage or image keeps its owners, as BuildKit has it.
        let how = crate::context::How {
            owner: match (&chown, &from_state) {
                (None, Some(_)) => None,
                _ => Some((uid, gid)),
            },
            chmod,
            ignore,
        };
        let into_dir = dest.ends_with('/') || sources.len() + archives.len() + heredocs.len() > 1;
        if !sources.is_empty() {
            crate::context::copy_into(&source_root, &sources, &rootfs, &dest_abs, into_dir, &how)
                .map_err(other)?;
        }
        // An archive's entries keep their owners unless --chown.
        for a in &archives {
            let dir = ScratchDir::new(self.o.root, "unpack").map_err(other)?;
            crate::context::unpack_archive(&source_root, a, &dir.0)
                .map_err(|e| other(format!("ADD {e}")))?;
            crate::context::copy_into(
                &dir.0,
                &[String::new()],
                &rootfs,
                &dest_abs,
                true,
                &crate::context::How {
                    owner: chown.as_ref().map(|_| (uid, gid)),
                    chmod,
                    ignore: None,
                },
            )
            .map_err(|e| other(format!("ADD {a}: {e}")))?;
        }
        if let Some(dir) = &heredoc_dir {
            let names: Vec<String> = heredocs.iter().map(|(n, _)| n.clone()).collect();
            crate::context::copy_into(
                &dir.0,
                &names,
                &rootfs,
                &dest_abs,
                into_dir,
                &crate::context::How {
                    owner: Some((uid, gid)),
                    chmod,
                    ignore: None,
                },
            )
            .map_err(other)?;
        }
        drop(source_mount);
        let _ = rustix::mount::unmount(&rootfs, UnmountFlags::empty());
        self.layer_from(state, step, &target.upper())
    }

    /// Writes the stage's config and manifest into the store and names
    /// the image.
    fn commit(&mut self, state: State) -> Result<String, BuildError> {
        let other = |e: String| BuildError::Other(e);
        let diff_ids: Vec<String> = state.layers.iter().map(|l| l.diff_id.clone()).collect();
        let rootfs = oci_spec::image::RootFsBuilder::default()
            .typ("layers")
            .diff_ids(diff_ids)
            .build()
            .map_err(|e| other(e.to_string()))?;
        let mut config = ImageConfiguration::default();
        config.set_config(Some(state.config.clone()));
        config.set_rootfs(rootfs);
        config.set_history(Some(state.history.clone()));
        config.set_architecture(oci_spec::image::Arch::Amd64);
        config.set_os(oci_spec::image::Os::Linux);
        if let Some(e) = self.o.epoch {
            config.set_created(Some(
                humantime::format_rfc3339(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(e),
                )
                .to_string(),
            ));
        } else {
            config.set_created(Some(husk_image::now_rfc3339()));
        }
        let mut config = serde_json::to_value(&config).map_err(|e| other(e.to_string()))?;
        // docker's fields an OCI config lacks, where BuildKit writes them.
        if let Some(c) = config.get_mut("config").and_then(|c| c.as_object_mut()) {
            if let Some(h) = &state.healthcheck {
                c.insert("Healthcheck".into(), h.clone());
            }
            if !state.onbuild.is_empty() {
                c.insert("OnBuild".into(), serde_json::json!(state.onbuild));
            }
        }
        let config_bytes = serde_json::to_vec(&config).map_err(|e| other(e.to_string()))?;
        let config_digest = self
            .store
            .put_blob(None, &config_bytes)
            .map_err(|e| other(e.to_string()))?;
        let layers: Vec<Descriptor> = state
            .layers
            .iter()
            .map(|l| {
                Descriptor::new(
                    MediaType::Other(l.media_type.clone()),
                    l.size,
                    l.digest
                        .as_str()
                        .try_into()
                        .unwrap_or_else(|_| unreachable_digest()),
                )
            })
            .collect();
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_bytes.len() as u64,
                config_digest
                    .as_str()
                    .try_into()
                    .unwrap_or_else(|_| unreachable_digest()),
            ))
            .layers(layers)
            .build()
            .map_err(|e| other(e.to_string()))?;
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| other(e.to_string()))?;
        let manifest_digest = self
            .store
            .put_blob(None, &manifest_bytes)
            .map_err(|e| other(e.to_string()))?;
        let id = config_digest.clone();
        let default_tag = vec![format!("localhost/build:{}", &id[7..19])];
        let tags = if self.o.tags.is_empty() {
            &default_tag
        } else {
            self.o.tags
        };
        for tag in tags {
            let reference = husk_image::reference::Reference::parse(tag)
                .map_err(|e| other(format!("-t {tag}: {e}")))?;
            let image: Image =
                husk_image::record(&self.store, &reference, &manifest_digest, &manifest_bytes)
                    .map_err(|e| other(e.to_string()))?;
            self.say(format!("naming to {}", image.name));
        }
        self.say(format!("writing image {id}"));
        Ok(id)
    }
}

/// A base image's history with an entry for each of its layers: one
/// that lists fewer layers than it has (made by a tool that writes none)
/// gets entries for the first ones, so that the image built on it lists
/// every layer, as builders on top of it (buildah's) check.
fn whole_history(
    mut history: Vec<oci_spec::image::History>,
    layers: usize,
) -> Vec<oci_spec::image::History> {
    let listed = history
        .iter()
        .filter(|h| !h.empty_layer().unwrap_or(false))
        .count();
    if listed < layers {
        let missing = (0..layers - listed).map(|_| {
            let mut h = oci_spec::image::History::default();
            h.set_created_by(Some("(a layer of the base image, without history)".into()));
            h
        });
        history.splice(0..0, missing);
    }
    history
}

/// An image config's docker fields that OCI's lacks: `Healthcheck` and
/// `OnBuild` (absent or malformed: none).
fn docker_extras(store: &Store, config: &str) -> (Option<serde_json::Value>, Vec<String>) {
    let Ok(bytes) = store.read_blob(config) else {
        return (None, Vec::new());
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return (None, Vec::new());
    };
    let c = &v["config"];
    let healthcheck = c.get("Healthcheck").filter(|h| h.is_object()).cloned();
    let onbuild = c["OnBuild"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (healthcheck, onbuild)
}

/// `HEALTHCHECK` as docker's config holds it: `Test` (`["CMD", ...]`,
/// `["CMD-SHELL", text]` or `["NONE"]`), durations in nanoseconds,
/// `Retries`; an unset option is left out (the runtime's default).
fn healthcheck(h: &crate::dockerfile::Health) -> Result<serde_json::Value, String> {
    let mut out = serde_json::Map::new();
    let test = match &h.command {
        None => serde_json::json!(["NONE"]),
        Some(Command::Exec(argv)) => {
            let mut t = vec!["CMD".to_string()];
            t.extend(argv.iter().cloned());
            serde_json::json!(t)
        }
        Some(Command::Shell(text)) => serde_json::json!(["CMD-SHELL", text]),
    };
    out.insert("Test".into(), test);
    for (flag, key, v) in [
        ("interval", "Interval", &h.interval),
        ("timeout", "Timeout", &h.timeout),
        ("start-period", "StartPeriod", &h.start_period),
        ("start-interval", "StartInterval", &h.start_interval),
    ] {
        if let Some(v) = v {
            let d = humantime::parse_duration(v)
                .map_err(|e| format!("HEALTHCHECK --{flag}={v}: not a duration ({e})"))?;
            out.insert(key.into(), serde_json::json!(d.as_nanos() as u64));
        }
    }
    if let Some(r) = &h.retries {
        let n: u32 = r
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("HEALTHCHECK --retries={r}: not a count above 0"))?;
        out.insert("Retries".into(), serde_json::json!(n));
    }
    Ok(serde_json::Value::Object(out))
}

fn unreachable_digest() -> oci_spec::image::Digest {
    "sha256:0000000000000000000000000000000000000000000000000000000000000000"
        .try_into()
        .expect("a well-formed digest")
}

/// Makes directory `rel` (and its parents) inside `root`, resolved as in
/// a chroot: a symlink in the image never leads outside it.
pub(crate) fn mkdir_in_root(
    root: &Path,
    rel: &str,
    owner: Option<(u32, u32)>,
) -> Result<OwnedFd, String> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", root.display()))?;
    let open = |path: &str| {
        rustix::fs::openat2(
            &root_fd,
            if path.is_empty() { "." } else { path },
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| format!("make /{path} in the image: {e}"))
    };
    let mut done = String::new();
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        // Each prefix is resolved from the image's root, as in a chroot.
        let parent = open(&done)?;
        // A directory made here is `owner`'s (COPY --chown's, as
        // BuildKit makes the destination's missing directories).
        if rustix::fs::mkdirat(&parent, part, Mode::from_raw_mode(0o755)).is_ok()
            && let Some((uid, gid)) = owner
        {
            rustix::fs::chownat(
                &parent,
                part,
                Some(rustix::fs::Uid::from_raw_unchecked(uid)),
                Some(rustix::fs::Gid::from_raw_unchecked(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| format!("chown /{done}/{part} in the image: {e}"))?;
        }
        if !done.is_empty() {
            done.push('/');
        }
        done.push_str(part);
    }
    open(&done)
}
