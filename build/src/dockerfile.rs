//! A Dockerfile read into stages of steps, as BuildKit's frontend reads
//! it: the syntax (line continuations, comments, parser directives, the
//! escape character, here-documents, flags, JSON and shell forms) is the
//! `parse-dockerfile` crate's; what each instruction means, which flags
//! it takes, and which values are the build's to expand is here.
//!
//! Values keep their `$VARIABLES`: they are expanded when the step runs,
//! with the ARGs and ENVs in scope then ([`crate::lex`]); an error names
//! the Dockerfile's line.

use std::collections::HashMap;

use parse_dockerfile::{Command as PCommand, Instruction as P};

/// An error in the Dockerfile, with the line (1-based) it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile:{line}: {message}")]
pub struct DockerfileError {
    /// The line the instruction starts on.
    pub line: usize,
    /// What is wrong, naming the instruction or flag.
    pub message: String,
}

/// A command of RUN, CMD, ENTRYPOINT or HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The exec form, a JSON array: run as it is.
    Exec(Vec<String>),
    /// The shell form: given to the stage's SHELL (`/bin/sh -c`), line
    /// continuations taken out.
    Shell(String),
}

/// A here-document of RUN, COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HereDoc {
    /// Its text, up to its delimiter.
    pub text: String,
    /// Whether `$VARIABLES` in it are expanded (its delimiter unquoted).
    pub expand: bool,
    /// Its delimiter (`EOF`): the file's name when COPY puts it into a
    /// directory, as BuildKit names it.
    pub name: String,
}

/// What COPY or ADD copies from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A path or glob in the context (or in `--from`'s stage or image).
    Path(String),
    /// A here-document: a file of that text.
    HereDoc(HereDoc),
}

/// COPY's and ADD's sources, destination and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// What is copied, in order.
    pub sources: Vec<Source>,
    /// Where to, raw (a trailing `/` makes it a directory).
    pub dest: String,
    /// `--from`: a stage's name or index, or an image.
    pub from: Option<String>,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=octal`.
    pub chmod: Option<String>,
    /// `--link`: taken, and copied as without it (the result is the same
    /// layer; BuildKit only rebases it more cheaply).
    pub link: bool,
}

/// HEALTHCHECK's test and timings (durations as written, `30s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// None for `HEALTHCHECK NONE`.
    pub command: Option<Command>,
    /// `--interval`.
    pub interval: Option<String>,
    /// `--timeout`.
    pub timeout: Option<String>,
    /// `--start-period`.
    pub start_period: Option<String>,
    /// `--start-interval`.
    pub start_interval: Option<String>,
    /// `--retries`.
    pub retries: Option<String>,
}

/// One instruction of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `RUN`: a command in a microVM on the stage's root.
    Run {
        /// What runs.
        command: Command,
        /// Its here-documents, fed to it as BuildKit feeds them.
        here_docs: Vec<HereDoc>,
        /// `--network`: `default` or `none`.
        network: Option<String>,
    },
    /// `COPY`.
    Copy(CopySpec),
    /// ADD: COPY that also unpacks a local tar archive.
    Add(CopySpec),
    /// `ENV`: `key=value` pairs, values raw (quotes and `$` kept).
    Env(Vec<(String, String)>),
    /// `LABEL`: as ENV's.
    Label(Vec<(String, String)>),
    /// `ARG`: names, each with its raw default.
    Arg(Vec<(String, Option<String>)>),
    /// `WORKDIR`, raw.
    Workdir(String),
    /// `USER user[:group]`, raw.
    User(String),
    /// `EXPOSE`: its raw words.
    Expose(String),
    /// `VOLUME`: the JSON form's paths, or the raw words of the string form.
    Volume {
        /// The JSON form's paths.
        json: Option<Vec<String>>,
        /// The string form, raw.
        raw: String,
    },
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `CMD`.
    Cmd(Command),
    /// `SHELL`: the JSON array.
    Shell(Vec<String>),
    /// `STOPSIGNAL`, raw.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Health),
    /// `ONBUILD`: the trigger's text, as the image keeps it.
    Onbuild(String),
    /// `MAINTAINER` (deprecated): the author.
    Maintainer(String),
}

/// A step: an instruction and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// 1-based line of its keyword.
    pub line: usize,
    /// Its text as written (the cache key's and the progress's).
    pub text: String,
    /// What it does.
    pub kind: Kind,
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: nothing.
    Scratch,
    /// An earlier stage, by index.
    Stage(usize),
    /// An image reference, raw (it may hold the global ARGs).
    Image(String),
}

/// A stage: FROM and its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// `AS name`, lower-cased as BuildKit compares them.
    pub name: Option<String>,
    /// The FROM line.
    pub line: usize,
    /// What it starts from.
    pub base: Base,
    /// `--platform`, raw.
    pub platform: Option<String>,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

/// A read Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\`, or `` ` `` by the parser directive).
    pub escape: char,
    /// ARGs before the first FROM: names and raw defaults.
    pub global_args: Vec<(String, Option<String>)>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The shell form's text with its line continuations (the escape
/// character at a line's end) taken out, and the comment and empty lines
/// inside them dropped, as BuildKit joins them.
fn joined(raw: &str, escape: char) -> String {
    let mut out = String::new();
    let mut lines = raw.split('\n').peekable();
    let mut continued = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if continued && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        let body = line.trim_end_matches([' ', '\t', '\r']);
        match body.strip_suffix(escape) {
            Some(rest) if lines.peek().is_some() => {
                out.push_str(rest);
                continued = true;
            }
            _ => {
                out.push_str(line.trim_end_matches('\r'));
                continued = false;
                if lines.peek().is_some() {
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn command(c: &PCommand<'_>, escape: char) -> Result<Command, String> {
    Ok(match c {
        PCommand::Exec(list) => {
            Command::Exec(list.value.iter().map(|s| s.value.to_string()).collect())
        }
        PCommand::Shell(s) => Command::Shell(joined(s.value, escape).trim().to_string()),
        _ => return Err("this form of command is not supported".into()),
    })
}

/// `key=value` pairs (ENV, LABEL), or the old `key value` form of one.
fn pairs(raw: &str, escape: char, what: &str) -> Result<Vec<(String, String)>, String> {
    let words = crate::lex::raw_words(raw, escape).map_err(|e| format!("{what}: {e}"))?;
    if words.is_empty() {
        return Err(format!("{what} needs at least one key=value"));
    }
    if !words[0].contains('=') {
        // `ENV key value with spaces`: one pair, the rest is the value.
        let rest = raw.trim_start()[words[0].len()..].trim();
        if rest.is_empty() {
            return Err(format!(
                "{what} {}: no value (key=value, or key value)",
                words[0]
            ));
        }
        return Ok(vec![(words[0].clone(), rest.to_string())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{what}: {w:?} is not key=value")),
        })
        .collect()
}

/// The flags an instruction takes; any other is refused by name.
fn flags(
    keyword: &str,
    given: &[parse_dockerfile::Flag<'_>],
    takes: &[&str],
) -> Result<HashMap<String, Option<String>>, String> {
    let mut out = HashMap::new();
    for f in given {
        let name = f.name.value.to_string();
        if !takes.contains(&name.as_str()) {
            return Err(format!(
                "{keyword} --{name} is not supported{}",
                match takes {
                    [] => String::new(),
                    t => format!(" (it takes --{})", t.join(", --")),
                }
            ));
        }
        if out
            .insert(name.clone(), f.value.as_ref().map(|v| v.value.to_string()))
            .is_some()
        {
            return Err(format!("{keyword} --{name} is given twice"));
        }
    }
    Ok(out)
}

fn value(
    flags: &HashMap<String, Option<String>>,
    name: &str,
    keyword: &str,
) -> Result<Option<String>, String> {
    match flags.get(name) {
        None => Ok(None),
        Some(Some(v)) => Ok(Some(v.clone())),
        Some(None) => Err(format!("{keyword} --{name} needs a value (--{name}=...)")),
    }
}

fn copy_spec(
    keyword: &str,
    options: &[parse_dockerfile::Flag<'_>],
    src: &[parse_dockerfile::Source<'_>],
    dest: &str,
    takes: &[&str],
) -> Result<CopySpec, String> {
    let f = flags(keyword, options, takes)?;
    let link = match value(&f, "link", keyword) {
        _ if !f.contains_key("link") => false,
        Ok(Some(v)) => v != "false",
        _ => true,
    };
    let sources = src
        .iter()
        .map(|s| match s {
            parse_dockerfile::Source::Path(p) => Source::Path(p.value.to_string()),
            parse_dockerfile::Source::HereDoc(h) => Source::HereDoc(HereDoc {
                name: String::new(),
                text: h.value.to_string(),
                expand: h.expand,
            }),
            _ => Source::Path(String::new()),
        })
        .collect();
    Ok(CopySpec {
        sources,
        dest: dest.to_string(),
        from: value(&f, "from", keyword)?,
        chown: value(&f, "chown", keyword)?,
        chmod: value(&f, "chmod", keyword)?,
        link,
    })
}

fn kind(i: &P<'_>, escape: char) -> Result<Kind, String> {
    Ok(match i {
        P::Run(r) => {
            let f = flags("RUN", &r.options[..], &["network"])?;
            let network = value(&f, "network", "RUN")?;
            if let Some(n) = &network
                && n != "default"
                && n != "none"
            {
                return Err(format!(
                    "RUN --network={n} is not supported (it takes default or none)"
                ));
            }
            Kind::Run {
                command: command(&r.arguments, escape)?,
                here_docs: r
                    .here_docs
                    .iter()
                    .map(|h| HereDoc {
                        name: String::new(),
                        text: h.value.to_string(),
                        expand: h.expand,
                    })
                    .collect(),
                network,
            }
        }
        P::Copy(c) => Kind::Copy(copy_spec(
            "COPY",
            &c.options[..],
            &c.src,
            &c.dest.value,
            &["from", "chown", "chmod", "link"],
        )?),
        P::Add(a) => {
            let spec = copy_spec(
                "ADD",
                &a.options[..],
                &a.src,
                &a.dest.value,
                &["chown", "chmod", "link"],
            )?;
            for s in &spec.sources {
                if let Source::Path(p) = s
                    && (p.contains("://") || p.starts_with("git@"))
                {
                    return Err(format!(
                        "ADD {p}: remote sources are not supported (a build reaches no network outside the host)"
                    ));
                }
            }
            Kind::Add(spec)
        }
        P::Env(e) => Kind::Env(pairs(&e.arguments.value, escape, "ENV")?),
        P::Label(l) => Kind::Label(pairs(&l.arguments.value, escape, "LABEL")?),
        P::Arg(a) => {
            let words = crate::lex::raw_words(&a.arguments.value, escape)
                .map_err(|e| format!("ARG: {e}"))?;
            let mut out = Vec::new();
            for w in words {
                let (name, default) = match w.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (w.clone(), None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("ARG {w}: {name:?} is not a variable name"));
                }
                out.push((name, default));
            }
            Kind::Arg(out)
        }
        P::Workdir(w) => Kind::Workdir(w.arguments.value.to_string()),
        P::User(u) => Kind::User(u.arguments.value.to_string()),
        P::Expose(e) => Kind::Expose(
            e.arguments
                .iter()
                .map(|a| a.value.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        P::Volume(v) => match &v.arguments {
            parse_dockerfile::JsonOrStringArray::Json(list) => Kind::Volume {
                json: Some(list.value.iter().map(|s| s.value.to_string()).collect()),
                raw: String::new(),
            },
            parse_dockerfile::JsonOrStringArray::String(list) => Kind::Volume {
                json: None,
                raw: list
                    .iter()
                    .map(|s| s.value.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            },
        },
        P::Entrypoint(e) => Kind::Entrypoint(command(&e.arguments, escape)?),
        P::Cmd(c) => Kind::Cmd(command(&c.arguments, escape)?),
        P::Shell(s) => Kind::Shell(s.arguments.iter().map(|a| a.value.to_string()).collect()),
        P::Stopsignal(s) => Kind::StopSignal(s.arguments.value.to_string()),
        P::Healthcheck(h) => {
            let f = flags(
                "HEALTHCHECK",
                &h.options[..],
                &[
                    "interval",
                    "timeout",
                    "start-period",
                    "start-interval",
                    "retries",
                ],
            )?;
            let get = |n: &str| value(&f, n, "HEALTHCHECK");
            Kind::Healthcheck(Health {
                command: match &h.arguments {
                    parse_dockerfile::HealthcheckArguments::Cmd { arguments, .. } => {
                        Some(command(arguments, escape)?)
                    }
                    _ => None,
                },
                interval: get("interval")?,
                timeout: get("timeout")?,
                start_period: get("start-period")?,
                start_interval: get("start-interval")?,
                retries: get("retries")?,
            })
        }
        P::Onbuild(_) => Kind::Onbuild(String::new()),
        P::Maintainer(m) => Kind::Maintainer(m.name.value.to_string()),
        P::From(_) => return Err("FROM is a stage's start, not a step".into()),
        _ => return Err("this instruction is not supported".into()),
    })
}

/// The text of the instruction starting at byte `start` and ending
/// before the next instruction's (`end`), trailing white space and
/// comment lines off.
fn text_between(text: &str, start: usize, end: usize) -> String {
    let mut lines: Vec<&str> = text.get(start..end).unwrap_or_default().lines().collect();
    while let Some(last) = lines.last() {
        let t = last.trim();
        if t.is_empty() || t.starts_with('#') {
            lines.pop();
        } else {
            break;
        }
    }
    lines.join("\n")
}

/// Reads `text`, a Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
    // A byte-order mark is skipped (the parser's spans start after it).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (inlined, mut bodies) = inline_here_docs(text)?;
    let text = inlined.as_str();
    let file = parse_dockerfile::parse(text).map_err(|e| DockerfileError {
        line: e.line(),
        message: e.to_string(),
    })?;
    let escape = file
        .parser_directives
        .escape
        .as_ref()
        .map_or('\\', |d| d.value.value);
    // Where each instruction starts, for its line and its text.
    let starts: Vec<usize> = file
        .instructions
        .iter()
        .map(|i| keyword_start(i))
        .chain(std::iter::once(text.len()))
        .collect();
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for (n, i) in file.instructions.iter().enumerate() {
        let line = line_of(text, starts[n]);
        let fail = |message: String| DockerfileError { line, message };
        match i {
            P::From(f) => {
                let fl = flags("FROM", &f.options[..], &["platform"]).map_err(fail)?;
                let platform = value(&fl, "platform", "FROM").map_err(fail)?;
                let name = match &f.as_ {
                    Some((_, n)) => {
                        let name = n.value.to_lowercase();
                        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                            && name
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                        if !valid {
                            return Err(fail(format!(
                                "FROM ... AS {}: a stage's name starts with a letter and holds letters, digits, -, _ and .",
                                n.value
                            )));
                        }
                        if stages.iter().any(|s| s.name.as_deref() == Some(&name)) {
                            return Err(fail(format!(
                                "FROM ... AS {}: the stage's name is used twice",
                                n.value
                            )));
                        }
                        Some(name)
                    }
                    None => None,
                };
                let image = f.image.value.to_string();
                let base = if image.eq_ignore_ascii_case("scratch") {
                    Base::Scratch
                } else if let Some(k) = stages
                    .iter()
                    .position(|s| s.name.as_deref() == Some(&image.to_lowercase()))
                {
                    Base::Stage(k)
                } else {
                    Base::Image(image)
                };
                stages.push(Stage {
                    name,
                    line,
                    base,
                    platform,
                    steps: Vec::new(),
                });
            }
            P::Arg(_) if stages.is_empty() => match kind(i, escape).map_err(fail)? {
                Kind::Arg(args) => global_args.extend(args),
                _ => unreachable!("an ARG reads as an ARG"),
            },
            _ if stages.is_empty() => {
                return Err(fail(
                    "the first instruction must be FROM (ARG may come before it)".into(),
                ));
            }
            P::Onbuild(o) => {
                let trigger = text_between(text, keyword_start(&o.instruction), starts[n + 1]);
                let inner = o.instruction.as_ref();
                if matches!(inner, P::From(_) | P::Maintainer(_) | P::Onbuild(_)) {
                    return Err(fail(format!("ONBUILD {trigger}: not allowed as a trigger")));
                }
                let step = Step {
                    line,
                    text: text_between(text, starts[n], starts[n + 1]),
                    kind: Kind::Onbuild(trigger),
                };
                stages.last_mut().expect("a stage").steps.push(step);
            }
            _ => {
                let mut kind = kind(i, escape).map_err(fail)?;
                let mut step_text = text_between(text, starts[n], starts[n + 1]);
                // A RUN whose here-documents follow a command: the shell
                // reads them, with the command (BuildKit's way).
                if let (
                    Some(body),
                    Kind::Run {
                        command: Command::Shell(c),
                        ..
                    },
                ) = (bodies.remove(&line), &mut kind)
                {
                    c.push('\n');
                    c.push_str(&body);
                    step_text.push('\n');
                    step_text.push_str(&body);
                }
                // COPY's and ADD's here-documents are named by their
                // delimiters, in order, as the instruction's line has them.
                if let Kind::Copy(spec) | Kind::Add(spec) = &mut kind {
                    let first = step_text.lines().next().unwrap_or_default();
                    let mut names = here_doc_delimiters(first).into_iter();
                    for source in &mut spec.sources {
                        if let Source::HereDoc(h) = source {
                            h.name = names.next().map(|(n, _)| n).unwrap_or_default();
                        }
                    }
                }
                let step = Step {
                    line,
                    text: step_text,
                    kind,
                };
                stages.last_mut().expect("a stage").steps.push(step);
            }
        }
    }
    if stages.is_empty() {
        return Err(DockerfileError {
            line: line_of(text, text.len()),
            message: "no FROM: a Dockerfile needs at least one stage".into(),
        });
    }
    Ok(Dockerfile {
        escape,
        global_args,
        stages,
    })
}

/// Here-documents that follow a command in a shell-form `RUN` (`RUN cat
/// <<EOF > /file`), which the parser reads only at the start of the
/// command: each is found on the RUN's last line (outside quotes, its
/// delimiter a word starting with a letter or `_`, quoted or not, `<<-`
/// matching an end line with leading tabs), and its body and end line
/// are taken out of the text, each line left as an empty comment so
/// that every line keeps its number. Returns that text and, for each
/// such RUN's first line, the lines taken out, which the shell reads
/// after the command as it would in a script.
fn inline_here_docs(text: &str) -> Result<(String, HashMap<usize, String>), DockerfileError> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = String::with_capacity(text.len());
    let mut bodies = HashMap::new();
    let mut run_line: Option<usize> = None;
    let mut continued = false;
    let mut k = 0;
    while k < lines.len() {
        let line = lines[k];
        out.push_str(line);
        k += 1;
        let body = line.trim_end_matches(['\n', '\r', ' ', '\t']);
        let trimmed = body.trim_start();
        if !continued {
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let word = trimmed.split_whitespace().next().unwrap_or("");
            run_line = word.eq_ignore_ascii_case("RUN").then_some(k);
        } else if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        continued = body.ends_with('\\') || body.ends_with('`');
        let Some(first) = run_line else { continue };
        if continued {
            continue;
        }
        run_line = None;
        // The command as written after RUN and its flags, on this line.
        let mut command = trimmed;
        if k == first {
            command = command[3..].trim_start();
            while command.starts_with("--") {
                command = command
                    .split_once(char::is_whitespace)
                    .map_or("", |(_, r)| r)
                    .trim_start();
            }
        }
        if command.starts_with("<<") || command.starts_with('[') {
            continue;
        }
        let delimiters = here_doc_delimiters(command);
        if delimiters.is_empty() {
            continue;
        }
        let mut taken = String::new();
        for (delimiter, tabs) in delimiters {
            loop {
                let Some(l) = lines.get(k) else {
                    return Err(DockerfileError {
                        line: first,
                        message: format!("RUN: the here-document <<{delimiter} has no end line"),
                    });
                };
                k += 1;
                taken.push_str(l);
                out.push_str(if l.ends_with('\n') { "#\n" } else { "#" });
                let end = l.trim_end_matches(['\n', '\r']);
                let end = if tabs {
                    end.trim_start_matches('\t')
                } else {
                    end
                };
                if end == delimiter {
                    break;
                }
            }
        }
        bodies.insert(first, taken.trim_end_matches('\n').to_string());
    }
    Ok((out, bodies))
}

/// The here-documents' delimiters in a shell command line, in order,
/// each with whether it strips leading tabs (`<<-`).
fn here_doc_delimiters(command: &str) -> Vec<(String, bool)> {
    let b = command.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut quote) = (0, None);
    while i < b.len() {
        match (quote, b[i]) {
            (None, b'\\') => i += 1,
            (None, q @ (b'\'' | b'"')) => quote = Some(q),
            (Some(q), c) if c == q => quote = None,
            (Some(b'"'), b'\\') => i += 1,
            (None, b'<')
                if b.get(i + 1) == Some(&b'<')
                    && b.get(i + 2) != Some(&b'<')
                    && (i == 0 || b[i - 1] != b'<') =>
            {
                let mut j = i + 2;
                let tabs = b.get(j) == Some(&b'-');
                if tabs {
                    j += 1;
                }
                let q = match b.get(j) {
                    Some(&c @ (b'\'' | b'"')) => {
                        j += 1;
                        Some(c)
                    }
                    _ => None,
                };
                let start = j;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let word = &command[start..j];
                let closed = match q {
                    Some(c) => b.get(j) == Some(&c),
                    None => true,
                };
                if closed && word.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                    out.push((word.to_string(), tabs));
                    i = j;
                } else {
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The byte where an instruction's keyword starts.
fn keyword_start(i: &P<'_>) -> usize {
    match i {
        P::Add(x) => x.add.span.start,
        P::Arg(x) => x.arg.span.start,
        P::Cmd(x) => x.cmd.span.start,
        P::Copy(x) => x.copy.span.start,
        P::Entrypoint(x) => x.entrypoint.span.start,
        P::Env(x) => x.env.span.start,
        P::Expose(x) => x.expose.span.start,
        P::From(x) => x.from.span.start,
        P::Healthcheck(x) => x.healthcheck.span.start,
        P::Label(x) => x.label.span.start,
        P::Maintainer(x) => x.maintainer.span.start,
        P::Onbuild(x) => x.onbuild.span.start,
        P::Run(x) => x.run.span.start,
        P::Shell(x) => x.shell.span.start,
        P::Stopsignal(x) => x.stopsignal.span.start,
        P::User(x) => x.user.span.start,
        P::Volume(x) => x.volume.span.start,
        P::Workdir(x) => x.workdir.span.start,
        _ => 0,
    }
}

impl Dockerfile {
    /// The stage `--target` names (by name or index), or the last; and
    /// every stage it needs, in build order (FROM a stage, COPY --from a
    /// stage).
    pub fn stages_for(&self, target: Option<&str>) -> Result<(usize, Vec<usize>), String> {
        let target = match target {
            None => self.stages.len() - 1,
            Some(t) => self.stage_index(t).ok_or_else(|| {
                format!(
                    "--target {t}: no such stage (the stages: {})",
                    self.stages
                        .iter()
                        .enumerate()
                        .map(|(k, s)| s.name.clone().unwrap_or_else(|| k.to_string()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
        };
        let mut needed = vec![false; self.stages.len()];
        let mut todo = vec![target];
        while let Some(k) = todo.pop() {
            if std::mem::replace(&mut needed[k], true) {
                continue;
            }
            let s = &self.stages[k];
            if let Base::Stage(b) = s.base {
                todo.push(b);
            }
            for step in &s.steps {
                if let Kind::Copy(CopySpec { from: Some(f), .. }) = &step.kind
                    && let Some(b) = self.stage_index(f)
                    && b < k
                {
                    todo.push(b);
                }
            }
        }
        Ok((
            target,
            (0..self.stages.len()).filter(|&k| needed[k]).collect(),
        ))
    }

    /// A stage by its name (any case) or its index.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        let lower = name.to_lowercase();
        self.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(&lower))
            .or_else(|| {
                name.parse::<usize>()
                    .ok()
                    .filter(|&k| k < self.stages.len())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Kind {
        parse(&format!("FROM scratch\n{text}\n")).unwrap().stages[0].steps[0]
            .kind
            .clone()
    }

    fn refused(text: &str) -> DockerfileError {
        parse(text).unwrap_err()
    }

    /// A here-document after a command goes to the shell with it; the
    /// lines after keep their numbers; quotes, here-strings and `<<`
    /// inside quotes are not here-documents.
    #[test]
    fn here_documents_after_a_command() {
        let f = parse(
            "FROM scratch\nRUN --network=none cat <<EOF >/a && cat <<-\"END\" >/b\n$X\nEOF\n\tb\n\tEND\nRUN true\n",
        )
        .unwrap();
        let steps = &f.stages[0].steps;
        assert_eq!(steps.len(), 2);
        match &steps[0].kind {
            Kind::Run { command, .. } => assert_eq!(
                command,
                &Command::Shell("cat <<EOF >/a && cat <<-\"END\" >/b\n$X\nEOF\n\tb\n\tEND".into())
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(steps[1].line, 7);
        assert_eq!(
            here_doc_delimiters("echo '<<A' \"<<B\" x<<<y $((1<<2)) <<'C' <<D"),
            vec![("C".to_string(), false), ("D".to_string(), false)]
        );
        let e = refused("FROM scratch\nRUN cat <<EOF\nno end\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("<<EOF has no end line"), "{}", e.message);
    }

    #[test]
    fn stages_steps_lines_and_texts() {
        let f = parse(
            "# syntax=docker/dockerfile:1\nARG BASE=busybox\n\nFROM $BASE AS Build\n\
             RUN echo a \\\n  # a comment\n  && echo b\nFROM build\nCOPY --from=build /a /b\n",
        )
        .unwrap();
        assert_eq!(
            f.global_args,
            [("BASE".to_string(), Some("busybox".to_string()))]
        );
        assert_eq!(f.stages.len(), 2);
        assert_eq!(f.stages[0].name.as_deref(), Some("build"));
        assert_eq!(f.stages[0].base, Base::Image("$BASE".into()));
        assert_eq!(f.stages[0].line, 4);
        assert_eq!(f.stages[1].base, Base::Stage(0));
        let run = &f.stages[0].steps[0];
        assert_eq!(run.line, 5);
        assert_eq!(
            run.kind,
            Kind::Run {
                command: Command::Shell("echo a   && echo b".into()),
                here_docs: vec![],
                network: None
            }
        );
        assert!(run.text.starts_with("RUN echo a \\\n"), "{:?}", run.text);
        assert_eq!(f.stages_for(None).unwrap(), (1, vec![0, 1]));
        assert_eq!(f.stages_for(Some("BUILD")).unwrap(), (0, vec![0]));
        assert!(
            f.stages_for(Some("nope"))
                .unwrap_err()
                .contains("no such stage")
        );
    }

    #[test]
    fn instructions_read_as_buildkit_reads_them() {
        assert_eq!(
            one(r#"CMD ["sh", "-c", "echo hi"]"#),
            Kind::Cmd(Command::Exec(vec![
                "sh".into(),
                "-c".into(),
                "echo hi".into()
            ]))
        );
        assert_eq!(
            one("ENTRYPOINT top -b"),
            Kind::Entrypoint(Command::Shell("top -b".into()))
        );
        assert_eq!(
            one(r#"ENV A=1 B="two words" C=$A"#),
            Kind::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"two words\"".into()),
                ("C".into(), "$A".into())
            ])
        );
        assert_eq!(
            one("ENV OLD some value"),
            Kind::Env(vec![("OLD".into(), "some value".into())])
        );
        assert_eq!(
            one("ARG V=1 W"),
            Kind::Arg(vec![("V".into(), Some("1".into())), ("W".into(), None)])
        );
        assert_eq!(
            one("COPY --chown=1:2 --chmod=640 a b* /dst/"),
            Kind::Copy(CopySpec {
                sources: vec![Source::Path("a".into()), Source::Path("b*".into())],
                dest: "/dst/".into(),
                from: None,
                chown: Some("1:2".into()),
                chmod: Some("640".into()),
                link: false,
            })
        );
        assert_eq!(
            one(r#"VOLUME ["/a", "/b"]"#),
            Kind::Volume {
                json: Some(vec!["/a".into(), "/b".into()]),
                raw: String::new()
            }
        );
        assert_eq!(
            one("ONBUILD RUN echo x"),
            Kind::Onbuild("RUN echo x".into())
        );
        match one("HEALTHCHECK --interval=5s --retries=3 CMD true") {
            Kind::Healthcheck(h) => {
                assert_eq!(h.command, Some(Command::Shell("true".into())));
                assert_eq!(h.interval.as_deref(), Some("5s"));
                assert_eq!(h.retries.as_deref(), Some("3"));
            }
            other => panic!("{other:?}"),
        }
        match one("RUN <<EOF\necho one\necho two\nEOF") {
            Kind::Run { here_docs, .. } => {
                assert_eq!(here_docs.len(), 1);
                assert_eq!(here_docs[0].text, "echo one\necho two\n");
                assert!(here_docs[0].expand);
            }
            other => panic!("{other:?}"),
        }
        // The escape directive.
        let f = parse("# escape=`\nFROM scratch\nRUN echo a `\n  b\n").unwrap();
        assert_eq!(f.escape, '`');
        assert_eq!(
            f.stages[0].steps[0].kind,
            Kind::Run {
                command: Command::Shell("echo a   b".into()),
                here_docs: vec![],
                network: None
            }
        );
    }

    #[test]
    fn what_is_not_supported_is_refused_naming_its_line() {
        let e = refused("FROM scratch\n\nRUN --mount=type=cache,target=/x true\n");
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "Dockerfile:3: RUN --mount is not supported (it takes --network)"
        );
        assert_eq!(
            refused("FROM scratch\nRUN --network=host true").to_string(),
            "Dockerfile:2: RUN --network=host is not supported (it takes default or none)"
        );
        assert_eq!(
            refused("FROM scratch\nADD https://example.com/x /x").to_string(),
            "Dockerfile:2: ADD https://example.com/x: remote sources are not supported (a build reaches no network outside the host)"
        );
        assert_eq!(
            refused("FROM scratch\nCOPY --parents a /b").to_string(),
            "Dockerfile:2: COPY --parents is not supported (it takes --from, --chown, --chmod, --link)"
        );
        assert_eq!(
            refused("RUN true\n").to_string(),
            "Dockerfile:1: expected FROM at line 1 column 1"
        );
        assert_eq!(
            refused("# nothing\n").message,
            "expected at least one FROM instruction"
        );
        assert_eq!(
            refused("FROM scratch AS a\nFROM scratch AS A\n").to_string(),
            "Dockerfile:2: FROM ... AS A: the stage's name is used twice"
        );
        assert_eq!(
            refused("FROM scratch\nONBUILD FROM x\n").to_string(),
            "Dockerfile:2: ONBUILD FROM x: not allowed as a trigger"
        );
        assert_eq!(refused("FROM scratch\nFROBNICATE x\n").line, 2);
        assert_eq!(
            refused("FROM scratch\nARG 1x-y\n").to_string(),
            "Dockerfile:2: ARG 1x-y: \"1x-y\" is not a variable name"
        );
        // A byte-order mark is skipped; a multi-byte character anywhere
        // is only text.
        let f = parse("\u{feff}FROM scratch\nENV B=${A:\u{4dc}}\nRUN true\n").unwrap();
        assert_eq!(f.stages[0].steps[1].text, "RUN true");
        assert_eq!(
            refused("FROM scratch\nENV A=\"open\n").to_string(),
            "Dockerfile:2: ENV: unterminated double quote"
        );
    }
}
