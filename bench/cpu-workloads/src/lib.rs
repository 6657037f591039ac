//! The CPU workloads of `wasmq bench cpu`. The same functions run natively (in the bench
//! process) and as Wasm (the `cpu` plugin's tasks call them), so a row compares one program
//! compiled two ways.
//!
//! Each workload builds its own input from a size argument, deterministically, and returns a
//! small summary of its output (a count or a checksum): the bench measures computing, not
//! moving megabytes in and out of the sandbox, and checks that every build computed the
//! same answer.

use std::fmt::Write as _;

/// The workloads, by the name the `cpu` plugin's tasks carry (`cpu.<name>`), with the size
/// the bench runs each at (a few milliseconds natively on the reference machine).
pub const WORKLOADS: &[(&str, u32)] = &[
    ("fib", 30),
    ("markdown", 400),
    ("regex", 1024),
    ("json", 5000),
    ("sha256", 1024),
    ("sort", 100_000),
];

/// Runs workload `name` at `size`; `None` for an unknown name.
pub fn run(name: &str, size: u32) -> Option<u64> {
    Some(match name {
        "fib" => fib(size),
        "markdown" => markdown(size),
        "regex" => regex_scan(size),
        "json" => json_transform(size),
        "sha256" => sha256(size),
        "sort" => sort(size),
        _ => return None,
    })
}

/// The n-th Fibonacci number by naive recursion: calls and little else.
pub fn fib(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

/// A small pseudo-random generator (xorshift64*), so inputs are the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "queue", "worker", "sandbox", "tenant", "result", "broker", "message", "retry", "chord",
    "group", "limit", "memory", "fuel", "epoch", "plugin", "deploy", "signed", "release",
];

/// Renders a Markdown document of `sections` sections (headings, paragraphs with emphasis,
/// links and code, lists, a table, a code block) to HTML; returns the HTML's length.
pub fn markdown(sections: u32) -> u64 {
    let mut rng = Rng(0x5eed_0001);
    let mut doc = String::new();
    for section in 0..sections {
        let _ = writeln!(
            doc,
            "## Section {section}: the {}\n",
            WORDS[section as usize % WORDS.len()]
        );
        for _ in 0..3 {
            for w in 0..40 {
                let word = WORDS[rng.below(WORDS.len() as u64) as usize];
                match w % 9 {
                    3 => {
                        let _ = write!(doc, "*{word}* ");
                    }
                    5 => {
                        let _ = write!(doc, "[{word}](https://example.invalid/{word}/{w}) ");
                    }
                    7 => {
                        let _ = write!(doc, "`{word}()` ");
                    }
                    _ => {
                        let _ = write!(doc, "{word} ");
                    }
                }
            }
            doc.push_str("\n\n");
        }
        for item in 0..5 {
            let _ = writeln!(doc, "- item {item} with **{}**", WORDS[item % WORDS.len()]);
        }
        doc.push_str("\n| task | runs | p99 |\n|---|---:|---:|\n");
        for row in 0..4 {
            let _ = writeln!(
                doc,
                "| {} | {} | {} ms |",
                WORDS[row],
                rng.below(1000),
                rng.below(50)
            );
        }
        doc.push_str("\n```rust\nfn main() { println!(\"hello\"); }\n```\n\n");
    }
    let parser = pulldown_cmark::Parser::new_ext(&doc, pulldown_cmark::Options::all());
    let mut html = String::with_capacity(doc.len() * 2);
    pulldown_cmark::html::push_html(&mut html, parser);
    html.len() as u64
}

/// Scans `kib` KiB of generated log lines with three regexes (addresses, durations, and
/// an alternation of levels with a word); returns the number of matches.
pub fn regex_scan(kib: u32) -> u64 {
    let mut rng = Rng(0x5eed_0002);
    let target = kib as usize * 1024;
    let mut text = String::with_capacity(target + 200);
    while text.len() < target {
        let level = ["INFO", "WARN", "ERROR", "DEBUG"][rng.below(4) as usize];
        let _ = writeln!(
            text,
            "2026-12-02T01:{:02}:{:02}Z {level} task {} from 10.{}.{}.{} took {}ms ({} {})",
            rng.below(60),
            rng.below(60),
            rng.next() % 100_000,
            rng.below(256),
            rng.below(256),
            rng.below(256),
            rng.below(5000),
            WORDS[rng.below(WORDS.len() as u64) as usize],
            WORDS[rng.below(WORDS.len() as u64) as usize],
        );
    }
    let patterns = [
        r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
        r"took (\d+)ms",
        r"(?:ERROR|WARN) task \d+ .*\b(?:retry|memory|fuel)\b",
    ];
    let mut matches = 0;
    for pattern in patterns {
        let re = regex::Regex::new(pattern).expect("a valid pattern");
        matches += re.find_iter(&text).count() as u64;
    }
    matches
}

/// Parses a JSON array of `records` objects, filters, regroups and sums them, and
/// serializes the result; returns the output's length.
pub fn json_transform(records: u32) -> u64 {
    use serde_json::{Map, Value, json};
    let mut rng = Rng(0x5eed_0003);
    let input: Vec<Value> = (0..records)
        .map(|id| {
            json!({
                "id": id,
                "tenant": format!("tenant-{}", rng.below(20)),
                "task": WORDS[rng.below(WORDS.len() as u64) as usize],
                "runtime_ms": rng.below(10_000) as f64 / 10.0,
                "tags": [WORDS[rng.below(5) as usize], WORDS[rng.below(5) as usize + 5]],
                "ok": rng.below(10) != 0,
            })
        })
        .collect();
    let text = serde_json::to_string(&input).expect("serializable");

    let parsed: Vec<Value> = serde_json::from_str(&text).expect("valid JSON");
    let mut by_tenant: Map<String, Value> = Map::new();
    for record in parsed.iter().filter(|r| r["ok"] == Value::Bool(true)) {
        let tenant = record["tenant"].as_str().unwrap_or_default().to_owned();
        let entry = by_tenant
            .entry(tenant)
            .or_insert_with(|| json!({"runs": 0, "runtime_ms": 0.0, "tasks": {}}));
        entry["runs"] = json!(entry["runs"].as_u64().unwrap_or(0) + 1);
        let runtime = entry["runtime_ms"].as_f64().unwrap_or(0.0)
            + record["runtime_ms"].as_f64().unwrap_or(0.0);
        entry["runtime_ms"] = json!(runtime);
        let task = record["task"].as_str().unwrap_or_default();
        let count = entry["tasks"][task].as_u64().unwrap_or(0) + 1;
        entry["tasks"][task] = json!(count);
    }
    serde_json::to_string(&by_tenant)
        .expect("serializable")
        .len() as u64
}

/// SHA-256 of `kib` KiB of generated bytes; returns the digest's first 8 bytes.
pub fn sha256(kib: u32) -> u64 {
    use sha2::Digest;
    let mut rng = Rng(0x5eed_0004);
    let mut data = vec![0_u8; kib as usize * 1024];
    for chunk in data.chunks_mut(8) {
        let bytes = rng.next().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let digest = sha2::Sha256::digest(&data);
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Sorts `n` generated integers (unstable sort, then a stable sort by a derived key);
/// returns a checksum of the order.
pub fn sort(n: u32) -> u64 {
    let mut rng = Rng(0x5eed_0005);
    let mut values: Vec<u64> = (0..n).map(|_| rng.next()).collect();
    values.sort_unstable();
    let mut checksum = values.iter().enumerate().fold(0_u64, |sum, (i, v)| {
        sum.wrapping_mul(31).wrapping_add(v ^ i as u64)
    });
    values.sort_by_key(|v| v % 1000);
    checksum ^= values[values.len() / 2];
    checksum
}
