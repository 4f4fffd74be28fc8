//! Where the agent's policy bundle comes from: `--policy DIR` (every `*.toml` in it, by
//! name), or the shipped default bundle `policies/default`, built into the binary.

use std::path::Path;

use anyhow::Context;

/// The shipped default bundle, as built into this binary.
pub const DEFAULT: [(&str, &str); 3] = [
    (
        "detection.toml",
        include_str!("../../../policies/default/detection.toml"),
    ),
    (
        "engine.toml",
        include_str!("../../../policies/default/engine.toml"),
    ),
    (
        "handlers.toml",
        include_str!("../../../policies/default/handlers.toml"),
    ),
];

/// The bundle's files as `(name, text)`, sorted by name.
pub fn files(dir: Option<&Path>) -> anyhow::Result<Vec<(String, String)>> {
    let Some(dir) = dir else {
        return Ok(DEFAULT
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect());
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("reading the policy directory {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            out.push((name, text));
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no *.toml policy file in {}",
        dir.display()
    );
    out.sort();
    Ok(out)
}
