//! Checks the crate's module layout: no two sibling modules import each
//! other, and the imports between the children of any one module form no
//! circle. Reads the sources and follows every `crate::` and `super::` path
//! outside comments (items a child takes from its own parent, and a
//! parent's uses of its children, are not sibling imports).
//!
//! `cargo test -p ridge-dataplane --lib module_graph -- --nocapture` prints
//! the graph; with `RIDGE_MODULE_GRAPH_SRC=<dir>` it reads another source
//! tree (an older checkout, say) instead of this crate's `src`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type ModPath = Vec<String>;

/// Every module file under `src` (the binary's `main.rs` aside), by module
/// path.
fn modules(src: &Path) -> BTreeMap<ModPath, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<ModPath, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read src")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                let mut sub = prefix.to_vec();
                sub.push(name);
                walk(&p, &sub, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut path = prefix.to_vec();
                match stem {
                    "main" if prefix.is_empty() => continue,
                    "lib" | "mod" => {}
                    _ => path.push(stem.to_owned()),
                }
                out.insert(path, std::fs::read_to_string(&p).expect("read module"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The module paths `text` (the source of module `here`) names through
/// `crate::` or `super::`, resolved to the deepest module they reach.
fn imports(here: &ModPath, text: &str, known: &BTreeSet<ModPath>) -> BTreeSet<ModPath> {
    let mut out = BTreeSet::new();
    let mut base = here.clone();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        // Inside the unit tests, `super` is the file's own module.
        if code.starts_with("mod tests") {
            base = here.clone();
            base.push("tests".into());
        }
        let bytes = code.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let rest = &bytes[i..];
            let boundary =
                i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            // Inside a string literal (an odd number of quotes before it).
            let quoted = bytes[..i].iter().filter(|b| **b == b'"').count() % 2 == 1;
            let root = if !boundary || quoted {
                None
            } else if rest.starts_with(b"crate::") {
                Some((Vec::new(), "crate::".len()))
            } else if rest.starts_with(b"super::") {
                let mut at = base.clone();
                let mut len = 0;
                while bytes[i + len..].starts_with(b"super::") {
                    at.pop();
                    len += "super::".len();
                }
                Some((at, len))
            } else {
                None
            };
            let Some((mut at, len)) = root else {
                i += 1;
                continue;
            };
            // Both ends are ASCII, so char boundaries.
            let path: String = bytes[i + len..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b':')
                .map(|c| char::from(*c))
                .collect();
            assert!(
                !(path.is_empty() && bytes[i + len..].starts_with(b"{")),
                "{here:?}: write `crate::a::{{..}}`, not `crate::{{..}}`: {line}"
            );
            for seg in path.split("::").filter(|s| !s.is_empty()) {
                let mut next = at.clone();
                next.push(seg.to_owned());
                if !known.contains(&next) {
                    break;
                }
                at = next;
            }
            out.insert(at);
            i += len + path.len().max(1);
        }
    }
    out
}

/// Sibling edges: parent module → (importing child → imported children).
type Edges = BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>>;

fn sibling_edges() -> Edges {
    let src = std::env::var_os("RIDGE_MODULE_GRAPH_SRC")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let files = modules(&src);
    let known: BTreeSet<ModPath> = files.keys().cloned().collect();
    let mut edges = Edges::new();
    for (here, text) in &files {
        for to in imports(here, text, &known) {
            let common = here.iter().zip(&to).take_while(|(a, b)| a == b).count();
            // A module's own items, its ancestors' and its descendants'.
            if common == here.len() || common == to.len() {
                continue;
            }
            edges
                .entry(here[..common].to_vec())
                .or_default()
                .entry(here[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    edges
}

fn name(parent: &ModPath) -> String {
    std::iter::once("crate".to_owned())
        .chain(parent.iter().cloned())
        .collect::<Vec<_>>()
        .join("::")
}

#[test]
#[allow(clippy::print_stdout, reason = "`--nocapture` shows the graph")]
fn no_sibling_modules_import_each_other() {
    let edges = sibling_edges();
    let mut bad = Vec::new();
    for (parent, children) in &edges {
        println!("{}:", name(parent));
        for (from, tos) in children {
            let tos: Vec<&str> = tos.iter().map(String::as_str).collect();
            println!("  {from} -> {}", tos.join(", "));
            for to in tos {
                if children.get(to).is_some_and(|back| back.contains(from)) && from.as_str() < to {
                    bad.push(format!("{}: {from} <-> {to}", name(parent)));
                }
            }
        }
    }
    assert!(bad.is_empty(), "siblings importing each other: {bad:?}");
}

#[test]
fn sibling_imports_form_no_circle() {
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| *s == n) {
            let mut circle: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
            circle.push(n.to_owned());
            return Some(circle);
        }
        if !done.insert(n) {
            return None;
        }
        stack.push(n);
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    for (parent, children) in &sibling_edges() {
        let mut done = BTreeSet::new();
        for start in children.keys() {
            let circle = visit(start, children, &mut Vec::new(), &mut done);
            assert!(
                circle.is_none(),
                "{}: import circle {:?}",
                name(parent),
                circle
            );
        }
    }
}
