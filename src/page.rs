//! The live page served at `/`: edit bindings, connect, watch messages. One file
//! (`web/index.html`) compiled into the binary; no CDN, no external fetch.
//!
//! Every other response forbids scripts (`default-src 'none'`). The page's own inline
//! script and style are allowed by their SHA-256 hashes, computed once from the embedded
//! file, so nothing else can run on the page even if a message payload were rendered
//! carelessly.

use std::sync::LazyLock;

use base64::Engine;
use sha2::{Digest, Sha256};

/// The page.
pub const HTML: &str = include_str!("../web/index.html");

/// The Content-Security-Policy for the page.
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    let script = hash_between(HTML, "<script>", "</script>");
    let style = hash_between(HTML, "<style>", "</style>");
    format!(
        "default-src 'none'; script-src 'sha256-{script}'; style-src 'sha256-{style}'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
});

/// Base64 SHA-256 of the text between the first `open` and the next `close` tag.
fn hash_between(html: &str, open: &str, close: &str) -> String {
    let body = html
        .split_once(open)
        .and_then(|(_, rest)| rest.split_once(close))
        .map(|(inner, _)| inner)
        .unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style() {
        assert!(HTML.contains("new EventSource("));
        assert_eq!(HTML.matches("<script>").count(), 1);
        assert_eq!(HTML.matches("<style>").count(), 1);
        let csp = &*CSP;
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"));
        assert_eq!(
            hash_between("<script>abc</script>", "<script>", "</script>"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for needle in [
            "src=\"http",
            "src='http",
            "href=\"http",
            "href='http",
            "url(http",
            "@import",
            "<script src",
            "rel=\"stylesheet\"",
            "fetch('http",
            "fetch(\"http",
        ] {
            assert!(!HTML.contains(needle), "{needle}");
        }
    }
}
