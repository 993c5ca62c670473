//! The module graph of vm-core reads bottom-up: each top-level module uses
//! only modules of lower layers (so there are no import cycles), and the
//! plug-in traits (`pmap`, `pager`) sit below everything that runs faults.
//!
//! This test reads the crate's sources, collects every `crate::…` path
//! (and `super::` paths that reach the crate root, and names the root
//! re-exports), and checks them against the layers below. A new module
//! must be given a layer here; a use that goes upwards fails with the file
//! and the module it reached.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may use modules of lower layers
/// only. This is the architecture the crate docs describe.
const LAYERS: &[&[&str]] = &[
    // Vocabulary: addresses, protections, memory attributes, frame access,
    // locks.
    &[
        "addr",
        "prot",
        "mem_attr",
        "frame",
        "sync",
        "io_executor",
        "daemon",
    ],
    // The page record and the counters.
    &["page", "counters"],
    // Physical memory and the page array with its queues.
    &["phys", "page_queues"],
    &["frames"],
    // The plug-in traits.
    &["pmap", "pager"],
    // Objects (with the machine-wide state they share and busy guards);
    // the host file I/O pagers use.
    &["object", "file_io"],
    &["error"],
    &["map"],
    // The machine: pmap, objects, memory, configuration.
    &["vm"],
    // Machine operations on objects.
    &["collapse", "clean", "balloon", "zeroing"],
    &["pageout"],
    // The fault handler, over a machine, a map and a pmap space.
    &["fault"],
    // Address spaces: map, unmap, protect, wire, hold, fork, msync.
    &["space"],
    // Whole-machine checks; loom models (test-only).
    &["check", "loom_protocols"],
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments (line and block); string contents are
/// kept, which is harmless for the paths looked for.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first identifiers of the items of a `{…}` group (`s` starts after
/// the `{`), at nesting depth 0.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut at_item_start = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item_start = true,
            c if at_item_start && (c.is_ascii_alphabetic() || c == '_') && depth == 0 => {
                heads.push(ident_at(&s[i..]).to_string());
                at_item_start = false;
            }
            _ => {}
        }
    }
    heads
}

/// Every first path segment after `prefix` in `src`.
fn heads_after(src: &str, prefix: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut from = 0;
    while let Some(i) = src[from..].find(prefix) {
        let at = from + i;
        from = at + prefix.len();
        // `prefix` must start a path, not end an identifier.
        let before = src[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &src[from..];
        if let Some(group) = rest.strip_prefix('{') {
            heads.extend(group_heads(group));
        } else {
            let id = ident_at(rest);
            if !id.is_empty() {
                heads.push(id.to_string());
            }
        }
    }
    heads
}

/// Names the crate root re-exports, with the module each comes from.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let lib = strip_comments(lib);
    for stmt in lib.split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = ident_at(path).to_string();
        let tail = &path[module.len()..];
        let names: Vec<String> = match tail.find('{') {
            Some(i) => tail[i + 1..]
                .split(',')
                .map(|n| ident_at(n.trim()).to_string())
                .collect(),
            None => vec![tail.rsplit("::").next().unwrap_or("").trim().to_string()],
        };
        for n in names.into_iter().filter(|n| !n.is_empty()) {
            map.insert(n, module.clone());
        }
    }
    map
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Top-level module → (file, used module) for every use of another module.
fn module_uses() -> BTreeMap<String, BTreeSet<(String, String)>> {
    let src = src_dir();
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut uses: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let parts: Vec<&str> = rel
            .iter()
            .map(|p| p.to_str().expect("utf-8 path"))
            .collect();
        if parts == ["lib.rs"] {
            continue;
        }
        let top = parts[0].trim_end_matches(".rs").to_string();
        let text = strip_comments(&std::fs::read_to_string(&file).expect("read source"));
        // The path that names the crate root from this file.
        let in_mod_rs = parts.last() == Some(&"mod.rs");
        let root_via_super = match (parts.len(), in_mod_rs) {
            (1, _) => "super::",
            (2, true) => "super::",
            (2, false) => "super::super::",
            (n, true) => &*"super::".repeat(n - 1).leak(),
            (n, false) => &*"super::".repeat(n).leak(),
        };
        let mut heads = heads_after(&text, "crate::");
        heads.extend(heads_after(&text, root_via_super));
        let entry = uses.entry(top.clone()).or_default();
        for head in heads {
            let module = if layer_of(&head).is_some() {
                head
            } else if let Some(m) = reexports.get(&head) {
                m.clone()
            } else {
                continue;
            };
            if module != top {
                entry.insert((rel.display().to_string(), module));
            }
        }
    }
    uses
}

#[test]
fn every_module_has_a_layer() {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let src = src_dir();
    let missing: BTreeSet<String> = files
        .iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(&src).ok()?;
            let top = rel.iter().next()?.to_str()?.trim_end_matches(".rs");
            (top != "lib" && layer_of(top).is_none()).then(|| top.to_string())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules with no layer in LAYERS: {missing:?}"
    );
}

#[test]
fn modules_use_only_lower_layers() {
    let uses = module_uses();
    let mut upward = Vec::new();
    for (module, used) in &uses {
        let Some(mine) = layer_of(module) else {
            continue;
        };
        for (file, other) in used {
            let theirs = layer_of(other).expect("only layered modules are recorded");
            if theirs >= mine {
                upward.push(format!("{file} uses `{other}` (layer {theirs} ≥ {mine})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "uses that do not go downwards:\n{}",
        upward.join("\n")
    );
}

/// The scanner itself sees grouped, nested and root-re-exported uses, so
/// the check above cannot pass by seeing nothing.
#[test]
fn the_scanner_sees_every_form_of_use() {
    let text = strip_comments(
        "use crate::{a::B, c, d::{e, f}};\n// use crate::hidden;\nlet x = crate::g::h();\n\
         /* crate::also_hidden */ fn y() -> crate::Vm {}",
    );
    let heads = heads_after(&text, "crate::");
    assert_eq!(heads, ["a", "c", "d", "g", "Vm"]);
    let lib = "pub use space::{MapRequest, VmSpace};\npub use vm::Vm;";
    let map = root_reexports(lib);
    assert_eq!(map.get("VmSpace").map(String::as_str), Some("space"));
    assert_eq!(map.get("Vm").map(String::as_str), Some("vm"));
    // The real crate: the fault layer is known to use the map.
    let uses = module_uses();
    assert!(uses["fault"].iter().any(|(_, m)| m == "map"));
    assert!(uses["space"].iter().any(|(_, m)| m == "fault"));
}
