//! Kubernetes label selectors: `matchLabels` and `matchExpressions` with In, NotIn, Exists
//! and DoesNotExist, with the semantics of `metav1.LabelSelector` (all terms must hold; an
//! empty selector matches everything).

use std::collections::BTreeMap;

use fleet_types::ibgu::{ClusterLabelSelector, LabelSelectorRequirement, SelectorOperator};

pub fn matches(selector: &ClusterLabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector
            .match_expressions
            .iter()
            .all(|e| requirement_holds(e, labels))
}

fn requirement_holds(r: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    match r.operator {
        SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
        SelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
        SelectorOperator::Exists => value.is_some(),
        SelectorOperator::DoesNotExist => value.is_none(),
    }
}

/// Problems with a selector's shape, as the API server would report them.
pub fn problems(selector: &ClusterLabelSelector) -> Vec<String> {
    selector
        .match_expressions
        .iter()
        .filter_map(|e| match e.operator {
            SelectorOperator::In | SelectorOperator::NotIn if e.values.is_empty() => Some(format!(
                "matchExpressions[{}]: values must be non-empty for operator {:?}",
                e.key, e.operator
            )),
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !e.values.is_empty() => {
                Some(format!(
                    "matchExpressions[{}]: values must be empty for operator {:?}",
                    e.key, e.operator
                ))
            }
            _ if e.key.is_empty() => Some("matchExpressions: key must not be empty".to_string()),
            _ => None,
        })
        .collect()
}

/// A token of the `labelSelector` syntax, with its byte position.
#[derive(Debug, PartialEq)]
enum Token<'a> {
    Ident(&'a str),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
    End,
}

impl Token<'_> {
    fn describe(&self) -> String {
        match self {
            Token::Ident(s) => format!("{s:?}"),
            Token::Not => "'!'".into(),
            Token::Eq => "'='".into(),
            Token::DoubleEq => "'=='".into(),
            Token::NotEq => "'!='".into(),
            Token::Gt => "'>'".into(),
            Token::Lt => "'<'".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::Comma => "','".into(),
            Token::End => "the end".into(),
        }
    }
}

/// Splits a selector into tokens as the Kubernetes lexer does: the symbols `! != = == > < ( )
/// ,`, and identifiers (any other run of characters but white space).
fn tokens(query: &str) -> Vec<(usize, Token<'_>)> {
    let mut out = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        let (token, len) = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'!' if next == Some(b'=') => (Token::NotEq, 2),
            b'!' => (Token::Not, 1),
            b'=' if next == Some(b'=') => (Token::DoubleEq, 2),
            b'=' => (Token::Eq, 1),
            b'>' => (Token::Gt, 1),
            b'<' => (Token::Lt, 1),
            b'(' => (Token::Open, 1),
            b')' => (Token::Close, 1),
            b',' => (Token::Comma, 1),
            _ => {
                let end = query[i..]
                    .find(|ch: char| ch.is_whitespace() || "!=><(),".contains(ch))
                    .map_or(query.len(), |n| i + n);
                (Token::Ident(&query[i..end]), end - i)
            }
        };
        out.push((i, token));
        i += len;
    }
    out.push((query.len(), Token::End));
    out
}

/// A label key: an optional DNS-1123 subdomain prefix and `/`, then a name of at most 63
/// characters of letters, digits, `-`, `_` and `.`, starting and ending alphanumeric.
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && let Err(why) = fleet_types::names::dns1123_subdomain(p)
    {
        return Some(format!("label key {key:?}: its prefix {why}"));
    }
    if !label_value_ok(name) || name.is_empty() {
        return Some(format!(
            "label key {key:?}: the name part must be 1 to 63 characters of letters, digits, \
             '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// A label value: empty, or at most 63 characters of letters, digits, `-`, `_` and `.`,
/// starting and ending alphanumeric.
fn label_value_ok(v: &str) -> bool {
    let b = v.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c)))
}

/// Parses the `labelSelector` query syntax of the Kubernetes API (`a=b,c!=d,e in (f,g),
/// h notin (i),j,!k`) exactly: anything else is refused, saying at which position.
pub fn parse(query: &str) -> Result<ClusterLabelSelector, String> {
    let toks = tokens(query);
    let mut sel = ClusterLabelSelector::default();
    let mut at = 0;
    let found = |i: usize, expected: &str| -> String {
        let (pos, t) = &toks[i];
        format!(
            "at position {pos}: found {}, expected {expected}",
            t.describe()
        )
    };
    if toks[0].1 == Token::End {
        return Ok(sel);
    }
    loop {
        let negated = toks[at].1 == Token::Not;
        if negated {
            at += 1;
        }
        let Token::Ident(key) = toks[at].1 else {
            return Err(found(at, "a label key"));
        };
        if let Some(why) = label_key_problem(key) {
            return Err(format!("at position {}: {why}", toks[at].0));
        }
        at += 1;
        let requirement = |operator, values: Vec<String>| LabelSelectorRequirement {
            key: key.to_string(),
            operator,
            values,
        };
        let value = |i: usize| -> Result<String, String> {
            match toks[i].1 {
                Token::Ident(v) if label_value_ok(v) => Ok(v.to_string()),
                Token::Ident(v) => Err(format!(
                    "at position {}: label value {v:?} must be at most 63 characters of \
                     letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
                    toks[i].0
                )),
                _ => Err(found(i, "a label value")),
            }
        };
        match (&toks[at].1, negated) {
            (Token::Comma | Token::End, true) => sel
                .match_expressions
                .push(requirement(SelectorOperator::DoesNotExist, vec![])),
            (_, true) => return Err(found(at, "',' or the end after '!key'")),
            (Token::Comma | Token::End, false) => sel
                .match_expressions
                .push(requirement(SelectorOperator::Exists, vec![])),
            (Token::Eq | Token::DoubleEq | Token::NotEq, false) => {
                let not = toks[at].1 == Token::NotEq;
                at += 1;
                // `a=` selects the empty value.
                let v = match toks[at].1 {
                    Token::Comma | Token::End => String::new(),
                    _ => {
                        at += 1;
                        value(at - 1)?
                    }
                };
                if not {
                    sel.match_expressions
                        .push(requirement(SelectorOperator::NotIn, vec![v]));
                } else if sel.match_labels.get(key).is_some_and(|old| *old != v) {
                    // Two different values for one key select nothing: keep both as In.
                    sel.match_expressions
                        .push(requirement(SelectorOperator::In, vec![v]));
                } else {
                    sel.match_labels.insert(key.to_string(), v);
                }
            }
            (Token::Ident(op @ ("in" | "notin")), false) => {
                let operator = if *op == "in" {
                    SelectorOperator::In
                } else {
                    SelectorOperator::NotIn
                };
                at += 1;
                if toks[at].1 != Token::Open {
                    return Err(found(at, "'('"));
                }
                let mut values = Vec::new();
                loop {
                    at += 1;
                    match toks[at].1 {
                        // `(a,)` holds the empty value too.
                        Token::Comma | Token::Close if toks[at - 1].1 == Token::Comma => {
                            values.push(String::new());
                            at -= 1;
                        }
                        Token::Close if values.is_empty() => {
                            return Err(format!(
                                "at position {}: the values of '{op}' must not be empty",
                                toks[at].0
                            ));
                        }
                        _ => values.push(value(at)?),
                    }
                    at += 1;
                    match toks[at].1 {
                        Token::Comma => {}
                        Token::Close => break,
                        _ => return Err(found(at, "',' or ')'")),
                    }
                }
                at += 1;
                sel.match_expressions.push(requirement(operator, values));
            }
            (Token::Gt | Token::Lt, false) => {
                return Err(format!(
                    "at position {}: the operators '>' and '<' are not supported here",
                    toks[at].0
                ));
            }
            _ => return Err(found(at, "'=', '==', '!=', 'in', 'notin', ',' or the end")),
        }
        match toks[at].1 {
            Token::End => return Ok(sel),
            Token::Comma => at += 1,
            _ => return Err(found(at, "',' or the end")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: SelectorOperator, values: &[&str]) -> ClusterLabelSelector {
        ClusterLabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn match_labels_all_must_hold() {
        let sel = ClusterLabelSelector {
            match_labels: labels(&[("env", "prod"), ("site", "a")]),
            match_expressions: vec![],
        };
        assert!(matches(
            &sel,
            &labels(&[("env", "prod"), ("site", "a"), ("x", "y")])
        ));
        assert!(!matches(&sel, &labels(&[("env", "prod")])));
        assert!(!matches(&sel, &labels(&[("env", "prod"), ("site", "b")])));
        assert!(matches(&ClusterLabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn the_four_operators() {
        use SelectorOperator::*;
        let l = labels(&[("name", "spoke1"), ("tier", "")]);
        assert!(matches(&expr("name", In, &["spoke1", "spoke4"]), &l));
        assert!(!matches(&expr("name", In, &["spoke4"]), &l));
        assert!(!matches(&expr("missing", In, &["x"]), &l));
        assert!(matches(&expr("name", NotIn, &["spoke4"]), &l));
        assert!(!matches(&expr("name", NotIn, &["spoke1"]), &l));
        assert!(
            matches(&expr("missing", NotIn, &["x"]), &l),
            "NotIn holds for an absent key"
        );
        assert!(matches(&expr("tier", Exists, &[]), &l));
        assert!(!matches(&expr("missing", Exists, &[]), &l));
        assert!(matches(&expr("missing", DoesNotExist, &[]), &l));
        assert!(!matches(&expr("tier", DoesNotExist, &[]), &l));
    }

    #[test]
    fn shape_problems() {
        use SelectorOperator::*;
        assert_eq!(problems(&expr("a", In, &[])).len(), 1);
        assert_eq!(problems(&expr("a", Exists, &["x"])).len(), 1);
        assert!(problems(&expr("a", NotIn, &["x"])).is_empty());
    }

    #[test]
    fn query_syntax() {
        use SelectorOperator::*;
        let sel =
            parse("env=prod,site!=b,name in (spoke1, spoke4),zone notin (z9),gpu,!legacy").unwrap();
        assert_eq!(sel.match_labels, labels(&[("env", "prod")]));
        let ops: Vec<_> = sel
            .match_expressions
            .iter()
            .map(|e| (e.key.as_str(), e.operator, e.values.len()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("site", NotIn, 1),
                ("name", In, 2),
                ("zone", NotIn, 1),
                ("gpu", Exists, 0),
                ("legacy", DoesNotExist, 0)
            ]
        );
        assert!(parse("name in spoke1").is_err());
        assert!(parse("a b c").is_err());
    }

    #[test]
    fn the_kubernetes_grammar_and_nothing_else() {
        use SelectorOperator::*;
        // Accepted, as apimachinery's parser accepts them.
        for ok in [
            "",
            "x=a,y=b,z=c",
            "x!=a,y=b",
            "x=",
            "x= ",
            "x=,z= ",
            "x= ,z= ",
            "!x",
            "x==a",
            "x in (abc,def)",
            "x notin (abc)",
            "x in (abc,)",
            "x in ( abc , def )",
            "example.com/a=b",
            "a.b-c_d=e.f-g_h",
            "  x  =  a  ",
        ] {
            assert!(parse(ok).is_ok(), "{ok:?}: {:?}", parse(ok));
        }
        assert_eq!(parse("x=").unwrap().match_labels, labels(&[("x", "")]));
        let set = parse("x in (abc,)").unwrap();
        assert_eq!(set.match_expressions[0].operator, In);
        assert_eq!(set.match_expressions[0].values, ["abc", ""]);
        // Refused, with where.
        for (bad, position) in [
            ("!", 1),
            ("!!a", 1),
            (",", 0),
            ("a,,b", 2),
            ("=b", 0),
            ("a=b c", 4),
            ("a=b=c", 3),
            ("a in ()", 6),
            ("x/y/z=1", 0),
            ("name=spoke1 name", 12),
            ("x>1", 1),
            ("a in (b", 7),
            ("a notin b", 8),
            ("a=b,", 4),
            ("-a=b", 0),
            ("a=-b", 2),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(
                err.starts_with(&format!("at position {position}:")),
                "{bad:?}: {err}"
            );
        }
    }
}
