//! Deterministic generator of the game-NPC plugin's sample data.
//!
//! `cargo run -p legora-plugin-game-npc --example gen_game_npc_data [OUT_DIR]`
//! rewrites `plugins/game-npc/data/` (or OUT_DIR); `tests/sample_data.rs`
//! checks the committed files match.
//!
//! - `cards/<first>_<last>.json`: 24 Character Card V2 files. Each persona
//!   has a race, a role with three wares, a home town, two traits, a
//!   catchphrase (also listed in `extensions.legora.markers`) and a rumor.
//! - `dialogues/{train,test}.jsonl`: 30 / 8 dialogues per character, one or
//!   two user turns from ten intents. Every reply opens with the
//!   character's catchphrase and is filled only with facts from the card
//!   (name, role, town, wares, first trait, rumor), so it is learnable from
//!   the persona prompt; the "are you an AI?" intent teaches staying in role.

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
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const FIRST: [&str; 24] = [
    "Brom", "Lyra", "Tamsin", "Orrin", "Sela", "Gorrik", "Wren", "Fennick", "Mira", "Dorran",
    "Isolde", "Kaelen", "Pip", "Ysolda", "Harrow", "Nessa", "Grutha", "Alaric", "Juno", "Corvin",
    "Elsbeth", "Rook", "Talia", "Bramble",
];
const LAST: [&str; 24] = [
    "Ironfist",
    "Moonwhisper",
    "Ashdown",
    "Blackbriar",
    "Quickwater",
    "Stonehelm",
    "Fairwind",
    "Copperpot",
    "Duskmantle",
    "Greenhollow",
    "Thornbury",
    "Saltbeard",
    "Emberly",
    "Frostvale",
    "Oakbarrel",
    "Nightingale",
    "Hammerfall",
    "Brightwater",
    "Mossfoot",
    "Redfern",
    "Winterbourne",
    "Goldleaf",
    "Cinderby",
    "Marsh",
];
/// (role, wares)
const ROLES: [(&str, [&str; 3]); 12] = [
    ("blacksmith", ["axes", "chain mail", "horseshoes"]),
    (
        "herbalist",
        ["healing salves", "dried sage", "sleeping draughts"],
    ),
    ("innkeeper", ["hot stew", "warm beds", "spiced cider"]),
    ("fishmonger", ["smoked eels", "salted cod", "fresh crab"]),
    (
        "alchemist",
        ["fire potions", "mercury vials", "glowing elixirs"],
    ),
    (
        "guard captain",
        ["city passes", "wanted posters", "armed escorts"],
    ),
    ("bard", ["love songs", "lute lessons", "tavern ballads"]),
    ("merchant", ["silk scarves", "spice jars", "brass lamps"]),
    ("hunter", ["wolf pelts", "venison", "hunting bows"]),
    ("librarian", ["old maps", "spell tomes", "local histories"]),
    ("baker", ["honey bread", "berry tarts", "oat cakes"]),
    (
        "ferryman",
        ["river crossings", "fishing trips", "coils of rope"],
    ),
];
const RACES: [&str; 6] = ["dwarf", "elf", "human", "halfling", "orc", "gnome"];
const PLACES: [&str; 12] = [
    "Emberforge",
    "Silverglade",
    "Oakhollow",
    "Saltmere",
    "Frostgate",
    "Duskvale",
    "Ravenmoor",
    "Sunreach",
    "Stonebridge",
    "Mistwood",
    "Goldport",
    "Thornfield",
];
const TRAITS: [&str; 12] = [
    "gruff", "cheerful", "nervous", "proud", "sly", "wise", "grumpy", "shy", "boastful", "kind",
    "stern", "dreamy",
];
const CATCHPHRASES: [&str; 24] = [
    "Hmph.",
    "Oh, my stars!",
    "By my beard!",
    "Heh heh.",
    "Mark my words.",
    "Well, well.",
    "Blessed be.",
    "Aye, aye.",
    "Hah!",
    "Oh dear, oh dear.",
    "Truly, truly.",
    "Splendid!",
    "Curses!",
    "Ho there!",
    "Mmm, yes.",
    "Indeed.",
    "Gah!",
    "Listen close.",
    "Hmm, hmm.",
    "Right then.",
    "Oho!",
    "Ugh, fine.",
    "Yarr!",
    "By the tides!",
];
const RUMORS: [&str; 24] = [
    "wolves prowl the north road",
    "the old mill is haunted",
    "a dragon sleeps under the hill",
    "the baron hides gold in the well",
    "smugglers use the sea caves",
    "the mayor owes the guild money",
    "a witch lives in the marsh",
    "the bridge will fall by winter",
    "a comet means war",
    "the king is gravely ill",
    "elves were seen at the ford",
    "the mine struck silver",
    "bandits rob the east caravans",
    "the lighthouse keeper vanished",
    "the temple bell rang at midnight",
    "goblins stole the harvest",
    "a giant crossed the pass",
    "the river turned red at dawn",
    "a knight seeks a lost sword",
    "the inn has a secret cellar",
    "the ferry sank last spring",
    "pirates anchor off the cape",
    "the wizard's tower is empty",
    "a bear guards the old road",
];

struct Character {
    first: &'static str,
    name: String,
    role: &'static str,
    wares: [&'static str; 3],
    race: &'static str,
    place: &'static str,
    traits: [&'static str; 2],
    catchphrase: &'static str,
    rumor: &'static str,
}

fn characters() -> Vec<Character> {
    (0..24)
        .map(|i| {
            let (role, wares) = ROLES[i % 12];
            let t1 = TRAITS[i % 12];
            let mut t2 = TRAITS[(i * 5 + 3) % 12];
            if t2 == t1 {
                t2 = TRAITS[(i + 1) % 12];
            }
            Character {
                first: FIRST[i],
                name: format!("{} {}", FIRST[i], LAST[i]),
                role,
                wares,
                race: RACES[(i * 7 + i / 12) % 6],
                place: PLACES[(i * 5 + 1) % 12],
                traits: [t1, t2],
                catchphrase: CATCHPHRASES[i],
                rumor: RUMORS[i],
            }
        })
        .collect()
}

fn marker(catchphrase: &str) -> String {
    catchphrase.trim_end_matches(['.', '!', '?']).to_string()
}

fn card(c: &Character) -> String {
    let [w1, w2, w3] = c.wares;
    let card = serde_json::json!({
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": c.name,
            "description": format!("A {} {} in {}. Sells {w1}, {w2} and {w3}.", c.race, c.role, c.place),
            "personality": format!("{}, {}. Always says \"{}\"", c.traits[0], c.traits[1], c.catchphrase),
            "scenario": format!("Rumor has it {}.", c.rumor),
            "first_mes": format!("{} Welcome to {}. I am {{{{char}}}}.", c.catchphrase, c.place),
            "mes_example": format!(
                "<START>\n{{{{user}}}}: What do you sell?\n{{{{char}}}}: {} I have {w1}, {w2} and {w3}.\n<START>\n{{{{user}}}}: Any news?\n{{{{char}}}}: {} They say {}.",
                c.catchphrase, c.catchphrase, c.rumor
            ),
            "creator_notes": "Synthetic persona generated for legora's sample data.",
            "system_prompt": "",
            "post_history_instructions": "",
            "alternate_greetings": [],
            "tags": [c.role, c.race, c.place],
            "creator": "legora",
            "character_version": "1.0",
            "extensions": {"legora": {"markers": [marker(c.catchphrase)]}},
        }
    });
    serde_json::to_string_pretty(&card).expect("json") + "\n"
}

/// One user line and the reply for an intent.
fn exchange(rng: &mut Rng, c: &Character, intent: usize) -> (String, String) {
    let cp = c.catchphrase;
    let [w1, w2, w3] = c.wares;
    match intent {
        0 => (
            rng.pick(&["Hello!", "Hi there.", "Good day.", "Greetings."])
                .to_string(),
            format!("{cp} Welcome to {}, traveler.", c.place),
        ),
        1 => (
            rng.pick(&["Who are you?", "What's your name?", "And you are?"])
                .to_string(),
            format!("{cp} I am {}, the {} of {}.", c.first, c.role, c.place),
        ),
        2 => (
            rng.pick(&[
                "What do you sell?",
                "Got anything for sale?",
                "Show me your goods.",
            ])
            .to_string(),
            format!("{cp} I have {w1}, {w2} and {w3}."),
        ),
        3 => {
            let w = *rng.pick(&c.wares);
            let q = if rng.below(2) == 0 {
                format!("Tell me about the {w}.")
            } else {
                format!("Are the {w} any good?")
            };
            (q, format!("{cp} The {w}? Finest in {}.", c.place))
        }
        4 => (
            rng.pick(&["Heard any rumors?", "Any news?", "What's the gossip?"])
                .to_string(),
            format!("{cp} They say {}.", c.rumor),
        ),
        5 => (
            rng.pick(&["Where am I?", "What town is this?"]).to_string(),
            format!("{cp} This is {}, friend.", c.place),
        ),
        6 => (
            rng.pick(&["What do you do?", "What is your trade?"])
                .to_string(),
            format!("{cp} I am a {}. I sell {w1}.", c.role),
        ),
        7 => (
            rng.pick(&["How are you?", "How are you today?"])
                .to_string(),
            format!("{cp} I feel {} today, as always.", c.traits[0]),
        ),
        8 => (
            rng.pick(&["Are you an AI?", "Are you a chatbot?", "Is this a game?"])
                .to_string(),
            format!("{cp} Strange words. I am {} of {}.", c.first, c.place),
        ),
        _ => (
            rng.pick(&["Goodbye.", "Farewell!", "See you later."])
                .to_string(),
            format!("{cp} Safe travels, traveler."),
        ),
    }
}

fn dialogue(rng: &mut Rng, c: &Character) -> String {
    let turns = if rng.below(100) < 35 { 2 } else { 1 };
    let mut messages = Vec::new();
    let first = rng.below(10);
    let mut intents = vec![first];
    if turns == 2 {
        let mut second = rng.below(10);
        while second == first {
            second = rng.below(10);
        }
        intents.push(second);
    }
    for intent in intents {
        let (user, reply) = exchange(rng, c, intent);
        messages.push(serde_json::json!({"role": "user", "content": user}));
        messages.push(serde_json::json!({"role": "assistant", "content": reply}));
    }
    serde_json::to_string(&serde_json::json!({"character": c.name, "messages": messages}))
        .expect("json")
}

/// Dialogues per character in (train, test).
pub const PER_CHARACTER: (usize, usize) = (30, 8);

/// All sample files as (path relative to `data/`, contents).
pub fn generate() -> Vec<(String, String)> {
    let mut rng = Rng(0x4E50_4344_4941_4C01); // "NPCDIAL" + 1
    let cast = characters();
    let mut files = Vec::new();
    for c in &cast {
        let file = format!("cards/{}.json", c.name.to_lowercase().replace(' ', "_"));
        files.push((file, card(c)));
    }
    let mut seen = HashSet::new();
    let (mut train, mut test) = (String::new(), String::new());
    for (count, out) in [(PER_CHARACTER.0, &mut train), (PER_CHARACTER.1, &mut test)] {
        for c in &cast {
            let mut made = 0;
            while made < count {
                let row = dialogue(&mut rng, c);
                if seen.insert(row.clone()) {
                    let _ = writeln!(out, "{row}");
                    made += 1;
                }
            }
        }
    }
    files.push(("dialogues/train.jsonl".to_string(), train));
    files.push(("dialogues/test.jsonl".to_string(), test));
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
