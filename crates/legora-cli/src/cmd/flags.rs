//! clap value parsers for numeric flags: a value outside its domain (NaN, ±inf, past a
//! bound) is a usage error naming the flag, before anything is loaded.

/// Parse a finite float.
fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// A finite float in `[lo, hi]`.
fn in_range(s: &str, lo: f64, hi: f64) -> Result<f64, String> {
    let v = finite(s)?;
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside [{lo}, {hi}]"))
    }
}

/// `--weights`: one adapter's weight, finite with |w| ≤ 100 (PEFT's weighted adapters
/// use weights of order 1; past ±100 the combined delta swamps the base weights).
pub fn adapter_weight(s: &str) -> Result<f64, String> {
    in_range(s, -100.0, 100.0)
}

/// `--temperature`: finite, in `[0, 100]` (0 = greedy).
pub fn temperature(s: &str) -> Result<f64, String> {
    in_range(s, 0.0, 100.0)
}

/// `--top-p`: in `(0, 1]`.
pub fn top_p(s: &str) -> Result<f64, String> {
    let v = in_range(s, 0.0, 1.0)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("top-p must be > 0".into())
    }
}

/// `--repetition-penalty`: finite, in `(0, 100]`.
pub fn repetition_penalty(s: &str) -> Result<f64, String> {
    let v = in_range(s, 0.0, 100.0)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("the repetition penalty must be > 0".into())
    }
}

/// A token count flag (`--max-length`, `--max-new-tokens`): an integer in `[1, 2^24]`
/// (the largest `max_position_embeddings` legora accepts); the model's own context is
/// checked once it is loaded.
pub fn token_count(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a positive integer"))?;
    if (1..=1 << 24).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside [1, {}]", 1 << 24))
    }
}

/// `--density`: in `[0, 1]`.
pub fn density(s: &str) -> Result<f64, String> {
    in_range(s, 0.0, 1.0)
}

/// `--svd-clamp`: a quantile in `[0, 1]`.
pub fn quantile(s: &str) -> Result<f64, String> {
    in_range(s, 0.0, 1.0)
}

/// `--svd-rank`: an integer ≥ 1 (its upper bound, `min(out, in)` of each module, is
/// checked against the model).
pub fn rank(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!("`{s}` is not a positive integer")),
    }
}

/// `--combination`: one of PEFT's `combination_type` names.
pub fn combination(s: &str) -> Result<legora::nn::Combination, String> {
    s.parse().map_err(|e: legora::nn::NnError| e.to_string())
}

/// `--majority-sign-method`: `total` or `frequency`.
pub fn majority_sign_method(s: &str) -> Result<legora::nn::MajoritySignMethod, String> {
    s.parse().map_err(|e: legora::nn::NnError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_and_out_of_range_values_are_refused() {
        for bad in ["NaN", "nan", "inf", "-inf", "1e30", "x"] {
            assert!(adapter_weight(bad).is_err(), "{bad}");
            assert!(temperature(bad).is_err(), "{bad}");
        }
        assert!(top_p("0").is_err());
        assert!(repetition_penalty("0").is_err());
        assert!(token_count("0").is_err());
        assert_eq!(adapter_weight("-0.5"), Ok(-0.5));
        assert_eq!(temperature("0"), Ok(0.0));
        assert_eq!(token_count("64"), Ok(64));
    }
}
