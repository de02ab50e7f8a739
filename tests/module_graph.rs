//! The crate's modules import each other without cycles: the layering follows the
//! pipeline (data and model below training, the stages above, the CLI on top), and a
//! cycle is how it erodes (issue 18 removed `cli` ↔ `demo`/`pipeline`/`pretrain` and
//! `data::tokenizer` ↔ `model::hf`).
//!
//! The graph is read from the source text: every `use` tree and every inline path
//! that starts with `crate::`, `super::` or `self::` (outside comments, string
//! literals and `#[cfg(test)]` items), resolved to the file module it names. Checked
//! twice: between file modules (`data::tokenizer` → `model::hf`) and between the
//! crate's top-level modules (`data` → `model`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Edges between top-level modules that are known and being removed elsewhere: (from
/// file module, to file module, why). Nothing else may close a cycle.
const KNOWN_TOP_LEVEL_EDGES: [(&str, &str, &str); 0] = [];

/// Comments, string and char literals replaced by spaces (positions kept), so that
/// braces and paths are only the code's.
fn strip_comments_and_literals(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[char]| {
        for &ch in s {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
    };
    while i < c.len() {
        let rest = |k: usize| c.get(i + k).copied().unwrap_or('\0');
        if c[i] == '/' && rest(1) == '/' {
            let end = (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len());
            blank(&mut out, &c[i..end]);
            i = end;
        } else if c[i] == '/' && rest(1) == '*' {
            let (mut j, mut depth) = (i + 2, 1);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &c[i..j]);
            i = j;
        } else if (c[i] == 'r' || (c[i] == 'b' && rest(1) == 'r'))
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
            && {
                let s = if c[i] == 'b' { i + 2 } else { i + 1 };
                let h = (s..c.len()).take_while(|&j| c[j] == '#').count();
                c.get(s + h) == Some(&'"')
            }
        {
            // r"..", r#".."#, br".."
            let s = if c[i] == 'b' { i + 2 } else { i + 1 };
            let hashes = (s..c.len()).take_while(|&j| c[j] == '#').count();
            let mut j = s + hashes + 1;
            while j < c.len() {
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            blank(&mut out, &c[i..j.min(c.len())]);
            i = j;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(c.len());
            blank(&mut out, &c[i..end]);
            i = end;
        } else if c[i] == '\'' && (rest(1) == '\\' || (rest(1) != '\0' && rest(2) == '\'')) {
            // A char literal ('x', '\n', '\''); a lifetime ('a) has no closing quote.
            let mut j = if rest(1) == '\\' { i + 3 } else { i + 2 };
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            let end = (j + 1).min(c.len());
            blank(&mut out, &c[i..end]);
            i = end;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The index just past the item that starts at `from`: through its matching `}`, or
/// through its `;` when that comes first (outside brackets).
fn item_end(c: &[char], from: usize) -> usize {
    let mut depth = 0i32;
    let mut j = from;
    while j < c.len() {
        match c[j] {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ';' if depth == 0 => return j + 1,
            '{' if depth == 0 => {
                let mut braces = 0;
                while j < c.len() {
                    match c[j] {
                        '{' => braces += 1,
                        '}' => {
                            braces -= 1;
                            if braces == 0 {
                                return j + 1;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                return c.len();
            }
            _ => {}
        }
        j += 1;
    }
    c.len()
}

/// Removes every item under `#[cfg(test)]` (test modules, test-only imports).
fn strip_cfg_test(code: &str) -> String {
    let mut c: Vec<char> = code.chars().collect();
    let pat: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + pat.len() <= c.len() {
        if c[i..i + pat.len()] == pat[..] {
            let end = item_end(&c, i + pat.len());
            for ch in &mut c[i..end] {
                if *ch != '\n' {
                    *ch = ' ';
                }
            }
            i = end;
        } else {
            i += 1;
        }
    }
    c.into_iter().collect()
}

/// Every path a `use` tree names: `a::{b, c::{d, self}}` → a::b, a::c::d, a::c.
fn expand_use_tree(tree: &str) -> Vec<String> {
    fn go(prefix: &str, t: &str, out: &mut Vec<String>) {
        let t = t.trim();
        if let Some(open) = t.find('{') {
            let head = t[..open].trim().trim_end_matches("::");
            let inner = &t[open + 1..t.rfind('}').unwrap_or(t.len())];
            let prefix = join(prefix, head);
            let (mut depth, mut start) = (0, 0);
            let bytes: Vec<char> = inner.chars().collect();
            let mut parts = vec![];
            for (k, &ch) in bytes.iter().enumerate() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parts.push(bytes[start..k].iter().collect::<String>());
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            parts.push(bytes[start..].iter().collect());
            for p in parts {
                if !p.trim().is_empty() {
                    go(&prefix, &p, out);
                }
            }
        } else {
            let t = t.split(" as ").next().unwrap_or(t).trim();
            let t = t.trim_end_matches("::*").trim_end_matches('*');
            let path = if t == "self" {
                prefix.to_string()
            } else {
                join(prefix, t)
            };
            out.push(path);
        }
    }
    fn join(a: &str, b: &str) -> String {
        match (a.is_empty(), b.is_empty()) {
            (true, _) => b.to_string(),
            (_, true) => a.to_string(),
            _ => format!("{a}::{b}"),
        }
    }
    let mut out = vec![];
    go(
        "",
        &tree.split_whitespace().collect::<Vec<_>>().join(" "),
        &mut out,
    );
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// (position, path) of every path in stripped code that may name a module: the
/// expanded `use` trees, and the inline paths (`a::b`, not starting after `::`)
/// outside them. Which of them are the crate's modules is decided on resolution.
fn paths_in(code: &str) -> Vec<(usize, String)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = vec![];
    let mut in_use = vec![false; c.len()];
    let word_at = |i: usize, w: &str| -> bool {
        let wc: Vec<char> = w.chars().collect();
        c.len() >= i + wc.len()
            && c[i..i + wc.len()] == wc[..]
            && (i == 0 || !is_ident(c[i - 1]))
            && c.get(i + wc.len()).is_none_or(|&ch| !is_ident(ch))
    };
    for i in 0..c.len() {
        if word_at(i, "use") {
            let end = (i..c.len()).find(|&j| c[j] == ';').unwrap_or(c.len());
            let tree: String = c[i + 3..end].iter().collect();
            for p in expand_use_tree(&tree) {
                out.push((i, p));
            }
            in_use[i..end].iter_mut().for_each(|u| *u = true);
        }
    }
    let skip_ws = |mut k: usize| {
        while k < c.len() && c[k].is_whitespace() {
            k += 1;
        }
        k
    };
    for i in 0..c.len() {
        let starts_ident = (c[i].is_alphabetic() || c[i] == '_') && (i == 0 || !is_ident(c[i - 1]));
        if in_use[i] || !starts_ident {
            continue;
        }
        // Not the middle of a path: the code before it does not end in `::`.
        let before: String = c[..i]
            .iter()
            .rev()
            .skip_while(|ch| ch.is_whitespace())
            .take(2)
            .collect();
        if before == "::" {
            continue;
        }
        let mut j = i;
        while j < c.len() && is_ident(c[j]) {
            j += 1;
        }
        let mut path: String = c[i..j].iter().collect();
        loop {
            let k = skip_ws(j);
            if !(c.get(k) == Some(&':') && c.get(k + 1) == Some(&':')) {
                break;
            }
            let s = skip_ws(k + 2);
            let mut k = s;
            while k < c.len() && is_ident(c[k]) {
                k += 1;
            }
            if k == s {
                break; // `a::{` or `a::<T>`
            }
            path.push_str("::");
            path.extend(&c[s..k]);
            j = k;
        }
        if path.contains("::") {
            out.push((i, path));
        }
    }
    out
}

/// Spans of inline `mod name { .. }` blocks: (start, end, name), so that `super::`
/// inside one resolves from it.
fn inline_mods(code: &str) -> Vec<(usize, usize, String)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = vec![];
    for i in 0..c.len() {
        let is_mod = c[i..].starts_with(&['m', 'o', 'd'])
            && (i == 0 || !is_ident(c[i - 1]))
            && c.get(i + 3).is_some_and(|ch| ch.is_whitespace());
        if !is_mod {
            continue;
        }
        let mut j = i + 3;
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        let s = j;
        while j < c.len() && is_ident(c[j]) {
            j += 1;
        }
        let name: String = c[s..j].iter().collect();
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        if !name.is_empty() && c.get(j) == Some(&'{') {
            out.push((i, item_end(&c, j), name));
        }
    }
    out
}

/// File modules of a source tree: "data::tokenizer" → its file (lib.rs and main.rs,
/// the roots, are not nodes).
fn file_modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = vec![];
    walk(src, &mut files);
    let mut mods = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        mods.insert(parts.join("::"), f);
    }
    mods
}

/// The import graph between the file modules of `src`.
fn module_graph(src: &Path) -> Graph {
    let mods = file_modules(src);
    let mut graph = Graph::new();
    for (name, file) in &mods {
        let code = strip_cfg_test(&strip_comments_and_literals(
            &std::fs::read_to_string(file).unwrap(),
        ));
        let inline = inline_mods(&code);
        let here: Vec<&str> = name.split("::").collect();
        let targets = graph.entry(name.clone()).or_default();
        for (pos, path) in paths_in(&code) {
            let mut module: Vec<String> = here.iter().map(|s| s.to_string()).collect();
            module.extend(
                inline
                    .iter()
                    .filter(|(s, e, _)| *s < pos && pos < *e)
                    .map(|(_, _, n)| n.clone()),
            );
            let mut segs = path.split("::").peekable();
            let mut abs: Vec<String> = match segs.peek().copied() {
                Some("crate") | Some("$crate") => {
                    segs.next();
                    vec![]
                }
                Some("self") => {
                    segs.next();
                    module.clone()
                }
                Some("super") => module.clone(),
                // A child module by its bare name (`use advantage::gae;` in ppo);
                // anything else is an external crate or a type (`std::fs`,
                // `Tensor::new`).
                Some(first) if mods.contains_key(&format!("{}::{first}", module.join("::"))) => {
                    module.clone()
                }
                _ => continue,
            };
            for s in segs {
                if s == "super" {
                    abs.pop();
                } else {
                    abs.push(s.to_string());
                }
            }
            // The longest prefix that is a file module.
            let target = (1..=abs.len())
                .rev()
                .map(|k| abs[..k].join("::"))
                .find(|m| mods.contains_key(m));
            if let Some(t) = target {
                if &t != name {
                    targets.insert(t);
                }
            }
        }
    }
    graph
}

/// The graph between top-level modules, leaving out the given file-module edges.
fn top_level(graph: &Graph, skip: &[(&str, &str)]) -> Graph {
    let top = |m: &str| m.split("::").next().unwrap().to_string();
    let mut out = Graph::new();
    for (from, tos) in graph {
        for to in tos {
            if skip.contains(&(from.as_str(), to.as_str())) || top(from) == top(to) {
                continue;
            }
            out.entry(top(from)).or_default().insert(top(to));
        }
    }
    out
}

/// One cycle of the graph (as a path that returns to its start), if any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        v: &str,
        g: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(v.to_string(), Mark::Open);
        stack.push(v.to_string());
        for w in g.get(v).into_iter().flatten() {
            match marks.get(w).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let at = stack.iter().position(|s| s == w).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(w, g, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(v.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for v in graph.keys() {
        if marks.get(v).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(v, graph, &mut marks, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_crate_has_no_module_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    // The reader found the crate's modules and their imports.
    assert!(graph.len() > 30, "only {} modules found", graph.len());
    assert!(graph["ppo"].contains("ppo::advantage") && graph["cli"].contains("ppo"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module import cycle: {}", cycle.join(" → "));
    }
    let skip: Vec<(&str, &str)> = KNOWN_TOP_LEVEL_EDGES
        .iter()
        .map(|&(a, b, _)| (a, b))
        .collect();
    if let Some(cycle) = find_cycle(&top_level(&graph, &skip)) {
        panic!("top-level module import cycle: {}", cycle.join(" → "));
    }
}

/// The reader on a small crate with the forms the real one uses or might: grouped
/// `use` trees, `self` and `super`, a child module by its bare name, inline paths,
/// `$crate` in a macro, inline modules, and what it must ignore (comments, strings,
/// test-only items).
#[test]
fn the_reader_finds_cycles_through_every_kind_of_path() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path();
    let write = |rel: &str, text: &str| {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("lib.rs", "pub mod a; pub mod b; pub mod c;");
    write(
        "a/mod.rs",
        "pub mod x;\nuse crate::{b::{self, y::Z as W}, c};\n// use crate::c::gone;\nfn f() { x::h(); Vec::<u8>::new(); }\n",
    );
    write(
        "a/x.rs",
        "mod inner { fn f() { super::super::x::g(); } }\nfn h() { let s = \"crate::c::no\"; crate :: b :: y :: f(); }\n#[cfg(test)]\nmod tests { use crate::c; }\n",
    );
    write("b/mod.rs", "pub mod y;");
    write(
        "b/y.rs",
        "macro_rules! m { () => { $crate::c::k() }; }\nfn r() -> &'static str { let _c = 'x'; \"}\" }\n",
    );
    write("c.rs", "fn k() {}\n#[cfg(test)]\nuse crate::a::x;\n");
    let g = module_graph(src);
    let edges = |m: &str| -> Vec<&str> { g[m].iter().map(String::as_str).collect() };
    assert_eq!(edges("a"), ["a::x", "b", "b::y", "c"]);
    assert_eq!(
        edges("a::x"),
        ["b::y"],
        "strings, comments, tests, super into self"
    );
    assert_eq!(edges("b::y"), ["c"]);
    assert!(edges("c").is_empty(), "test-only imports are ignored");
    assert_eq!(find_cycle(&g), None);

    // One more import closes a cycle a → c → a::x → b::y → c... found in both views.
    write("c.rs", "use super::a::x::h;\n");
    let g = module_graph(src);
    let cycle = find_cycle(&g).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert!(cycle.contains(&"c".to_string()), "{cycle:?}");
    assert!(find_cycle(&top_level(&g, &[])).is_some());
    assert_eq!(find_cycle(&top_level(&g, &[("c", "a::x")])), None);
}
