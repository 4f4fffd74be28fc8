//! Which key source a Mayfly data directory uses, read from its files (nothing is unsealed
//! and no TPM is asked): `signing.sealed` (and `signing.sealed.alt`) is the TPM source,
//! `signing.key` the file source. Reported by `mayfly hw-check` beside the hardware checks,
//! so an operator sees a production host that has a TPM but still keeps its key in a file.

use std::path::Path;

use serde::Serialize;

/// What the data directory says about the ledger's signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySourceFact {
    /// `tpm`, `file`, `none` (no key yet) or `unreadable`.
    pub source: &'static str,
    /// For people: the files found, the PCRs the key is sealed to.
    pub detail: String,
}

/// Reads the key source of the data directory `dir`.
pub fn key_source(dir: &Path) -> KeySourceFact {
    let sealed = dir.join("signing.sealed");
    let alt = dir.join("signing.sealed.alt");
    if sealed.exists() || alt.exists() {
        let mut parts = Vec::new();
        for path in [&sealed, &alt] {
            if !path.exists() {
                continue;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match mayfly_tpm::SealedBlob::read(path) {
                Ok(b) => {
                    let pcrs: Vec<String> = b.pcrs.iter().map(|p| p.0.to_string()).collect();
                    let states = match b.states().len() {
                        1 => String::new(),
                        n => format!(" ({n} boot states)"),
                    };
                    parts.push(format!("{name} sealed to PCRs {}{states}", pcrs.join(",")));
                }
                Err(e) => {
                    return KeySourceFact {
                        source: "unreadable",
                        detail: e.to_string(),
                    }
                }
            }
        }
        return KeySourceFact {
            source: "tpm",
            detail: format!("{} in {}", parts.join("; "), dir.display()),
        };
    }
    if dir.join("signing.key").exists() {
        return KeySourceFact {
            source: "file",
            detail: format!(
                "{}: the private key is a file (anyone with the data partition can sign)",
                dir.join("signing.key").display()
            ),
        };
    }
    KeySourceFact {
        source: "none",
        detail: format!("no signing key in {}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(key_source(dir.path()).source, "none");
        std::fs::write(dir.path().join("signing.key"), b"k").unwrap();
        assert_eq!(key_source(dir.path()).source, "file");
        let blob = mayfly_tpm::SealedBlob {
            public_key: [0; 32],
            pcrs: vec![(7, [0; 32]), (9, [0; 32])],
            more: vec![vec![[1; 32], [2; 32]]],
            tpm_public: vec![1],
            tpm_private: vec![2],
        };
        blob.write(&dir.path().join("signing.sealed")).unwrap();
        let f = key_source(dir.path());
        assert_eq!(f.source, "tpm");
        assert!(
            f.detail.contains("PCRs 7,9 (2 boot states)"),
            "{}",
            f.detail
        );
        std::fs::write(dir.path().join("signing.sealed.alt"), b"garbage").unwrap();
        assert_eq!(key_source(dir.path()).source, "unreadable");
    }
}
