//! Hashes the DSL's sources into `KILN_DSL_SOURCE_HASH`, so that kernels calling the DSL
//! key their tune-cache entries on it: an edited DSL function is tuned anew.

use std::path::Path;

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            visit(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    let mut files = Vec::new();
    visit(Path::new("src"), &mut files);
    files.sort();
    // FNV-1a over (path, contents) in path order: stable across machines and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in &files {
        let text = std::fs::read(f).unwrap_or_default();
        for b in f.to_string_lossy().bytes().chain(text) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=KILN_DSL_SOURCE_HASH={h:016x}");
}
