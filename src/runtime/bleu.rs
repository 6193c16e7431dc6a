//! Corpus BLEU-4 as sacreBLEU computes it on tokenized text (`tokenize="none"`, its default
//! `exp` smoothing): n-gram matches clipped by the reference's counts and summed over the
//! corpus for n = 1..4, their precisions' geometric mean, times the brevity penalty
//! exp(1 − r/c) when the hypotheses are shorter (c) than the references (r). Reported ×100.

use std::collections::HashMap;

/// BLEU of `hyps` against one reference each, as sequences of tokens (any comparable ids).
pub fn corpus_bleu<T: std::hash::Hash + Eq + Clone>(hyps: &[Vec<T>], refs: &[Vec<T>]) -> f64 {
    let (mut matches, mut totals) = ([0u64; 4], [0u64; 4]);
    let (mut c, mut r) = (0u64, 0u64);
    for (h, rf) in hyps.iter().zip(refs) {
        c += h.len() as u64;
        r += rf.len() as u64;
        for n in 1..=4 {
            let (hg, rg) = (grams(h, n), grams(rf, n));
            totals[n - 1] += h.len().saturating_sub(n - 1) as u64;
            matches[n - 1] += hg.iter().map(|(g, &k)| k.min(rg.get(g).copied().unwrap_or(0))).sum::<u64>();
        }
    }
    if c == 0 {
        return 0.0;
    }
    // sacreBLEU's `exp` smoothing: a precision with no match counts as 1/(2^k · total), k the
    // number of such precisions so far.
    let mut k = 1.0;
    let mut log_sum = 0.0;
    for n in 0..4 {
        if totals[n] == 0 {
            return 0.0;
        }
        let p = if matches[n] == 0 {
            k *= 2.0;
            1.0 / (k * totals[n] as f64)
        } else {
            matches[n] as f64 / totals[n] as f64
        };
        log_sum += p.ln() / 4.0;
    }
    let bp = if c < r { (1.0 - r as f64 / c as f64).exp() } else { 1.0 };
    100.0 * bp * log_sum.exp()
}

/// The n-grams of `s` and how often each occurs.
fn grams<T: std::hash::Hash + Eq>(s: &[T], n: usize) -> HashMap<&[T], u64> {
    let mut m: HashMap<&[T], u64> = HashMap::new();
    for g in s.windows(n) {
        *m.entry(g).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::corpus_bleu;

    fn toks(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn sacrebleu_figures_on_fixed_strings() {
        // sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score, sacreBLEU 2.6.0.
        let hyps = ["the cat sat on the mat", "a quick brown fox jumps over the dog"].map(toks);
        let refs = ["the cat sat on a mat", "the quick brown fox jumps over the lazy dog"].map(toks);
        let got = corpus_bleu(&hyps, &refs);
        assert!((got - SACRE_1).abs() < 1e-9, "{got}");
        let exact = corpus_bleu(&refs, &refs);
        assert!((exact - 100.0).abs() < 1e-9, "{exact}");
        // No 4-gram in common: smoothed, not zero.
        let got = corpus_bleu(&[toks("a b c d e")], &[toks("a b c x e")]);
        assert!((got - SACRE_2).abs() < 1e-9, "{got}");
    }

    const SACRE_1: f64 = 59.910061731196755;
    const SACRE_2: f64 = 42.72870063962342;
}
