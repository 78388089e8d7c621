//! Reading a configuration file's text: syntax errors with their position, each key checked on
//! its own, positions of keys for the value checks, and the raw-line scanner that finds the key
//! of a line the TOML parser could not read. Every message it builds is secret-safe (see the
//! parent module's doc).

use super::*;

/// One problem of a configuration: the dotted key it is about (may be empty), where it is (a
/// byte offset into the file) when known, and what is wrong.
pub(super) struct Problem {
    pub(super) key: String,
    pub(super) at: Option<usize>,
    pub(super) message: String,
}

impl Problem {
    pub(super) fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            at: None,
            message: message.into(),
        }
    }
}

/// Parses, checks every key on its own and, when asked, validates the values and looks for the
/// secret; every problem comes out as one line, secrets scrubbed.
pub(super) fn from_text(
    text: &str,
    origin: Option<&str>,
    validate: bool,
) -> Result<Config, ConfigError> {
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc.into_inner(),
        // Only the message and the span: the error's Display quotes the line, its Debug holds
        // the whole text.
        Err(e) => {
            let at = e.span().map(|span| span.start);
            return Err(syntax_error(text, origin, at, e.message()));
        }
    };
    let mut report = Report::new(origin, text);
    report.add_secret_values(&mut Vec::new(), &doc);
    let Keys { mut problems, good } = check_keys(&doc);
    let config = match Config::deserialize(toml::de::Deserializer::from(Spanned::new(
        0..text.len(),
        good,
    ))) {
        Ok(config) => config,
        // Not expected once every key passed on its own; reported all the same.
        Err(e) => {
            problems.push(Problem {
                key: String::new(),
                at: e.span().map(|span| span.start),
                message: e.message().to_string(),
            });
            return Err(report.error(problems));
        }
    };
    if validate {
        // A key (or table) that is wrong already is left at its default: no second problem
        // about it or its keys.
        let bad: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
        for mut problem in config.check_values() {
            let key = &problem.key;
            if !bad
                .iter()
                .any(|bad| key == bad || key.starts_with(&format!("{bad}.")))
            {
                problem.at = position(&doc, &problem.key);
                problems.push(problem);
            }
        }
        if let Ok(secret) = config.client_secret() {
            report.add_secret(secret.expose());
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(report.error(problems))
    }
}

/// The one problem of a text that does not parse, at `at`, named by the key of its line.
pub(super) fn syntax_error(
    text: &str,
    origin: Option<&str>,
    at: Option<usize>,
    message: &str,
) -> ConfigError {
    let key = at
        .and_then(|at| {
            scan(text)
                .into_iter()
                .nth(line_column(text.as_bytes(), at).0 - 1)
        })
        .and_then(|line| line.key)
        .map(|key| dotted(&key))
        .unwrap_or_default();
    let problem = Problem {
        key,
        at,
        message: message.to_string(),
    };
    Report::new(origin, text).error(vec![problem])
}

/// The outcome of checking each key on its own: the problems, and the document without the
/// keys that have one.
#[derive(Default)]
pub(super) struct Keys<'i> {
    pub(super) problems: Vec<Problem>,
    pub(super) good: DeTable<'i>,
}

/// Checks every key of the document by deserializing a document holding only that key: every
/// section is `deny_unknown_fields, default`, so each unknown key and each value of the wrong
/// type is found, naming exactly its key, however many there are.
pub(super) fn check_keys<'i>(doc: &DeTable<'i>) -> Keys<'i> {
    let mut keys = Keys::default();
    for (section, value) in doc.iter() {
        if !SECTIONS.contains(&section.get_ref().as_ref()) {
            keys.check(&[section], value); // unknown: serde names it and the known ones
            continue;
        }
        let Some(table) = keys.table(&[section], value) else {
            continue;
        };
        for (key, value) in table.iter() {
            if section.get_ref() != "accounts" {
                keys.check(&[section, key], value);
                continue;
            }
            let Some(account) = keys.table(&[section, key], value) else {
                continue;
            };
            if account.is_empty() {
                keys.check(&[section, key], value);
            }
            for (field, value) in account.iter() {
                keys.check(&[section, key, field], value);
            }
        }
    }
    keys
}

pub(super) type Key<'i> = Spanned<DeString<'i>>;
pub(super) type Value<'i> = Spanned<DeValue<'i>>;

impl<'i> Keys<'i> {
    pub(super) fn check(&mut self, path: &[&Key<'i>], value: &Value<'i>) {
        let mut one = DeTable::new();
        insert_at(&mut one, path, value.clone());
        let doc = toml::de::Deserializer::from(Spanned::new(value.span(), one));
        match Config::deserialize(doc) {
            Ok(_) => insert_at(&mut self.good, path, value.clone()),
            Err(e) => {
                let names: Vec<&str> = path.iter().map(|key| key.get_ref().as_ref()).collect();
                let message = if is_secret_key(&names) {
                    without_value(e.message(), value.get_ref())
                } else {
                    e.message().to_string()
                };
                self.problems.push(Problem {
                    key: dotted(&names),
                    at: Some(e.span().unwrap_or_else(|| value.span()).start),
                    message,
                });
            }
        }
    }

    /// The value as a table, or a problem (the value not shown: it could be anything).
    pub(super) fn table<'a>(
        &mut self,
        path: &[&Key<'i>],
        value: &'a Value<'i>,
    ) -> Option<&'a DeTable<'i>> {
        let table = value.get_ref().as_table();
        if table.is_none() {
            let names: Vec<&str> = path.iter().map(|key| key.get_ref().as_ref()).collect();
            self.problems.push(Problem {
                key: dotted(&names),
                at: Some(value.span().start),
                message: format!("expected a table, found {}", value.get_ref().type_str()),
            });
        }
        table
    }
}

/// Inserts `value` at `path`, creating the tables on the way.
pub(super) fn insert_at<'i>(table: &mut DeTable<'i>, path: &[&Key<'i>], value: Value<'i>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = table;
    for key in parents {
        let entry = table
            .entry((*key).clone())
            .or_insert_with(|| Spanned::new(key.span(), DeValue::Table(DeTable::new())));
        let DeValue::Table(next) = entry.get_mut() else {
            return;
        };
        table = next;
    }
    table.insert((*last).clone(), value);
}

/// A deserialization message for a secret-bearing key: serde quotes the value in "invalid
/// type: string \"...\", expected ..."; only the expectation is kept.
pub(super) fn without_value(message: &str, value: &DeValue<'_>) -> String {
    if message.starts_with("unknown field") {
        return message.to_string(); // names keys only
    }
    let expected = message
        .rsplit_once(", expected ")
        .map_or("another value", |(_, expected)| expected);
    format!(
        "expected {expected}, found {} (value not shown: this key holds a secret)",
        value.type_str()
    )
}

/// Where the value of a dotted key is in the document, if it is there.
pub(super) fn position(doc: &DeTable<'_>, key: &str) -> Option<usize> {
    let path = parse_key(key)?;
    let (last, parents) = path.split_last()?;
    let mut table = doc;
    for name in parents {
        table = table.get(name.as_str())?.get_ref().as_table()?;
    }
    Some(table.get(last.as_str())?.span().start)
}

/// A dotted key as written in TOML, quoting the parts that need it.
pub(super) fn dotted<S: AsRef<str>>(path: &[S]) -> String {
    let part = |name: &str| {
        if !name.is_empty() && name.chars().all(is_bare) {
            name.to_string()
        } else {
            format!("{name:?}")
        }
    };
    let parts: Vec<String> = path.iter().map(|name| part(name.as_ref())).collect();
    parts.join(".")
}

pub(super) fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// The 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &[u8], at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|b| **b == b'\n').count();
    let column = 1 + before[line_start..]
        .iter()
        .filter(|b| (**b & 0xC0) != 0x80)
        .count();
    (line, column)
}

/// Turns problems into output lines: `FILE:LINE:COL: key: message` (parts left out when not
/// known), with every secret value found anywhere replaced by `<redacted>`. The problems carry
/// no values of secret-bearing keys to begin with; this is the second line of defence.
pub(super) struct Report<'t> {
    pub(super) origin: Option<&'t str>,
    pub(super) text: &'t str,
    pub(super) secrets: Vec<String>,
}

impl<'t> Report<'t> {
    /// A report on `text`, set to scrub what is written on its secret-bearing lines.
    pub(super) fn new(origin: Option<&'t str>, text: &'t str) -> Report<'t> {
        let mut report = Report {
            origin,
            text,
            secrets: Vec::new(),
        };
        for line in scan(text).iter().filter(|line| line.secret) {
            report.add_secret_text(line.value);
        }
        report
    }

    pub(super) fn add_secret(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.chars().count() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_string());
        }
    }

    /// The raw text of a secret-bearing value (quoted or not, closed or not): whole, and each
    /// string and bare word in it, but for the keys of an inline table.
    pub(super) fn add_secret_text(&mut self, value: &str) {
        self.add_secret(value.trim().trim_matches(['"', '\'']));
        let mut rest = value;
        while let Some(start) = rest.find(|c: char| !(c.is_whitespace() || "[]{},=".contains(c))) {
            rest = &rest[start..];
            let (word, after) = match rest.chars().next() {
                Some(quote @ ('"' | '\'')) => {
                    let inner = &rest[1..];
                    let end = inner.find(quote).unwrap_or(inner.len());
                    (&inner[..end], inner.get(end + 1..).unwrap_or(""))
                }
                _ => {
                    let end = rest
                        .find(|c: char| c.is_whitespace() || "[]{},=".contains(c))
                        .unwrap_or(rest.len());
                    rest.split_at(end)
                }
            };
            if !after.trim_start().starts_with('=') {
                self.add_secret(word);
            }
            rest = after;
        }
    }

    /// Every scalar under a secret-bearing key of the parsed document (escapes decoded).
    pub(super) fn add_secret_values<'a>(
        &mut self,
        path: &mut Vec<&'a str>,
        table: &'a DeTable<'_>,
    ) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().as_ref());
            if is_secret_key(path) {
                self.add_scalars(value.get_ref());
            } else if let DeValue::Table(table) = value.get_ref() {
                self.add_secret_values(path, table);
            }
            path.pop();
        }
    }

    pub(super) fn add_scalars(&mut self, value: &DeValue<'_>) {
        match value {
            DeValue::String(s) => self.add_secret(s),
            DeValue::Integer(i) => self.add_secret(i.as_str()),
            DeValue::Float(f) => self.add_secret(f.as_str()),
            DeValue::Array(array) => array.iter().for_each(|v| self.add_scalars(v.get_ref())),
            DeValue::Table(table) => table.values().for_each(|v| self.add_scalars(v.get_ref())),
            DeValue::Boolean(_) | DeValue::Datetime(_) => {}
        }
    }

    pub(super) fn error(mut self, mut problems: Vec<Problem>) -> ConfigError {
        problems.sort_by_key(|p| p.at.unwrap_or(usize::MAX));
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        ConfigError {
            problems: problems.iter().map(|p| self.line(p)).collect(),
        }
    }

    pub(super) fn line(&self, problem: &Problem) -> String {
        let mut line = String::new();
        let position = problem.at.map(|at| {
            let (line, column) = line_column(self.text.as_bytes(), at);
            format!("{line}:{column}")
        });
        let location: Vec<&str> = self.origin.into_iter().chain(position.as_deref()).collect();
        if !location.is_empty() {
            line.push_str(&location.join(":"));
            line.push_str(": ");
        }
        if !problem.key.is_empty() {
            line.push_str(&problem.key);
            line.push_str(": ");
        }
        line.push_str(&problem.message);
        for secret in &self.secrets {
            line = line.replace(secret.as_str(), "<redacted>");
        }
        line
    }
}

/// A line of the raw text, seen without a TOML parser (the text may not parse).
pub(super) struct RawLine<'t> {
    /// The key of the statement the line belongs to; a header's table for a header.
    pub(super) key: Option<Vec<String>>,
    /// Whether that key (or, when it is no valid key, the text before `=`) is secret-bearing.
    pub(super) secret: bool,
    /// The value text on this line.
    pub(super) value: &'t str,
}

/// Splits the text into lines and finds for each the key it belongs to, following table
/// headers and statements that go on over several lines (multi-line strings and arrays). It
/// names the key of a syntax error's line, and finds secret values for [`Report`] to scrub.
pub(super) fn scan(text: &str) -> Vec<RawLine<'_>> {
    let mut lines = Vec::new();
    let mut table: Vec<String> = Vec::new();
    let mut lexer = Lexer::default();
    let mut statement: (Option<Vec<String>>, bool) = (None, false);
    for line in text.split('\n') {
        if lexer.is_open() {
            lexer.scan(line);
            let (key, secret) = statement.clone();
            lines.push(RawLine {
                key,
                secret,
                value: line,
            });
            continue;
        }
        let trimmed = line.trim_start();
        if let Some(header) = trimmed.strip_prefix('[') {
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("");
            table = parse_key(name).unwrap_or_default();
            lines.push(RawLine {
                key: Some(table.clone()).filter(|table| !table.is_empty()),
                secret: false,
                value: "",
            });
            continue;
        }
        let Some((raw_key, value)) = split_assignment(trimmed) else {
            lines.push(RawLine {
                key: None,
                secret: false,
                value: "",
            });
            continue;
        };
        let key = parse_key(raw_key).map(|key| [table.clone(), key].concat());
        let secret = match &key {
            Some(key) => is_secret_key(key),
            None => looks_secret(raw_key),
        };
        lexer.scan(value);
        statement = (key.clone(), secret);
        lines.push(RawLine { key, secret, value });
    }
    lines
}

/// `key = value` split at the first `=` outside quotes; `None` for a line without one.
pub(super) fn split_assignment(line: &str) -> Option<(&str, &str)> {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(open), c) if c == open => quote = None,
            (None, '=') => return Some((&line[..i], &line[i + 1..])),
            (None, '#') => return None,
            _ => {}
        }
    }
    None
}

/// The parts of a dotted key (`a."b.c".d`); `None` unless the text is one.
pub(super) fn parse_key(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    loop {
        let (part, after) = match rest.chars().next()? {
            quote @ ('"' | '\'') => {
                let inner = &rest[1..];
                let end = inner.find(quote)?;
                (&inner[..end], &inner[end + 1..])
            }
            _ => {
                let end = rest.find(|c| !is_bare(c)).unwrap_or(rest.len());
                if end == 0 {
                    return None;
                }
                rest.split_at(end)
            }
        };
        parts.push(part.to_string());
        let after = after.trim_start();
        if after.is_empty() {
            return Some(parts);
        }
        rest = after.strip_prefix('.')?.trim_start();
    }
}

/// Just enough of TOML's lexical structure to tell whether a statement goes on past its line:
/// inside a multi-line string, or an array or inline table not closed yet.
#[derive(Default)]
pub(super) struct Lexer {
    pub(super) string: Option<&'static str>,
    pub(super) depth: usize,
}

impl Lexer {
    pub(super) fn is_open(&self) -> bool {
        self.string.is_some() || self.depth > 0
    }

    pub(super) fn scan(&mut self, line: &str) {
        let mut rest = line;
        loop {
            if let Some(delimiter) = self.string {
                let Some(end) = string_end(rest, delimiter) else {
                    if delimiter.len() == 1 {
                        self.string = None; // one-line strings end with their line, closed or not
                    }
                    return;
                };
                rest = &rest[end..];
                self.string = None;
            }
            let Some(i) = rest.find(['"', '\'', '[', ']', '{', '}', '#']) else {
                return;
            };
            rest = &rest[i..];
            match rest.as_bytes()[0] {
                b'#' => return,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {
                    let delimiter = ["\"\"\"", "'''", "\"", "'"]
                        .into_iter()
                        .find(|delimiter| rest.starts_with(delimiter))
                        .unwrap_or("\"");
                    self.string = Some(delimiter);
                    rest = &rest[delimiter.len()..];
                    continue;
                }
            }
            rest = &rest[1..];
        }
    }
}

/// Just past the `delimiter` that closes a string in `text`, if it is there.
pub(super) fn string_end(text: &str, delimiter: &str) -> Option<usize> {
    let escapes = delimiter.starts_with('"');
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        if escapes && c == '\\' {
            chars.next();
        } else if text[i..].starts_with(delimiter) {
            return Some(i + delimiter.len());
        }
    }
    None
}
