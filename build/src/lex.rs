//! Words of a Dockerfile instruction as BuildKit's frontend reads them:
//! quotes taken off, the escape character applied, and `$NAME`,
//! `${NAME}` and their `:-`, `-`, `:+`, `+`, `:?` and `?` forms replaced
//! from the build's variables (the ARGs and ENVs in scope).
//!
//! The rules are BuildKit's shell lexer's: outside quotes the escape
//! character takes the next character literally; single quotes take
//! everything literally; inside double quotes only `"`, `$` and the
//! escape character can be escaped, and `$` still expands. A `$` that
//! starts no name is a `$`. An unset variable is empty.

use std::collections::HashMap;

/// A word that could not be read, or a variable a `?` form requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    /// A quote (`single` or `double`) that does not close.
    #[error("unterminated {0} quote")]
    Unterminated(&'static str),
    /// A `${` without its `}`.
    #[error("unterminated ${{...}} in {0:?}")]
    UnterminatedBrace(String),
    /// A `${NAME<op>...}` form BuildKit has and husk does not.
    #[error("${{{name}{op}...}}: the form {op:?} is not supported (use :-, -, :+, +, :? or ?)")]
    Unsupported {
        /// The variable.
        name: String,
        /// The form.
        op: String,
    },
    /// `${NAME:?message}` of a variable not set.
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// Its message, or `is not set`.
        message: String,
    },
    /// `${}`.
    #[error("${{}}: a variable needs a name")]
    NoName,
    /// `${A:-${B:-${...}}}` nested past [`MAX_NESTING`].
    #[error("variables nested more than {MAX_NESTING} deep")]
    TooDeep,
}

/// How deep `${A:-${B:-...}}` may nest (each level is read again).
pub const MAX_NESTING: usize = 32;

/// The build's variables in scope, by name.
pub type Vars = HashMap<String, String>;

struct Lexer<'a> {
    chars: Vec<char>,
    at: usize,
    escape: char,
    vars: &'a Vars,
}

/// `word` with its quotes taken off and its variables replaced.
pub fn word(word: &str, escape: char, vars: &Vars) -> Result<String, LexError> {
    let mut l = Lexer::new(word, escape, vars);
    let words = l.words(false)?;
    Ok(words.concat())
}

/// `text` split into words at unquoted white space, each as [`word`]
/// makes it (EXPOSE, VOLUME's string form, the names of ARG).
pub fn words(text: &str, escape: char, vars: &Vars) -> Result<Vec<String>, LexError> {
    Lexer::new(text, escape, vars).words(true)
}

/// `text` split at unquoted white space into raw words, quotes and
/// escapes kept (ENV's and LABEL's `key=value` pairs, whose halves are
/// then read with [`word`]).
pub fn raw_words(text: &str, escape: char) -> Result<Vec<String>, LexError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut started = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c if c == escape => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                started = true;
            }
            '\'' | '"' => {
                let quote = c;
                cur.push(c);
                started = true;
                let mut closed = false;
                while let Some(n) = chars.next() {
                    cur.push(n);
                    if n == escape && quote == '"' {
                        if let Some(m) = chars.next() {
                            cur.push(m);
                        }
                        continue;
                    }
                    if n == quote {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err(LexError::Unterminated(if quote == '"' {
                        "double"
                    } else {
                        "single"
                    }));
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    Ok(out)
}

impl<'a> Lexer<'a> {
    fn new(text: &str, escape: char, vars: &'a Vars) -> Self {
        Self {
            chars: text.chars().collect(),
            at: 0,
            escape,
            vars,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.at += c.is_some() as usize;
        c
    }

    /// The words up to the end; with `split`, unquoted white space ends a
    /// word, else it is kept.
    fn words(&mut self, split: bool) -> Result<Vec<String>, LexError> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut started = false;
        while let Some(c) = self.next() {
            match c {
                c if split && c.is_whitespace() => {
                    if started {
                        out.push(std::mem::take(&mut cur));
                        started = false;
                    }
                }
                c if c == self.escape => {
                    // The next character, literally; one at the end is
                    // dropped.
                    if let Some(n) = self.next() {
                        cur.push(n);
                    }
                    started = true;
                }
                '\'' => {
                    started = true;
                    loop {
                        match self.next() {
                            Some('\'') => break,
                            Some(n) => cur.push(n),
                            None => return Err(LexError::Unterminated("single")),
                        }
                    }
                }
                '"' => {
                    started = true;
                    loop {
                        match self.next() {
                            Some('"') => break,
                            Some('$') => cur.push_str(&self.dollar()?),
                            Some(n) if n == self.escape => match self.peek() {
                                Some(m) if m == '"' || m == '$' || m == self.escape => {
                                    self.at += 1;
                                    cur.push(m);
                                }
                                None => {}
                                Some(_) => cur.push(n),
                            },
                            Some(n) => cur.push(n),
                            None => return Err(LexError::Unterminated("double")),
                        }
                    }
                }
                '$' => {
                    started = true;
                    cur.push_str(&self.dollar()?);
                }
                c => {
                    started = true;
                    cur.push(c);
                }
            }
        }
        if started || !split {
            out.push(cur);
        }
        Ok(out)
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.at += 1;
            } else {
                break;
            }
        }
        name
    }

    /// What a `$` (just read) stands for.
    fn dollar(&mut self) -> Result<String, LexError> {
        match self.peek() {
            Some('{') => {
                self.at += 1;
                self.braced()
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let name = self.name();
                Ok(self.vars.get(&name).cloned().unwrap_or_default())
            }
            _ => Ok("$".into()),
        }
    }

    /// `${...}` after its `{`.
    fn braced(&mut self) -> Result<String, LexError> {
        let start = self.at;
        let name = self.name();
        if name.is_empty() {
            return Err(LexError::NoName);
        }
        let value = self.vars.get(&name);
        match self.peek() {
            Some('}') => {
                self.at += 1;
                return Ok(value.cloned().unwrap_or_default());
            }
            None => {
                return Err(LexError::UnterminatedBrace(
                    self.chars[start..].iter().collect(),
                ));
            }
            Some(_) => {}
        }
        let mut op = String::new();
        if self.peek() == Some(':') {
            op.push(':');
            self.at += 1;
        }
        match self.next() {
            Some(c @ ('-' | '+' | '?')) => op.push(c),
            Some(c) => {
                op.push(c);
                return Err(LexError::Unsupported { name, op });
            }
            None => {
                return Err(LexError::UnterminatedBrace(
                    self.chars[start..].iter().collect(),
                ));
            }
        }
        // The word up to the matching `}`, itself expanded.
        let mut depth = 0;
        let word_start = self.at;
        loop {
            match self.next() {
                Some('{') => depth += 1,
                Some('}') if depth == 0 => break,
                Some('}') => depth -= 1,
                Some(c) if c == self.escape => {
                    self.at += 1;
                }
                Some(_) => {}
                None => {
                    return Err(LexError::UnterminatedBrace(
                        self.chars[start..].iter().collect(),
                    ));
                }
            }
        }
        let raw: String = self.chars[word_start..self.at - 1].iter().collect();
        if raw.matches("${").count() > MAX_NESTING {
            return Err(LexError::TooDeep);
        }
        let colon = op.starts_with(':');
        // With a colon an empty value counts as unset.
        let set = match value {
            Some(v) => !(colon && v.is_empty()),
            None => false,
        };
        let expand = |raw: &str| word(raw, self.escape, self.vars);
        match op.trim_start_matches(':') {
            "-" if set => Ok(value.cloned().unwrap_or_default()),
            "-" => expand(&raw),
            "+" if set => expand(&raw),
            "+" => Ok(String::new()),
            "?" if set => Ok(value.cloned().unwrap_or_default()),
            _ => Err(LexError::Required {
                name,
                message: match expand(&raw)? {
                    m if m.is_empty() => "is not set".into(),
                    m => m,
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        [("A", "x"), ("EMPTY", ""), ("P", "/usr/bin")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn w(s: &str) -> String {
        word(s, '\\', &vars()).unwrap()
    }

    #[test]
    fn variables_expand_as_buildkit_expands_them() {
        assert_eq!(w("$A"), "x");
        assert_eq!(w("${A}y"), "xy");
        assert_eq!(w("$Ay"), "");
        assert_eq!(w("a$"), "a$");
        assert_eq!(w("$-"), "$-");
        assert_eq!(w("${NONE:-d}"), "d");
        assert_eq!(w("${EMPTY:-d}"), "d");
        assert_eq!(w("${EMPTY-d}"), "");
        assert_eq!(w("${NONE-d}"), "d");
        assert_eq!(w("${A:+set}"), "set");
        assert_eq!(w("${EMPTY:+set}"), "");
        assert_eq!(w("${EMPTY+set}"), "set");
        assert_eq!(w("${NONE:-$P/x}"), "/usr/bin/x");
        assert_eq!(w("${A:?must}"), "x");
        assert_eq!(
            word("${NONE:?must be given}", '\\', &vars()).unwrap_err(),
            LexError::Required {
                name: "NONE".into(),
                message: "must be given".into()
            }
        );
        assert_eq!(
            word("${A/x/y}", '\\', &vars()).unwrap_err().to_string(),
            "${A/...}: the form \"/\" is not supported (use :-, -, :+, +, :? or ?)"
        );
        assert!(matches!(
            word("${A:-x", '\\', &vars()),
            Err(LexError::UnterminatedBrace(_))
        ));
        assert_eq!(word("${}", '\\', &vars()), Err(LexError::NoName));
        let deep = format!("{}x{}", "${A:-".repeat(40), "}".repeat(40));
        assert_eq!(word(&deep, '\\', &vars()), Err(LexError::TooDeep));
        let fine = format!("{}x{}", "${NONE:-".repeat(10), "}".repeat(10));
        assert_eq!(w(&fine), "x");
    }

    #[test]
    fn quotes_and_escapes_are_buildkits() {
        assert_eq!(w(r#""$A b""#), "x b");
        assert_eq!(w("'$A b'"), "$A b");
        assert_eq!(w(r"\$A"), "$A");
        assert_eq!(w(r#""\$A \" \\ \n""#), r#"$A " \ \n"#);
        assert_eq!(w(r"a\ b"), "a b");
        assert_eq!(w("a\\"), "a");
        assert_eq!(word("`$A", '`', &vars()).unwrap(), "$A");
        assert_eq!(word(r"C:\dir", '`', &vars()).unwrap(), r"C:\dir");
        assert_eq!(
            word("'open", '\\', &vars()),
            Err(LexError::Unterminated("single"))
        );
        assert_eq!(
            word("\"open", '\\', &vars()),
            Err(LexError::Unterminated("double"))
        );
    }

    #[test]
    fn words_split_at_unquoted_white_space() {
        assert_eq!(
            words(r#"80/tcp "$A y" 'z w'  ${A}1"#, '\\', &vars()).unwrap(),
            ["80/tcp", "x y", "z w", "x1"]
        );
        assert_eq!(words("  ", '\\', &vars()).unwrap(), Vec::<String>::new());
        assert_eq!(
            raw_words(r#"a=1 b="two words" c='$A' d=e\ f"#, '\\').unwrap(),
            ["a=1", "b=\"two words\"", "c='$A'", r"d=e\ f"]
        );
        assert_eq!(
            raw_words("a=\"open", '\\'),
            Err(LexError::Unterminated("double"))
        );
    }
}
