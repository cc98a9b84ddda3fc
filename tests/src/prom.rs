//! Reading Prometheus histograms as the bench, the dashboards and the alerts do.

/// A quantile from a Prometheus histogram, interpolated within its bucket; `text` may hold
/// the same histogram of several processes, which are added up.
pub fn quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The same histogram of several hubs (their texts one after the other): one bucket each.
    buckets.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let frac = if count > prev_count {
                (rank - prev_count) / (count - prev_count)
            } else {
                1.0
            };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_count) = (le, count);
    }
    None
}
