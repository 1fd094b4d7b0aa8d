//! Text and classification metrics plugin evaluators build on. Pure
//! functions, each tested on a case worked out by hand.

use std::collections::{HashMap, HashSet};

use crate::types::{EvalOutput, EvalRequest};

/// Lowercase alphanumeric tokens: every run of letters/digits is a token and
/// everything else separates tokens (the `rouge_score` tokenizer, extended to
/// Unicode letters).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// SQuAD answer normalization: lowercase, delete ASCII punctuation, drop the
/// articles `a` / `an` / `the`, collapse whitespace.
pub fn normalize_answer(text: &str) -> String {
    let lower: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Tokens of [`normalize_answer`].
pub fn answer_tokens(text: &str) -> Vec<String> {
    normalize_answer(text)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A label for exact comparison: trimmed, lowercased, inner whitespace
/// collapsed, trailing `.`, `!`, `?`, `,`, `;`, `:` removed.
pub fn normalize_label(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_end_matches(['.', '!', '?', ',', ';', ':'])
        .trim()
        .to_lowercase()
}

/// Precision, recall and F1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prf {
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// Harmonic mean of the two (0 when both are 0).
    pub f1: f64,
}

impl Prf {
    /// From precision and recall.
    pub fn new(precision: f64, recall: f64) -> Self {
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            f1,
        }
    }
}

/// Bag-of-tokens F1 (SQuAD): overlap counted with multiplicity. When either
/// side is empty the score is 1 if both are, else 0.
pub fn token_f1(prediction: &[String], reference: &[String]) -> f64 {
    if prediction.is_empty() || reference.is_empty() {
        return if prediction.is_empty() && reference.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in reference {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for t in prediction {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    Prf::new(
        common as f64 / prediction.len() as f64,
        common as f64 / reference.len() as f64,
    )
    .f1
}

/// Length of the longest common subsequence (O(n·m) time, O(m) memory).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L (sentence level, Lin 2004, β = 1 as in `rouge_score`):
/// P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R). Empty sides score 0.
pub fn rouge_l(prediction: &[String], reference: &[String]) -> Prf {
    if prediction.is_empty() || reference.is_empty() {
        return Prf::new(0.0, 0.0);
    }
    let lcs = lcs_len(prediction, reference) as f64;
    Prf::new(lcs / prediction.len() as f64, lcs / reference.len() as f64)
}

/// Area under the ROC curve: the probability that a random positive scores
/// above a random negative, ties counting one half (Mann–Whitney U with
/// average ranks). `None` when either class is absent or the lengths differ.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    if scores.len() != positive.len() {
        return None;
    }
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // ranks i+1 ..= j+1 share their average
        let avg = (i + j + 2) as f64 / 2.0;
        for &k in &order[i..=j] {
            if positive[k] {
                rank_sum_pos += avg;
            }
        }
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Confusion counts of a binary task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Confusion {
    /// Predicted positive, actually positive.
    pub tp: usize,
    /// Predicted positive, actually negative.
    pub fp: usize,
    /// Predicted negative, actually positive.
    pub fn_: usize,
    /// Predicted negative, actually negative.
    pub tn: usize,
}

impl Confusion {
    /// Counts pairs of (predicted, actual).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut c = Self::default();
        for (p, a) in pairs {
            match (p, a) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }

    /// Precision / recall / F1 of the positive class; a ratio with a zero
    /// denominator is 0 (scikit-learn's `zero_division=0`).
    pub fn prf(&self) -> Prf {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Prf::new(
            ratio(self.tp, self.tp + self.fp),
            ratio(self.tp, self.tp + self.fn_),
        )
    }

    /// Fraction of correct predictions (0 for no examples).
    pub fn accuracy(&self) -> f64 {
        let n = self.tp + self.fp + self.fn_ + self.tn;
        if n == 0 {
            0.0
        } else {
            (self.tp + self.tn) as f64 / n as f64
        }
    }
}

fn ngrams(tokens: &[String], n: usize) -> impl Iterator<Item = &[String]> {
    let count = if n == 0 {
        0
    } else {
        tokens.len().saturating_sub(n - 1)
    };
    (0..count).map(move |i| &tokens[i..i + n])
}

/// distinct-n (Li et al., 2016): distinct n-grams over all n-grams, pooled
/// over all texts. `None` when there is no n-gram at all.
pub fn distinct_n(texts: &[Vec<String>], n: usize) -> Option<f64> {
    let mut seen: HashSet<&[String]> = HashSet::new();
    let mut total = 0usize;
    for t in texts {
        for g in ngrams(t, n) {
            total += 1;
            seen.insert(g);
        }
    }
    (total > 0).then(|| seen.len() as f64 / total as f64)
}

/// Repetition within one text (rep-n, Welleck et al., 2019):
/// `1 - distinct n-grams / n-grams`; 0 when the text has no n-gram.
pub fn repetition_rate(tokens: &[String], n: usize) -> f64 {
    let grams: Vec<&[String]> = ngrams(tokens, n).collect();
    if grams.is_empty() {
        return 0.0;
    }
    let unique: HashSet<&[String]> = grams.iter().copied().collect();
    1.0 - unique.len() as f64 / grams.len() as f64
}

/// Softmax (max-subtracted for stability).
pub fn softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Index of the largest value (the first on ties); `None` when empty.
pub fn argmax(xs: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, x) in xs.iter().enumerate() {
        match best {
            Some(b) if xs[b] >= *x => {}
            _ => best = Some(i),
        }
    }
    best
}

/// Arithmetic mean; `None` when empty.
pub fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// A ready-made label-accuracy evaluator: the predicted label is the argmax
/// of the per-choice `scores` when given, else the prediction text; it is
/// correct when it equals the reference after [`normalize_label`]. Returns
/// the metric `accuracy`.
pub fn label_accuracy(request: &EvalRequest) -> EvalOutput {
    let n = request.predictions.len().min(request.references.len());
    if n == 0 {
        return EvalOutput::new(0).warn("no examples");
    }
    let correct = (0..n)
        .filter(|&i| {
            let predicted = match request.scores.get(i).and_then(|row| argmax(row)) {
                Some(j) => request
                    .choices
                    .get(j)
                    .map(String::as_str)
                    .unwrap_or_default(),
                None => request.predictions[i].as_str(),
            };
            normalize_label(predicted) == normalize_label(&request.references[i])
        })
        .count();
    EvalOutput::new(n).metric("accuracy", correct as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        words(s)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn rouge_l_hand_case() {
        // pred: patient has acute chest pain (5); ref: the patient has chest pain today (6)
        // LCS = patient has chest pain = 4 -> P = 4/5, R = 4/6, F = 2PR/(P+R) = 8/11
        let p = rouge_l(
            &w("Patient has acute chest pain."),
            &w("The patient has chest pain today"),
        );
        close(p.precision, 0.8);
        close(p.recall, 4.0 / 6.0);
        close(p.f1, 8.0 / 11.0);
        // reversed order: LCS = 1 -> P = R = F = 1/3
        close(
            rouge_l(&w("pain chest patient"), &w("patient chest pain")).f1,
            1.0 / 3.0,
        );
    }

    #[test]
    fn token_f1_hand_case() {
        // "the State of Delaware" -> [state, of, delaware]; "Delaware" -> [delaware]
        // overlap 1: P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 0.5
        close(
            token_f1(
                &answer_tokens("the State of Delaware"),
                &answer_tokens("Delaware"),
            ),
            0.5,
        );
        // "thirty (30) days" -> [thirty, 30, days] vs [30, days]: P = 2/3, R = 1, F1 = 0.8
        close(
            token_f1(
                &answer_tokens("thirty (30) days"),
                &answer_tokens("30 days"),
            ),
            0.8,
        );
        // multiplicity: [a1 a1] vs [a1]: overlap 1, P = 1/2, R = 1 -> 2/3
        close(token_f1(&w("x x"), &w("x")), 2.0 / 3.0);
        close(token_f1(&[], &[]), 1.0);
        assert_eq!(normalize_answer("The  U.S. Army!"), "us army");
    }

    #[test]
    fn roc_auc_hand_case() {
        // positives score 0.9 and 0.7, negatives 0.8 and 0.1.
        // pairs (pos > neg): 0.9>0.8 yes, 0.9>0.1 yes, 0.7>0.8 no, 0.7>0.1 yes -> 3/4
        close(
            roc_auc(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]).expect("auc"),
            0.75,
        );
        // a tie between a positive and a negative counts 1/2: pairs 1, 0.5 -> 0.75
        close(
            roc_auc(&[0.9, 0.5, 0.5], &[true, true, false]).expect("auc"),
            0.75,
        );
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn confusion_hand_case() {
        // predicted [1 1 1 0], actual [1 0 1 0]: tp 2, fp 1, fn 0, tn 1
        // P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8, accuracy 3/4
        let c = Confusion::from_pairs([(true, true), (true, false), (true, true), (false, false)]);
        let prf = c.prf();
        close(prf.precision, 2.0 / 3.0);
        close(prf.recall, 1.0);
        close(prf.f1, 0.8);
        close(c.accuracy(), 0.75);
        assert_eq!(Confusion::default().prf().f1, 0.0);
    }

    #[test]
    fn distinct_and_repetition_hand_case() {
        // texts: [aye aye captain] [aye captain ho] [ho ho ho ho]
        // unigrams: 10 total, distinct {aye, captain, ho} = 3 -> 0.3
        // bigrams: 2 + 2 + 3 = 7 total, distinct {aye aye, aye captain, captain ho, ho ho} = 4 -> 4/7
        // rep-2: 0, 0, 1 - 1/3 = 2/3 -> mean 2/9
        let texts = vec![
            w("Aye, aye captain!"),
            w("aye captain ho"),
            w("ho ho ho ho"),
        ];
        close(distinct_n(&texts, 1).expect("d1"), 0.3);
        close(distinct_n(&texts, 2).expect("d2"), 4.0 / 7.0);
        let rep = mean(texts.iter().map(|t| repetition_rate(t, 2))).expect("mean");
        close(rep, 2.0 / 9.0);
        assert_eq!(distinct_n(&[vec![]], 2), None);
    }

    #[test]
    fn label_accuracy_hand_case() {
        // "Cardiology" = cardiology, "neurology." = neurology, urology != nephrology -> 2/3
        let r = EvalRequest::new(
            ["Cardiology", "neurology.", "urology"],
            ["cardiology", "neurology", "nephrology"],
        );
        close(label_accuracy(&r).metrics["accuracy"], 2.0 / 3.0);
        // with scores the argmax choice is used: [yes, no] -> correct, wrong -> 1/2
        let r = EvalRequest::new(["", ""], ["yes", "yes"])
            .with_scores(["yes", "no"], vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        close(label_accuracy(&r).metrics["accuracy"], 0.5);
    }

    #[test]
    fn small_helpers() {
        assert_eq!(normalize_label("  Cardiology. "), "cardiology");
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        let s = softmax(&[0.0, 0.0]);
        close(s[0], 0.5);
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3]), 2);
    }
}
