//! `.dockerignore`, as docker's builder reads it: one pattern a line,
//! `#` comments and blank lines skipped, a leading `!` an exception, each
//! pattern cleaned (`./a/../b` is `b`, a leading `/` dropped) and matched
//! against a path relative to the context with Go's `filepath.Match`
//! rules (`*` and `?` stay within one path element, `[...]` classes, `\`
//! escapes) plus `**`, any number of elements. The last pattern that
//! matches a path, or one of its parent directories, decides: excluded,
//! unless that pattern is an exception.

/// One pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Path elements of the cleaned pattern.
    parts: Vec<String>,
    exception: bool,
}

/// The patterns of a `.dockerignore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

/// `path` cleaned as Go's `filepath.Clean` does, relative: `.` and empty
/// elements dropped, `..` taking off the element before it (none above
/// the root).
fn clean(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p.to_string()),
        }
    }
    out
}

impl Ignore {
    /// Reads a `.dockerignore`'s text. A malformed class (`[` without
    /// `]`) is an error naming the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, body) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let parts = clean(body);
            for p in &parts {
                if !well_formed(p) {
                    return Err(format!(
                        ".dockerignore:{}: {line:?} is not a valid pattern",
                        n + 1
                    ));
                }
            }
            if parts.is_empty() {
                continue;
            }
            patterns.push(Pattern { parts, exception });
        }
        Ok(Self { patterns })
    }

    /// Whether `path` (relative to the context, `/`-separated) is left
    /// out of the context.
    pub fn excludes(&self, path: &str) -> bool {
        let elements = clean(path);
        let mut excluded = false;
        for p in &self.patterns {
            // The path itself or a directory above it.
            let hit = (1..=elements.len()).any(|k| matches_parts(&p.parts, &elements[..k]));
            if hit {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// Whether any exception could bring back something below the
    /// directory `dir` (an excluded directory must then still be walked).
    pub fn may_include_below(&self, dir: &str) -> bool {
        let elements = clean(dir);
        self.patterns.iter().any(|p| {
            p.exception
                && (p.parts.iter().any(|x| x == "**")
                    || (p.parts.len() > elements.len()
                        && matches_parts(&p.parts[..elements.len()], &elements)))
        })
    }
}

/// Whether a pattern element's classes are closed and its escapes end.
fn well_formed(p: &str) -> bool {
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return false;
                }
                i += 2;
            }
            '[' => match chars[i + 1..].iter().position(|&c| c == ']') {
                Some(end) => i += end + 2,
                None => return false,
            },
            _ => i += 1,
        }
    }
    true
}

/// Whether the pattern's elements match the path's, `**` standing for any
/// number of elements (none included): a table over (pattern, path)
/// positions, so many `**` cost no more than one.
fn matches_parts(pattern: &[String], path: &[String]) -> bool {
    let (p, n) = (pattern.len(), path.len());
    // ok[i][j]: pattern[i..] matches path[j..].
    let mut ok = vec![vec![false; n + 1]; p + 1];
    ok[p][n] = true;
    for i in (0..p).rev() {
        for j in (0..=n).rev() {
            ok[i][j] = if pattern[i] == "**" {
                ok[i + 1][j] || (j < n && ok[i][j + 1])
            } else {
                j < n && element_matches(&pattern[i], &path[j]) && ok[i + 1][j + 1]
            };
        }
    }
    ok[0][0]
}

/// How many pattern characters one token at the start of `p` takes if it
/// matches `c` (`?`, a `[...]` class, `\x`, a literal).
fn token(p: &[char], c: char) -> Option<usize> {
    match p.first()? {
        '?' => Some(1),
        '[' => {
            let end = p[1..].iter().position(|&x| x == ']')? + 1;
            let mut class = &p[1..end];
            let negate = matches!(class.first(), Some('^') | Some('!'));
            if negate {
                class = &class[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            (hit != negate).then_some(end + 1)
        }
        '\\' if p.len() > 1 => (p[1] == c).then_some(2),
        &x => (x == c).then_some(1),
    }
}

/// Go's `filepath.Match` on one element (no separator in either), in time
/// linear in their lengths times the stars: a star is only ever retried
/// from the last one seen.
pub fn element_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // After the last star: where the pattern goes on, and how much of the
    // name the star has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            if p[pi] == '*' {
                star = Some((pi + 1, ni));
                pi += 1;
                continue;
            }
            if let Some(len) = token(&p[pi..], n[ni]) {
                pi += len;
                ni += 1;
                continue;
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_dockers_do() {
        let i = Ignore::parse(
            "# comment\n\n*.log\n/build\n!build/keep.txt\ndocs/**/*.md\n!docs/README.md\n./tmp/../cache\nsub/?.txt\n[ab].c\n",
        )
        .unwrap();
        for (path, out) in [
            ("x.log", true),
            ("dir/x.log", false),
            ("build", true),
            ("build/a/b", true),
            ("build/keep.txt", false),
            ("docs/a.md", true),
            ("docs/x/y/z.md", true),
            ("docs/README.md", false),
            ("docs/a.txt", false),
            ("cache/file", true),
            ("tmp", false),
            ("sub/a.txt", true),
            ("sub/ab.txt", false),
            ("a.c", true),
            ("c.c", false),
            ("Dockerfile", false),
        ] {
            assert_eq!(i.excludes(path), out, "{path}");
        }
        assert!(i.may_include_below("build"));
        assert!(i.may_include_below("docs"));
        assert!(!Ignore::parse("build\n").unwrap().may_include_below("build"));
    }

    #[test]
    fn a_broken_pattern_is_named_with_its_line() {
        assert_eq!(
            Ignore::parse("ok\n[abc\n").unwrap_err(),
            ".dockerignore:2: \"[abc\" is not a valid pattern"
        );
        assert!(element_matches(r"a\*", "a*"));
        assert!(!element_matches(r"a\*", "ab"));
        assert!(element_matches("[!a]x", "bx"));
        assert!(!element_matches("[!a]x", "ax"));
        assert!(element_matches("[a-c]", "b"));
        // Many stars and many `**` match in polynomial time (a fuzzer's
        // input of 30 stars ran for minutes before).
        let stars = format!("{}x", "*".repeat(40));
        assert!(!element_matches(&stars, &"a".repeat(60)));
        assert!(element_matches(&stars, &format!("{}x", "a".repeat(60))));
        let many = Ignore::parse(&format!("{}nope\n", "**/".repeat(40))).unwrap();
        assert!(!many.excludes(&"d/".repeat(30)));
    }
}
