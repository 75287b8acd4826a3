//! "Did you mean" for misspelt keys and manifest field names.

/// The candidate nearest to a misspelt word (at most three edits away), for "did you
/// mean" hints on keys and on manifest field names alike. Of equally near candidates
/// the alphabetically first wins, so the hint does not depend on their order.
pub fn closest<C: AsRef<str>>(word: &str, candidates: impl IntoIterator<Item = C>) -> Option<C> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c.as_ref()), c))
        .filter(|(d, _)| *d <= 3)
        .min_by(|(d1, c1), (d2, c2)| d1.cmp(d2).then_with(|| c1.as_ref().cmp(c2.as_ref())))
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_suggests_a_near_candidate_only() {
        assert_eq!(closest("isuer", ["issuer", "audience"]), Some("issuer"));
        assert_eq!(closest("replicaCount", ["issuer", "audience"]), None);
    }
}
