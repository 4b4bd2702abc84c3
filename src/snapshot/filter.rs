//! containerd's filter syntax for `List`/`Walk`:
//! `labels."containerd.io/snapshot.ref"==sha256:x,parent=="sha256:y"|kind==active`.
//! `,` binds tighter than `|`; several filter strings are alternatives; an empty
//! filter matches everything. Fields are `name`, `parent`, `kind` and `labels.<key>`.

use super::Info;
use crate::error::{Error, Result};

/// A comparison in a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// The field is present.
    Present,
    Equal(String),
    NotEqual(String),
}

/// One `fieldpath [op value]` term.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: any of the conjunctions matches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    /// Alternatives (`|`), each a list of selectors that must all match (`,`).
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses several filter strings (alternatives), as containerd's `filters.ParseAll`.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any = Vec::new();
        for f in filters {
            let parsed = Filter::parse(f.as_ref())?;
            if parsed.any.is_empty() {
                return Ok(Filter::default());
            }
            any.extend(parsed.any);
        }
        Ok(Filter { any })
    }

    /// Parses one filter string; the empty string matches everything.
    pub fn parse(s: &str) -> Result<Filter> {
        let mut p = Parser {
            src: s,
            chars: s.char_indices().collect(),
            pos: 0,
        };
        p.skip_ws();
        if p.at_end() {
            return Ok(Filter::default());
        }
        let mut any = vec![p.selectors()?];
        while p.eat('|') {
            any.push(p.selectors()?);
        }
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected input"));
        }
        Ok(Filter { any })
    }

    /// Whether the snapshot matches.
    pub fn matches(&self, info: &Info) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|sel| sel.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            Op::NotEqual(v) => value.unwrap_or("") != v,
        }
    }
}

/// containerd's snapshot adaptor: the value of a field path, if present.
fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path.first().map(String::as_str)? {
        "kind" => Some(info.kind.as_str()),
        "name" => Some(&info.name),
        "parent" => Some(&info.parent),
        "labels" => info.labels.get(&path[1..].join(".")).map(String::as_str),
        _ => None,
    }
}

struct Parser<'a> {
    src: &'a str,
    chars: Vec<(usize, char)>,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> Error {
        let at = self.chars.get(self.pos).map_or(self.src.len(), |c| c.0);
        Error::InvalidArgument(format!("filter {:?}: {what} at offset {at}", self.src))
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|c| c.1)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>> {
        let mut all = vec![self.selector()?];
        while self.eat(',') {
            all.push(self.selector()?);
        }
        Ok(all)
    }

    fn selector(&mut self) -> Result<Selector> {
        let mut path = vec![self.field()?];
        while self.eat('.') {
            path.push(self.field()?);
        }
        self.skip_ws();
        let op = match (self.peek(), self.chars.get(self.pos + 1).map(|c| c.1)) {
            (Some('='), Some('=')) => {
                self.pos += 2;
                Op::Equal(self.value()?)
            }
            (Some('!'), Some('=')) => {
                self.pos += 2;
                Op::NotEqual(self.value()?)
            }
            (Some('~'), Some('=')) => {
                return Err(self.error("the regular-expression operator ~= is not supported"));
            }
            (None | Some(',') | Some('|'), _) => Op::Present,
            _ => return Err(self.error("expected an operator")),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String> {
        self.skip_ws();
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_field_char(c) => {
                let start = self.pos;
                while self.peek().is_some_and(is_field_char) {
                    self.pos += 1;
                }
                Ok(self.chars[start..self.pos].iter().map(|c| c.1).collect())
            }
            _ => Err(self.error("expected a field name")),
        }
    }

    fn value(&mut self) -> Result<String> {
        self.skip_ws();
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_value_char(c) => {
                let start = self.pos;
                while self.peek().is_some_and(is_value_char) {
                    self.pos += 1;
                }
                Ok(self.chars[start..self.pos].iter().map(|c| c.1).collect())
            }
            _ => Err(self.error("expected a value")),
        }
    }

    /// A quoted string with Go-style escapes (`\"`, `\\`, `\n`, `\t`, `\r`).
    fn quoted(&mut self, quote: char) -> Result<String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("unterminated quoted string"));
            };
            self.pos += 1;
            match c {
                c if c == quote => return Ok(out),
                '\\' => {
                    let Some(e) = self.peek() else {
                        return Err(self.error("unterminated escape"));
                    };
                    self.pos += 1;
                    out.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '\\' | '"' | '/' => e,
                        _ => return Err(self.error("unknown escape")),
                    });
                }
                c => out.push(c),
            }
        }
    }
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn is_value_char(c: char) -> bool {
    c != ',' && c != '|' && c != '"' && !c.is_whitespace() && !c.is_control()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::snapshot::{Kind, Labels};

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }

    fn m(f: &str, i: &Info) -> bool {
        Filter::parse(f).unwrap().matches(i)
    }

    #[test]
    fn fields_and_operators() {
        let a = info(
            "sha256:a",
            "sha256:p",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:a"), ("x", "1")],
        );
        assert!(m("", &a));
        assert!(m("name==sha256:a", &a));
        assert!(m("name==\"sha256:a\"", &a));
        assert!(!m("name==sha256:b", &a));
        assert!(m("name!=sha256:b", &a));
        assert!(m("parent==\"sha256:p\"", &a));
        assert!(m("kind==committed", &a));
        assert!(!m("kind==active", &a));
        assert!(m("labels.x", &a));
        assert!(!m("labels.y", &a));
        assert!(m("labels.x==1", &a));
        assert!(m(r#"labels."containerd.io/snapshot.ref""#, &a));
        assert!(m(
            r#"labels."containerd.io/snapshot.ref"==sha256:a,parent=="sha256:p""#,
            &a
        ));
        assert!(!m(
            r#"labels."containerd.io/snapshot.ref"==sha256:a,parent=="sha256:q""#,
            &a
        ));
        assert!(m("kind==active|name==sha256:a", &a));
        assert!(!m("kind==active|name==sha256:b", &a));
        assert!(m(" kind == committed , labels.x == 1 ", &a));
        assert!(m(
            r#"name=="sha\"256""#,
            &info("sha\"256", "", Kind::View, &[])
        ));
        // != on a missing field compares with "", as containerd does.
        assert!(m("labels.y!=1", &a));
    }

    #[test]
    fn several_strings_are_alternatives() {
        let a = info("a", "", Kind::Active, &[]);
        assert!(
            Filter::parse_all(&["name==b", "name==a"])
                .unwrap()
                .matches(&a)
        );
        assert!(
            !Filter::parse_all(&["name==b", "kind==view"])
                .unwrap()
                .matches(&a)
        );
        assert!(Filter::parse_all(&["name==b", ""]).unwrap().matches(&a));
        assert!(Filter::parse_all::<&str>(&[]).unwrap().matches(&a));
    }

    #[test]
    fn malformed_is_invalid_argument() {
        for bad in [
            "name==",
            "==x",
            "name=x",
            "labels.\"unterminated",
            "name==a,",
            "name==a|",
            "name==a b",
            "name~=a",
            ".x",
            "labels.",
            "name==\"a\\q\"",
        ] {
            match Filter::parse(bad) {
                Err(Error::InvalidArgument(_)) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
