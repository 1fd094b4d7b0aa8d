//! Deterministic generator of the finance plugin's sample data.
//!
//! `cargo run -p legora-plugin-finance --example gen_finance_data [OUT_DIR]` rewrites
//! `plugins/finance/data/` (or OUT_DIR); `tests/sample_data.rs` checks the
//! committed files match.
//!
//! Every answer is learnable from its prompt:
//! - `cuad/{train,test}.json` (SQuAD 2.0 layout): short contracts with a
//!   parties sentence and two of five clause kinds; four questions each: a
//!   party role (span before `("Role")`), the two present clauses (a span
//!   after a fixed cue phrase) and one absent clause (`is_impossible`).
//! - `transactions/{train,test}.csv`: fraud iff at least 3 of: amount > 500,
//!   hour <= 5, distance_km > 1000, category in {electronics, jewelry,
//!   gift_cards}, channel = online. About 30% fraud.
//! - `alpaca/{train,test}.json`: headline sentiment decided by the verb
//!   (surge/jump/... positive, plunge/slump/... negative, flat/steady neutral).

use std::collections::HashSet;
use std::fmt::Write as _;

/// SplitMix64.
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
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
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

const COMPANY_HEADS: &[&str] = &[
    "Acme", "Birch", "Cobalt", "Delta", "Everest", "Falcon", "Granite", "Harbor", "Ionic",
    "Juniper", "Keystone", "Lumen", "Meridian", "Nimbus", "Orion", "Pioneer", "Quartz", "Redwood",
    "Summit", "Titan", "Vertex", "Willow", "Zenith", "Atlas",
];
const COMPANY_TAILS: &[&str] = &[
    "Corp", "LLC", "Inc.", "Ltd", "Holdings", "Partners", "Group",
];

/// (agreement kind, first party role, second party role)
const AGREEMENTS: &[(&str, &str, &str)] = &[
    ("Supply Agreement", "Supplier", "Buyer"),
    ("License Agreement", "Licensor", "Licensee"),
    ("Services Agreement", "Provider", "Client"),
    ("Distribution Agreement", "Supplier", "Distributor"),
    ("Consulting Agreement", "Consultant", "Company"),
    ("Lease Agreement", "Landlord", "Tenant"),
];

const LAWS: &[&str] = &[
    "Delaware",
    "New York",
    "California",
    "Texas",
    "Nevada",
    "Illinois",
    "Florida",
    "Ontario",
    "England and Wales",
    "Washington",
];
const TERMS: &[&str] = &[
    "one (1) year",
    "two (2) years",
    "three (3) years",
    "five (5) years",
    "eighteen (18) months",
    "thirty-six (36) months",
];
const NOTICES: &[&str] = &[
    "thirty (30) days",
    "sixty (60) days",
    "ninety (90) days",
    "ten (10) business days",
    "fifteen (15) days",
];
const CAPS: &[&str] = &[
    "$250,000",
    "$500,000",
    "$1,000,000",
    "$2,000,000",
    "the fees paid in the prior 12 months",
];
const RENEWALS: &[&str] = &[
    "successive one-year terms",
    "additional two-year periods",
    "one further year",
    "successive 12-month periods",
];

/// A clause kind: (CUAD category, question phrasings, sentence templates with `{}` for the span, values).
struct Clause {
    category: &'static str,
    questions: &'static [&'static str],
    sentences: &'static [&'static str],
    values: &'static [&'static str],
}

const CLAUSES: &[Clause] = &[
    Clause {
        category: "Governing Law",
        questions: &[
            "Which law governs this contract?",
            "What is the governing law?",
            "Governing law?",
        ],
        sentences: &[
            "This Agreement is governed by the laws of {}.",
            "The laws of {} govern this Agreement.",
        ],
        values: LAWS,
    },
    Clause {
        category: "Expiration Date",
        questions: &[
            "What is the term of the agreement?",
            "How long does the agreement last?",
            "Term?",
        ],
        sentences: &[
            "The term is {} from the Effective Date.",
            "This Agreement remains in force for {}.",
        ],
        values: TERMS,
    },
    Clause {
        category: "Notice Period To Terminate",
        questions: &[
            "What notice is needed to terminate?",
            "Termination notice period?",
        ],
        sentences: &[
            "Either party may terminate on {} written notice.",
            "Termination requires {} prior notice.",
        ],
        values: NOTICES,
    },
    Clause {
        category: "Cap On Liability",
        questions: &["What is the liability cap?", "How is liability capped?"],
        sentences: &[
            "Liability is capped at {}.",
            "Total liability shall not exceed {}.",
        ],
        values: CAPS,
    },
    Clause {
        category: "Renewal Term",
        questions: &["How does the agreement renew?", "Renewal term?"],
        sentences: &[
            "It renews automatically for {}.",
            "The term auto-renews for {}.",
        ],
        values: RENEWALS,
    },
];

fn company(rng: &mut Rng) -> String {
    format!("{} {}", rng.pick(COMPANY_HEADS), rng.pick(COMPANY_TAILS))
}

fn answer(text: &str, context: &str) -> serde_json::Value {
    let byte = context.find(text).expect("span is in the context");
    let start = context[..byte].chars().count();
    serde_json::json!({"text": text, "answer_start": start})
}

/// One contract: (title, context, qas).
fn contract(rng: &mut Rng, n: usize) -> serde_json::Value {
    let (kind, role1, role2) = *rng.pick(AGREEMENTS);
    let p1 = company(rng);
    let mut p2 = company(rng);
    while p2 == p1 {
        p2 = company(rng);
    }
    let mut kinds: Vec<usize> = (0..CLAUSES.len()).collect();
    rng.shuffle(&mut kinds);
    let (present, absent) = (&kinds[..2], kinds[2]);
    let mut context = format!("This {kind} is between {p1} (\"{role1}\") and {p2} (\"{role2}\").");
    let mut spans = Vec::new();
    for &k in present {
        let clause = &CLAUSES[k];
        let value = *rng.pick(clause.values);
        let sentence = rng.pick(clause.sentences).replace("{}", value);
        context.push(' ');
        context.push_str(&sentence);
        spans.push((k, value));
    }
    let title = format!(
        "{}_{}_{n:04}",
        p1.split(' ').next().unwrap_or("X").to_uppercase(),
        kind.split(' ').next().unwrap_or("X").to_uppercase()
    );
    let mut qas = Vec::new();
    let (role, party) = if rng.below(2) == 0 {
        (role1, &p1)
    } else {
        (role2, &p2)
    };
    let question = if rng.below(2) == 0 {
        format!("Who is the {role}?")
    } else {
        format!("Which party is the {role}?")
    };
    qas.push(serde_json::json!({
        "id": format!("{title}__Parties"),
        "question": question,
        "answers": [answer(party, &context)],
        "is_impossible": false,
    }));
    for (k, value) in spans {
        let clause = &CLAUSES[k];
        qas.push(serde_json::json!({
            "id": format!("{title}__{}", clause.category),
            "question": *rng.pick(clause.questions),
            "answers": [answer(value, &context)],
            "is_impossible": false,
        }));
    }
    let clause = &CLAUSES[absent];
    qas.push(serde_json::json!({
        "id": format!("{title}__{}", clause.category),
        "question": *rng.pick(clause.questions),
        "answers": [],
        "is_impossible": true,
    }));
    serde_json::json!({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
}

fn cuad_file(articles: Vec<serde_json::Value>) -> String {
    // One article per line keeps the file diff-friendly and small.
    let mut s = String::from("{\"version\": \"cuad-synthetic-v1\", \"data\": [\n");
    let lines: Vec<String> = articles
        .iter()
        .map(|a| serde_json::to_string(a).expect("json"))
        .collect();
    s.push_str(&lines.join(",\n"));
    s.push_str("\n]}\n");
    s
}

const CATEGORIES: &[&str] = &[
    "grocery",
    "fuel",
    "restaurant",
    "pharmacy",
    "travel",
    "clothing",
    "utilities",
    "electronics",
    "jewelry",
    "gift_cards",
];
const RISKY: &[&str] = &["electronics", "jewelry", "gift_cards"];
const CHANNELS: &[&str] = &["chip", "swipe", "contactless", "online"];
const COUNTRIES: &[&str] = &[
    "US", "US", "US", "US", "CA", "GB", "DE", "FR", "MX", "BR", "NG", "RU", "CN", "IN",
];

fn risk(amount: f64, category: &str, channel: &str, hour: u32, distance: u32) -> u32 {
    u32::from(amount > 500.0)
        + u32::from(hour <= 5)
        + u32::from(distance > 1000)
        + u32::from(RISKY.contains(&category))
        + u32::from(channel == "online")
}

fn transaction(rng: &mut Rng, id: usize) -> String {
    let fraud = rng.unit() < 0.3;
    loop {
        // log-uniform amount between $2 and $3000
        let amount = (2.0f64.ln() + rng.unit() * (3000.0f64.ln() - 2.0f64.ln())).exp();
        let amount = (amount * 100.0).round() / 100.0;
        let category = *rng.pick(CATEGORIES);
        let channel = *rng.pick(CHANNELS);
        let country = *rng.pick(COUNTRIES);
        let hour = rng.range(0, 23);
        let distance = if rng.below(3) == 0 {
            rng.range(100, 9000)
        } else {
            rng.range(0, 60)
        };
        let r = risk(amount, category, channel, hour, distance);
        if (r >= 3) == fraud {
            return format!(
                "T{id:05},{amount:.2},{category},{channel},{country},{hour},{distance},{}",
                u8::from(fraud)
            );
        }
    }
}

fn csv_file(rows: &[String]) -> String {
    let mut s =
        String::from("txn_id,amount,merchant_category,channel,country,hour,distance_km,is_fraud\n");
    for r in rows {
        let _ = writeln!(s, "{r}");
    }
    s
}

const POS_VERBS: &[&str] = &["surge", "jump", "rally", "climb", "soar"];
const NEG_VERBS: &[&str] = &["plunge", "slump", "tumble", "sink", "slide"];
const NEUTRAL: &[&str] = &[
    "hold steady",
    "trade flat",
    "are little changed",
    "end unchanged",
];
const POS_EVENTS: &[&str] = &[
    "record revenue",
    "raised guidance",
    "a buyback plan",
    "strong loan growth",
    "a dividend hike",
];
const NEG_EVENTS: &[&str] = &[
    "a profit warning",
    "weak guidance",
    "a regulatory probe",
    "a loan loss charge",
    "a dividend cut",
];
const NEU_EVENTS: &[&str] = &[
    "mixed results",
    "an in-line quarter",
    "its investor day",
    "a CEO interview",
    "a rate decision",
];
const SENTIMENT_INSTRUCTIONS: &[&str] = &[
    "Classify the sentiment of this financial headline.",
    "Is this headline positive, negative or neutral?",
    "Give the market sentiment of the headline.",
];

fn headline(rng: &mut Rng) -> String {
    let sentiment = rng.below(3);
    let name = format!(
        "{} {}",
        rng.pick(COMPANY_HEADS),
        rng.pick(&["Bank", "Capital", "Energy", "Motors", "Foods", "Systems"])
    );
    let (text, label) = match sentiment {
        0 => (
            format!(
                "{name} shares {} {}% after {}",
                rng.pick(POS_VERBS),
                rng.range(2, 25),
                rng.pick(POS_EVENTS)
            ),
            "positive",
        ),
        1 => (
            format!(
                "{name} shares {} {}% after {}",
                rng.pick(NEG_VERBS),
                rng.range(2, 25),
                rng.pick(NEG_EVENTS)
            ),
            "negative",
        ),
        _ => (
            format!(
                "{name} shares {} after {}",
                rng.pick(NEUTRAL),
                rng.pick(NEU_EVENTS)
            ),
            "neutral",
        ),
    };
    format!(
        "  {{\"instruction\": {}, \"input\": {}, \"output\": \"{label}\"}}",
        serde_json::to_string(rng.pick(SENTIMENT_INSTRUCTIONS)).expect("json"),
        serde_json::to_string(&text).expect("json"),
    )
}

fn unique(n: usize, seen: &mut HashSet<String>, mut draw: impl FnMut() -> String) -> Vec<String> {
    let mut rows = Vec::with_capacity(n);
    while rows.len() < n {
        let row = draw();
        if seen.insert(row.clone()) {
            rows.push(row);
        }
    }
    rows
}

/// (file, train count, test count); cuad counts are questions (4 per contract).
pub const COUNTS: [(&str, usize, usize); 3] = [
    ("cuad", 640, 160),
    ("transactions", 800, 200),
    ("alpaca", 300, 80),
];

/// All sample files as (path relative to `data/`, contents).
pub fn generate() -> Vec<(String, String)> {
    let mut rng = Rng(0x4649_4E41_4E43_4501); // "FINANCE" + 1
    let mut files = Vec::new();

    let mut seen = HashSet::new();
    let mut n = 0;
    let mut contracts = |count: usize, rng: &mut Rng, seen: &mut HashSet<String>| {
        let mut out = Vec::new();
        while out.len() < count / 4 {
            n += 1;
            let c = contract(rng, n);
            if seen.insert(c["paragraphs"][0]["context"].to_string()) {
                out.push(c);
            }
        }
        out
    };
    let train = contracts(COUNTS[0].1, &mut rng, &mut seen);
    let test = contracts(COUNTS[0].2, &mut rng, &mut seen);
    files.push(("cuad/train.json".to_string(), cuad_file(train)));
    files.push(("cuad/test.json".to_string(), cuad_file(test)));

    let mut id = 0;
    let mut seen = HashSet::new();
    let mut draw = |count: usize, rng: &mut Rng| {
        unique(count, &mut seen, || {
            id += 1;
            transaction(rng, id)
        })
    };
    let train = draw(COUNTS[1].1, &mut rng);
    let test = draw(COUNTS[1].2, &mut rng);
    files.push(("transactions/train.csv".to_string(), csv_file(&train)));
    files.push(("transactions/test.csv".to_string(), csv_file(&test)));

    let mut seen = HashSet::new();
    let train = unique(COUNTS[2].1, &mut seen, || headline(&mut rng));
    let test = unique(COUNTS[2].2, &mut seen, || headline(&mut rng));
    files.push((
        "alpaca/train.json".to_string(),
        format!("[\n{}\n]\n", train.join(",\n")),
    ));
    files.push((
        "alpaca/test.json".to_string(),
        format!("[\n{}\n]\n", test.join(",\n")),
    ));
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
