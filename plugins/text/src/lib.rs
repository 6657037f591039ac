//! `text`: string tasks, one of which uses a real crate (pulldown-cmark) inside the sandbox.

use wasmq_sdk::{TaskContext, task};

/// Counts the words (runs of non-whitespace) in a text.
#[task]
fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}

/// Turns a title into a URL slug: lowercase ASCII letters and digits joined by `-`.
#[task]
fn slugify(text: String) -> String {
    let mut slug = String::with_capacity(text.len());
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    while slug.ends_with('-') {
        slug.pop();
    }
    slug
}

/// Renders CommonMark (with tables and strikethrough) to HTML using pulldown-cmark.
#[task(memory = "64MiB", timeout = "10s")]
fn markdown(ctx: &TaskContext, source: String) -> String {
    let options =
        pulldown_cmark::Options::ENABLE_TABLES | pulldown_cmark::Options::ENABLE_STRIKETHROUGH;
    let parser = pulldown_cmark::Parser::new_ext(&source, options);
    let mut html = String::with_capacity(source.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut html, parser);
    ctx.info(&format!("rendered {} bytes of markdown", source.len()));
    ctx.update_state(
        "RENDERED",
        &wasmq_sdk::serde_json::json!({ "input_bytes": source.len(), "html_bytes": html.len() }),
    );
    html
}

wasmq_sdk::export_tasks!(word_count, slugify, markdown);
