//! Deterministic generator of the medical plugin's sample data.
//!
//! `cargo run -p legora-plugin-medical --example gen_medical_data [OUT_DIR]` rewrites
//! `plugins/medical/data/` (or OUT_DIR). The files are a pure function of the
//! seed below; `tests/sample_data.rs` checks the committed files match.
//!
//! Every answer is learnable from its prompt: each condition has its own
//! symptoms (no symptom is shared), and each condition maps to one specialty.
//! - `medqa/{train,test}.jsonl`: 3 of a condition's 4 symptoms in a vignette,
//!   five options (the condition + 4 others), answer letter uniform over A..E.
//! - `notes/{train,test}.jsonl`: a terse note (age/sex, 2 symptoms, vitals,
//!   history) → "<age>-year-old <sex> with <s1> and <s2>, suggestive of <condition>."
//! - `alpaca/{train,test}.json`: referral to the condition's specialty.

use std::fmt::Write as _;

/// SplitMix64: small, seedable, good enough for sampling templates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

struct Condition {
    name: &'static str,
    specialty: &'static str,
    symptoms: [&'static str; 4],
}

#[rustfmt::skip]
const CONDITIONS: &[Condition] = &[
    Condition { name: "pneumonia", specialty: "pulmonology", symptoms: ["fever", "productive cough", "pleuritic chest pain", "crackles on auscultation"] },
    Condition { name: "asthma", specialty: "pulmonology", symptoms: ["wheezing", "night cough", "chest tightness", "dyspnea after exercise"] },
    Condition { name: "myocardial infarction", specialty: "cardiology", symptoms: ["crushing chest pain", "cold sweats", "pain radiating to the left arm", "jaw pain"] },
    Condition { name: "heart failure", specialty: "cardiology", symptoms: ["orthopnea", "ankle edema", "exertional dyspnea", "rapid weight gain"] },
    Condition { name: "migraine", specialty: "neurology", symptoms: ["throbbing one-sided headache", "photophobia", "visual aura", "vomiting"] },
    Condition { name: "stroke", specialty: "neurology", symptoms: ["facial droop", "arm weakness", "slurred speech", "sudden confusion"] },
    Condition { name: "appendicitis", specialty: "surgery", symptoms: ["right lower quadrant pain", "anorexia", "low-grade fever", "rebound tenderness"] },
    Condition { name: "cholecystitis", specialty: "surgery", symptoms: ["right upper quadrant pain", "pain after fatty meals", "positive Murphy sign", "shoulder tip pain"] },
    Condition { name: "gout", specialty: "rheumatology", symptoms: ["swollen big toe", "red hot joint", "night joint pain", "tophi on the ear"] },
    Condition { name: "rheumatoid arthritis", specialty: "rheumatology", symptoms: ["morning stiffness", "symmetric hand swelling", "ulnar deviation", "wrist pain"] },
    Condition { name: "hypothyroidism", specialty: "endocrinology", symptoms: ["cold intolerance", "dry skin", "constipation", "hair thinning"] },
    Condition { name: "hyperthyroidism", specialty: "endocrinology", symptoms: ["heat intolerance", "fine tremor", "weight loss", "palpitations"] },
    Condition { name: "type 2 diabetes", specialty: "endocrinology", symptoms: ["polyuria", "polydipsia", "blurred vision", "slow-healing cuts"] },
    Condition { name: "iron deficiency anemia", specialty: "hematology", symptoms: ["pallor", "pica", "spoon nails", "fatigue on exertion"] },
    Condition { name: "B12 deficiency", specialty: "hematology", symptoms: ["numb feet", "sore red tongue", "unsteady gait", "memory lapses"] },
    Condition { name: "urinary tract infection", specialty: "urology", symptoms: ["dysuria", "urinary frequency", "suprapubic pain", "cloudy urine"] },
    Condition { name: "kidney stone", specialty: "urology", symptoms: ["colicky flank pain", "hematuria", "pain radiating to the groin", "restlessness"] },
    Condition { name: "GERD", specialty: "gastroenterology", symptoms: ["heartburn", "sour taste", "cough when lying down", "regurgitation"] },
    Condition { name: "peptic ulcer", specialty: "gastroenterology", symptoms: ["epigastric pain", "pain relieved by food", "black stools", "early satiety"] },
    Condition { name: "cellulitis", specialty: "dermatology", symptoms: ["spreading red skin", "warm swollen leg", "tender skin", "chills"] },
    Condition { name: "psoriasis", specialty: "dermatology", symptoms: ["silvery scaly plaques", "nail pitting", "itchy elbows", "scalp flakes"] },
    Condition { name: "major depression", specialty: "psychiatry", symptoms: ["low mood", "anhedonia", "early waking", "poor concentration"] },
    Condition { name: "generalized anxiety", specialty: "psychiatry", symptoms: ["constant worry", "muscle tension", "restless sleep", "irritability"] },
];

const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];
const HISTORY: &[&str] = &[
    "none", "HTN", "DM2", "asthma", "HLD", "CKD", "smoker", "obesity",
];

fn sex(rng: &mut Rng) -> (&'static str, &'static str) {
    if rng.below(2) == 0 {
        ("man", "M")
    } else {
        ("woman", "F")
    }
}

/// "An" before ages read with a leading vowel sound (8, 11, 18, 80-89).
fn a_an(age: u32) -> &'static str {
    if age == 8 || age == 11 || age == 18 || (80..90).contains(&age) {
        "An"
    } else {
        "A"
    }
}

fn three_symptoms(rng: &mut Rng, c: &Condition) -> Vec<&'static str> {
    let mut s = c.symptoms.to_vec();
    rng.shuffle(&mut s);
    s.truncate(3);
    s
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn medqa_row(rng: &mut Rng) -> String {
    let ci = rng.below(CONDITIONS.len());
    let c = &CONDITIONS[ci];
    let s = three_symptoms(rng, c);
    let age = rng.range(18, 85);
    let (noun, _) = sex(rng);
    let question = match rng.below(4) {
        0 => format!(
            "{} {age}-year-old {noun} presents with {}, {} and {}. What is the most likely diagnosis?",
            a_an(age), s[0], s[1], s[2]
        ),
        1 => format!(
            "{} {age}-year-old {noun} reports {}, {} and {}. Which diagnosis is most likely?",
            a_an(age), s[0], s[1], s[2]
        ),
        2 => format!(
            "A {noun} aged {age} has {}, {} and {}. Most likely diagnosis?",
            s[0], s[1], s[2]
        ),
        _ => format!(
            "{} {age}-year-old {noun} has had {} and {} for {} days, plus {}. What is the diagnosis?",
            a_an(age),
            s[0],
            s[1],
            rng.range(2, 14),
            s[2]
        ),
    };
    let mut others: Vec<usize> = (0..CONDITIONS.len()).filter(|&i| i != ci).collect();
    rng.shuffle(&mut others);
    let answer_pos = rng.below(5);
    let mut options = Vec::new();
    let mut k = 0;
    for (pos, letter) in LETTERS.iter().enumerate() {
        let name = if pos == answer_pos {
            c.name
        } else {
            k += 1;
            CONDITIONS[others[k - 1]].name
        };
        options.push(format!("{}: {}", json_str(letter), json_str(name)));
    }
    format!(
        "{{\"question\": {}, \"options\": {{{}}}, \"answer_idx\": \"{}\", \"answer\": {}}}",
        json_str(&question),
        options.join(", "),
        LETTERS[answer_pos],
        json_str(c.name)
    )
}

fn note_row(rng: &mut Rng, id: usize) -> String {
    let c = rng.pick(CONDITIONS);
    let s = three_symptoms(rng, c);
    let age = rng.range(18, 85);
    let (noun, letter) = sex(rng);
    let hr = rng.range(58, 124);
    let sys = rng.range(98, 172);
    let dia = rng.range(58, 104);
    let temp = format!("{}.{}", rng.range(36, 39), rng.range(0, 9));
    let pmh = rng.pick(HISTORY);
    let days = rng.range(1, 10);
    let note = match rng.below(3) {
        0 => format!(
            "{age}{letter}. CC: {}, {} x{days}d. HR {hr}, BP {sys}/{dia}, T {temp}. PMH: {pmh}.",
            s[0], s[1]
        ),
        1 => format!(
            "Pt is a {age} yo {letter} c/o {} and {}. Vitals: HR {hr}, BP {sys}/{dia}. Hx {pmh}.",
            s[0], s[1]
        ),
        _ => format!(
            "{age} y/o {letter}, {days} days of {} with {}. T {temp}, HR {hr}. PMH {pmh}.",
            s[0], s[1]
        ),
    };
    let summary = format!(
        "{age}-year-old {noun} with {} and {}, suggestive of {}.",
        s[0], s[1], c.name
    );
    format!(
        "{{\"id\": \"note-{id:04}\", \"note\": {}, \"summary\": {}}}",
        json_str(&note),
        json_str(&summary)
    )
}

fn alpaca_item(rng: &mut Rng) -> String {
    const INSTRUCTIONS: &[&str] = &[
        "Which specialty should see this patient?",
        "Refer this patient to the right specialty.",
        "Name the specialty that should manage this case.",
        "Triage this patient to a specialty.",
    ];
    let c = rng.pick(CONDITIONS);
    let s = three_symptoms(rng, c);
    let age = rng.range(18, 85);
    let (noun, _) = sex(rng);
    let input = if rng.below(2) == 0 {
        format!("{age}-year-old {noun} with {} and {}.", s[0], s[1])
    } else {
        format!("{noun}, {age}, reports {}, {} and {}.", s[0], s[1], s[2])
    };
    let input = capitalize(&input);
    let instruction = rng.pick::<&str>(INSTRUCTIONS);
    format!(
        "  {{\"instruction\": {}, \"input\": {}, \"output\": {}}}",
        json_str(instruction),
        json_str(&input),
        json_str(c.specialty)
    )
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(f) => f.to_uppercase().collect::<String>() + chars.as_str(),
        None => String::new(),
    }
}

/// Draws `n` rows, skipping any already in `seen` (so test rows never repeat
/// train rows).
fn unique_rows(
    n: usize,
    seen: &mut std::collections::HashSet<String>,
    mut draw: impl FnMut() -> String,
) -> Vec<String> {
    let mut rows = Vec::with_capacity(n);
    while rows.len() < n {
        let row = draw();
        let key = row.split("\"note\"").nth(1).unwrap_or(&row).to_string();
        if seen.insert(key) {
            rows.push(row);
        }
    }
    rows
}

fn jsonl(rows: &[String]) -> String {
    let mut s = String::new();
    for r in rows {
        let _ = writeln!(s, "{r}");
    }
    s
}

fn json_array(rows: &[String]) -> String {
    format!("[\n{}\n]\n", rows.join(",\n"))
}

/// Number of (train, test) rows per file.
pub const COUNTS: [(&str, usize, usize); 3] =
    [("medqa", 400, 100), ("notes", 250, 60), ("alpaca", 250, 60)];

/// All sample files as (path relative to `data/`, contents).
pub fn generate() -> Vec<(String, String)> {
    let mut rng = Rng(0x4D45_4449_4341_4C01); // "MEDICAL" + 1
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (_, tr, te) = COUNTS[0];
    let train = unique_rows(tr, &mut seen, || medqa_row(&mut rng));
    let test = unique_rows(te, &mut seen, || medqa_row(&mut rng));
    files.push(("medqa/train.jsonl".to_string(), jsonl(&train)));
    files.push(("medqa/test.jsonl".to_string(), jsonl(&test)));
    let (_, tr, te) = COUNTS[1];
    let mut id = 0;
    let train = unique_rows(tr, &mut seen, || {
        id += 1;
        note_row(&mut rng, id)
    });
    let test = unique_rows(te, &mut seen, || {
        id += 1;
        note_row(&mut rng, id)
    });
    files.push(("notes/train.jsonl".to_string(), jsonl(&train)));
    files.push(("notes/test.jsonl".to_string(), jsonl(&test)));
    let (_, tr, te) = COUNTS[2];
    let train = unique_rows(tr, &mut seen, || alpaca_item(&mut rng));
    let test = unique_rows(te, &mut seen, || alpaca_item(&mut rng));
    files.push(("alpaca/train.json".to_string(), json_array(&train)));
    files.push(("alpaca/test.json".to_string(), json_array(&test)));
    files
}

#[allow(dead_code)]
fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data"));
    for (rel, contents) in generate() {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, contents)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
