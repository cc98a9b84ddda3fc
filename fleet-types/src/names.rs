//! How cluster names are ordered for people: `spoke2` before `spoke10`. Batches keep the
//! plain name order TALM uses (`ibgu-hub.md`); tables and status lists read better this way.

use std::cmp::Ordering;

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
