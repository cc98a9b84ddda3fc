//! Names: which are valid (Kubernetes' DNS-1123 rules, worded as the API server words
//! them), and how cluster names are ordered for people: `spoke2` before `spoke10`. Batches
//! keep the plain name order TALM uses (`ibgu-hub.md`); tables and status lists read better
//! this way.

use std::cmp::Ordering;

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` (the length is checked apart: a subdomain's parts have
/// no limit of their own).
fn label_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

/// A DNS-1123 label (a namespace, a cluster's name as a ManagedCluster has it): `Err` says
/// what is wrong in the API server's words.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!(
            "must be no more than 63 characters, not {}",
            s.len()
        ));
    }
    if label_ok(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric \
             characters or '-', and must start and end with an alphanumeric character (e.g. \
             'my-name', or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ))
    }
}

/// A DNS-1123 subdomain (an object's name): `Err` says what is wrong.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!(
            "must be no more than 253 characters, not {}",
            s.len()
        ));
    }
    if !s.is_empty() && s.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{s:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character \
             (e.g. 'example.com', regex used for validation is \
             '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ))
    }
}

/// Compares names with each run of digits taken as a number; names equal that way (`a01`,
/// `a1`) fall back to the plain order, so the order is total and agrees with `==`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let (n, rest_x) = split_digits(x);
                let (m, rest_y) = split_digits(y);
                let (n, m) = (trim_zeros(n), trim_zeros(m));
                let by_value = n.len().cmp(&m.len()).then_with(|| n.cmp(m));
                if by_value != Ordering::Equal {
                    return by_value;
                }
                (x, y) = (rest_x, rest_y);
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                (x, y) = (&x[1..], &y[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(s.len());
    s.split_at(end)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&c| c != b'0').unwrap_or(s.len());
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_dns_1123_rules() {
        for good in ["sno1", "a", "spoke-10", "0abc"] {
            assert_eq!(dns1123_label(good), Ok(()), "{good}");
            assert_eq!(dns1123_subdomain(good), Ok(()), "{good}");
        }
        assert_eq!(dns1123_subdomain("upgrade.4-16"), Ok(()));
        for bad in [
            "",
            ".",
            "..",
            "-a",
            "a-",
            "A",
            "x/../../y",
            "../x",
            "%2e%2e",
            "a'; drop table clusters;--",
            "a_b",
            "a b",
        ] {
            assert!(dns1123_label(bad).is_err(), "{bad:?}");
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?}");
        }
        assert!(dns1123_label("a.b").is_err(), "a label has no dots");
        assert!(dns1123_subdomain("a..b").is_err());
        assert_eq!(
            dns1123_subdomain(&"x".repeat(229)),
            Ok(()),
            "no limit per part"
        );
        assert!(dns1123_label(&"a".repeat(64)).unwrap_err().contains("63"));
        assert_eq!(dns1123_label(&"a".repeat(63)), Ok(()));
    }

    #[test]
    fn numbers_in_names_sort_by_value() {
        let mut names = vec![
            "spoke10", "spoke2", "spoke1", "edge-b", "spoke01", "edge-a10", "edge-a9", "spoke",
            "spoke1a", "10", "9",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "9", "10", "edge-a9", "edge-a10", "edge-b", "spoke", "spoke01", "spoke1",
                "spoke1a", "spoke2", "spoke10"
            ]
        );
        assert_eq!(natural_cmp("a", "a"), Ordering::Equal);
        assert_eq!(
            natural_cmp("x99999999999999999999999", "x100000000000000000000000"),
            Ordering::Less,
            "digit runs longer than any integer type"
        );
    }
}
