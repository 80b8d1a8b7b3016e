//! AMQP topic matching, as RabbitMQ's topic exchange does it, so that one broker queue
//! bound with the union of many patterns can be routed in-process.
//!
//! Semantics (checked against the real broker in `tests/gateway/topic.rs`):
//! - keys and patterns are split on `.` into words; empty words are words (`a..b` has three);
//!   the empty string has no words at all;
//! - `*` matches exactly one word, `#` matches zero or more words.
//!
//! The trie is walked with memoisation on `#` nodes, so hostile patterns such as
//! `#.a.#.a.#…` cost at most O(nodes × words²) per key instead of exponential time.

use std::collections::{HashMap, HashSet};

/// Splits a routing key or pattern into words the way RabbitMQ does.
pub fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// A set of topic patterns, each carrying values of type `V`.
#[derive(Debug)]
pub struct TopicTrie<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    words: HashMap<Box<str>, Node<V>>,
    star: Option<Box<Node<V>>>,
    hash: Option<Box<Node<V>>>,
    values: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: PartialEq> TopicTrie<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (pattern, value) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under `pattern`.
    pub fn insert(&mut self, pattern: &str, value: V) {
        let mut node = &mut self.root;
        for word in words(pattern) {
            node = match word {
                "*" => node.star.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        node.values.push(value);
        self.len += 1;
    }

    /// Removes one entry equal to `value` under `pattern`; prunes emptied nodes.
    /// Returns whether an entry was removed.
    pub fn remove(&mut self, pattern: &str, value: &V) -> bool {
        let removed = remove_in(&mut self.root, &words(pattern), value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` with every value, whatever its pattern.
    pub fn for_each<'a>(&'a self, f: &mut impl FnMut(&'a V)) {
        fn go<'a, V>(node: &'a Node<V>, f: &mut impl FnMut(&'a V)) {
            node.values.iter().for_each(&mut *f);
            node.words.values().for_each(|c| go(c, f));
            if let Some(c) = node.star.as_deref() {
                go(c, f);
            }
            if let Some(c) = node.hash.as_deref() {
                go(c, f);
            }
        }
        go(&self.root, f);
    }

    /// Calls `found` with every value whose pattern matches `key`. A value can be reported
    /// more than once if several of its patterns match; callers de-duplicate.
    pub fn matches<'a>(&'a self, key: &str, found: &mut impl FnMut(&'a V)) {
        let key = words(key);
        let mut seen = HashSet::new();
        walk(&self.root, &key, 0, &mut seen, found);
    }
}

fn remove_in<V: PartialEq>(node: &mut Node<V>, pattern: &[&str], value: &V) -> bool {
    let Some((first, rest)) = pattern.split_first() else {
        let Some(i) = node.values.iter().position(|v| v == value) else {
            return false;
        };
        node.values.swap_remove(i);
        return true;
    };
    match *first {
        "*" | "#" => {
            let slot = if *first == "*" {
                &mut node.star
            } else {
                &mut node.hash
            };
            let Some(child) = slot.as_deref_mut() else {
                return false;
            };
            let removed = remove_in(child, rest, value);
            if child.is_empty() {
                *slot = None;
            }
            removed
        }
        w => {
            let Some(child) = node.words.get_mut(w) else {
                return false;
            };
            let removed = remove_in(child, rest, value);
            if child.is_empty() {
                node.words.remove(w);
            }
            removed
        }
    }
}

fn walk<'a, V>(
    node: &'a Node<V>,
    key: &[&str],
    i: usize,
    seen: &mut HashSet<(*const Node<V>, usize)>,
    found: &mut impl FnMut(&'a V),
) {
    if let Some(hash) = node.hash.as_deref() {
        // `#` swallows zero or more words: continue after it from every later position.
        for j in i..=key.len() {
            if seen.insert((hash as *const Node<V>, j)) {
                walk(hash, key, j, seen, found);
            }
        }
    }
    if i == key.len() {
        node.values.iter().for_each(&mut *found);
        return;
    }
    if let Some(child) = node.words.get(key[i]) {
        walk(child, key, i + 1, seen, found);
    }
    if let Some(star) = node.star.as_deref() {
        walk(star, key, i + 1, seen, found);
    }
}

/// A direct, slow implementation of the same semantics, for tests and fuzzing.
#[cfg(test)]
pub fn reference_match(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|j| go(rest, &k[j..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..]),
        }
    }
    go(&words(pattern), &words(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching(patterns: &[&str], key: &str) -> Vec<usize> {
        let mut trie = TopicTrie::new();
        for (i, p) in patterns.iter().enumerate() {
            trie.insert(p, i);
        }
        let mut out = Vec::new();
        trie.matches(key, &mut |v| out.push(*v));
        out.sort_unstable();
        out.dedup();
        out
    }

    const PATTERNS: &[&str] = &[
        "#", "*", "", "a", "a.*", "a.#", "#.b", "*.b", "a.*.c", "a.#.c", "#.#", "a..b", "*.*", ".",
        "a.", ".a", "#.*", "*.#", "#.a.#", "a.*.#", "*.#.*", "a.b.c", "#.c",
    ];
    const KEYS: &[&str] = &[
        "", "a", "b", "a.b", "a.b.c", "a.c", "a..b", ".", "..", "a.", ".a", "x.a.y", "a.x.y.c",
        "a.a.a.a", "c", "b.b",
    ];

    #[test]
    fn trie_agrees_with_reference() {
        for key in KEYS {
            let expected: Vec<usize> = (0..PATTERNS.len())
                .filter(|&i| reference_match(PATTERNS[i], key))
                .collect();
            assert_eq!(matching(PATTERNS, key), expected, "key {key:?}");
        }
    }

    #[test]
    fn rabbitmq_edge_cases() {
        assert!(reference_match("#", ""));
        assert!(!reference_match("*", ""));
        assert!(reference_match("", ""));
        assert!(reference_match("*.*", "."));
        assert!(reference_match("a.*.b", "a..b"));
        assert!(reference_match("#.#", "a.b"));
        assert!(!reference_match("a", "a."));
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut trie = TopicTrie::new();
        trie.insert("a.#", 1);
        trie.insert("a.#", 2);
        trie.insert("*.b", 3);
        assert_eq!(trie.len(), 3);
        assert!(trie.remove("a.#", &1));
        assert!(!trie.remove("a.#", &1));
        assert!(!trie.remove("a.b", &2));
        assert!(trie.remove("a.#", &2));
        assert!(trie.remove("*.b", &3));
        assert!(trie.is_empty());
        assert!(trie.root.is_empty());
    }

    #[test]
    fn hostile_patterns_stay_fast() {
        let pattern = vec!["#"; 60].join(".a.");
        let key = vec!["a"; 128].join(".");
        let mut trie = TopicTrie::new();
        trie.insert(&pattern, 0);
        let mut n = 0;
        trie.matches(&key, &mut |_| n += 1);
        assert!(n >= 1);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn word() -> impl Strategy<Value = String> {
            prop_oneof![Just("a"), Just("b"), Just(""), Just("ab")].prop_map(str::to_owned)
        }

        fn key() -> impl Strategy<Value = String> {
            proptest::collection::vec(word(), 0..6).prop_map(|w| w.join("."))
        }

        fn pattern() -> impl Strategy<Value = String> {
            let token = prop_oneof![word(), Just("*".to_owned()), Just("#".to_owned())];
            proptest::collection::vec(token, 0..6).prop_map(|w| w.join("."))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// The trie agrees with the direct definition on random patterns and keys.
            #[test]
            fn trie_agrees_with_the_reference(
                patterns in proptest::collection::vec(pattern(), 1..12),
                keys in proptest::collection::vec(key(), 1..12),
            ) {
                let mut trie = TopicTrie::new();
                for (i, p) in patterns.iter().enumerate() {
                    trie.insert(p, i);
                }
                for k in &keys {
                    let mut got = Vec::new();
                    trie.matches(k, &mut |v| got.push(*v));
                    got.sort_unstable();
                    got.dedup();
                    let expected: Vec<usize> = (0..patterns.len())
                        .filter(|&i| reference_match(&patterns[i], k))
                        .collect();
                    prop_assert_eq!(got, expected, "key {:?}", k);
                }
                for (i, p) in patterns.iter().enumerate() {
                    prop_assert!(trie.remove(p, &i));
                }
                prop_assert!(trie.is_empty());
            }

            /// Arbitrary text never panics the matcher.
            #[test]
            fn any_text_is_safe(p in ".{0,64}", k in ".{0,64}") {
                let mut trie = TopicTrie::new();
                trie.insert(&p, 0);
                trie.matches(&k, &mut |_| {});
            }
        }
    }
}
