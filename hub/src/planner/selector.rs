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

/// Parses the `labelSelector` query syntax of the Kubernetes API (`a=b,c!=d,e in (f,g),
/// h notin (i),j,!k`) into a selector.
pub fn parse(query: &str) -> Result<ClusterLabelSelector, String> {
    let mut sel = ClusterLabelSelector::default();
    for term in split_terms(query) {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let req = |key: &str, operator, values: Vec<String>| LabelSelectorRequirement {
            key: key.trim().to_string(),
            operator,
            values,
        };
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("{term:?}: expected a parenthesised list of values"))?;
            Ok(inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect())
        };
        if let Some(key) = term.strip_prefix('!') {
            sel.match_expressions
                .push(req(key, SelectorOperator::DoesNotExist, vec![]));
        } else if let Some((k, v)) = term.split_once("!=") {
            sel.match_expressions
                .push(req(k, SelectorOperator::NotIn, vec![v.trim().to_string()]));
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            sel.match_labels
                .insert(k.trim().to_string(), v.trim().to_string());
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            sel.match_expressions
                .push(req(k, SelectorOperator::NotIn, set(rest)?));
        } else if let Some((k, rest)) = term.split_once(" in ") {
            sel.match_expressions
                .push(req(k, SelectorOperator::In, set(rest)?));
        } else if term
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            sel.match_expressions
                .push(req(term, SelectorOperator::Exists, vec![]));
        } else {
            return Err(format!("cannot parse label selector term {term:?}"));
        }
    }
    Ok(sel)
}

/// Splits on commas that are not inside parentheses.
fn split_terms(q: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in q.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&q[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&q[start..]);
    out
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
}
