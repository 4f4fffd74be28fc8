//! Human tables for the console's answers (`mayfly admin …` without `--json`).

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn short(v: &Value) -> String {
    let full = s(v);
    if full.len() > 16 {
        format!("{}…", &full[..16])
    } else {
        full
    }
}

/// Prints a table with a header row; columns sized to their content.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

fn kv(rows: &[(&str, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}

/// Prints the result of `command`.
pub fn print(command: &str, r: &Value) {
    match command {
        "status" => {
            let p = &r["pool"];
            let c = &r["chains"];
            kv(&[
                ("backend", s(&r["backend"])),
                (
                    "pool",
                    format!(
                        "{} ready, {} in use, {} created, {} destroyed, {} failed",
                        s(&p["ready"]),
                        s(&p["in_use"]),
                        s(&p["created"]),
                        s(&p["destroyed"]),
                        s(&p["failed"])
                    ),
                ),
                (
                    "checkpoints",
                    format!(
                        "{} (head {})",
                        s(&c["checkpoints"]["seq"]),
                        s(&c["checkpoints"]["hash"])
                    ),
                ),
                (
                    "audit",
                    format!(
                        "{} (head {})",
                        s(&c["audit"]["seq"]),
                        s(&c["audit"]["hash"])
                    ),
                ),
                ("signed group", s(&c["group"])),
                ("epoch", s(&c["epoch"])),
                ("identity key", s(&r["identity_key"])),
                ("signing key", s(&r["signing_key"])),
                ("key source", key_source(&r["key"])),
                ("policy hash", s(&r["policy_hash"])),
                ("quarantined", s(&r["quarantined"])),
                (
                    "admins",
                    format!(
                        "{} key(s), quorum {}",
                        s(&r["admin"]["keys"]),
                        s(&r["admin"]["quorum"])
                    ),
                ),
            ]);
            let repl = &r["replication"];
            if repl.is_object() {
                println!(
                    "replication   {} ({} mode), standby {}, acked group {} of {}{}",
                    s(&repl["state"]),
                    s(&repl["mode"]),
                    s(&repl["standby"]),
                    s(&repl["acked_group"]),
                    s(&repl["durable_group"]),
                    repl["degraded_reason"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                if let Some(lost) = repl["peer_lost"].as_str() {
                    println!("              peer lost: {lost}");
                }
            }
            let collectors = r["exporters"]["collectors"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if collectors.is_empty() {
                println!("exporters     no exporters configured");
            } else {
                println!();
                let rows: Vec<Vec<String>> = collectors
                    .iter()
                    .map(|c| {
                        vec![
                            s(&c["name"]),
                            s(&c["transport"]),
                            s(&c["delivered_seq"]),
                            s(&c["lag"]),
                            s(&c["last_error"]),
                        ]
                    })
                    .collect();
                table(
                    &["exporter", "transport", "delivered", "lag", "last error"],
                    &rows,
                );
            }
        }
        "tx.list" | "checkpoint.list" => {
            let rows: Vec<Vec<String>> = r["records"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|x| {
                    vec![
                        s(&x["seq"]),
                        s(&x["kind"]),
                        s(&x["tx_id"]),
                        s(&x["handler"]),
                        s(&x["reads"]),
                        s(&x["writes"]),
                        short(&x["policy_hash"]),
                    ]
                })
                .collect();
            table(
                &["seq", "kind", "id", "handler", "reads", "writes", "policy"],
                &rows,
            );
            println!("({} shown, chain tip {})", rows.len(), s(&r["tip"]));
        }
        "tx.show" | "checkpoint.show" => {
            let mut rows = vec![
                ("seq", s(&r["seq"])),
                ("kind", s(&r["kind"])),
                ("id", s(&r["tx_id"])),
                ("handler", s(&r["handler"])),
            ];
            for k in [
                "domain_id",
                "request",
                "result",
                "reason",
                "roots",
                "affected",
                "policy_hash",
                "prev_hash",
                "rolled_back_by",
            ] {
                if !r[k].is_null() {
                    rows.push((k, s(&r[k])));
                }
            }
            kv(&rows);
            if let Some(reads) = r["read_set"].as_array() {
                println!();
                let rows: Vec<Vec<String>> = reads
                    .iter()
                    .map(|x| vec![s(&x["key"]), s(&x["version"])])
                    .collect();
                table(&["read key", "version"], &rows);
            }
            if let Some(writes) = r["write_set"].as_array() {
                println!();
                let rows: Vec<Vec<String>> = writes
                    .iter()
                    .map(|x| {
                        vec![
                            s(&x["key"]),
                            s(&x["before_version"]),
                            s(&x["before"]),
                            s(&x["after"]),
                        ]
                    })
                    .collect();
                table(&["written key", "before version", "before", "after"], &rows);
            }
        }
        "verify" => {
            if r["ok"] == Value::Bool(true) {
                println!(
                    "OK: {} checkpoints, {} audit records, {} signed heads ({} key rotation(s)) verified on the appliance in {} ms; trusted key {}",
                    s(&r["checkpoints"]),
                    s(&r["audit"]),
                    s(&r["heads"]),
                    s(&r["rotations"]),
                    s(&r["elapsed_ms"]),
                    s(&r["trusted_key"])
                );
            } else {
                for f in r["failures"].as_array().cloned().unwrap_or_default() {
                    println!("FAILED: {}", s(&f));
                }
            }
        }
        "rollback" => {
            let dry = r["dry_run"] == Value::Bool(true);
            kv(&[
                (
                    "mode",
                    if dry {
                        "dry run (nothing changed)".into()
                    } else {
                        "applied".into()
                    },
                ),
                ("roots", s(&r["roots"])),
                ("affected", s(&r["affected"])),
                ("to replay", s(&r["replay"])),
                ("rollback record", s(&r["rollback_seq"])),
            ]);
            let restored = r["restored"].as_array().cloned().unwrap_or_default();
            if !restored.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = restored
                    .iter()
                    .map(|x| vec![s(&x["key"]), s(&x["before"]), s(&x["after"])])
                    .collect();
                table(&["key", "now", "restored to"], &rows);
            }
            let replayed = r["replayed"].as_array().cloned().unwrap_or_default();
            if !replayed.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = replayed
                    .iter()
                    .map(|x| {
                        vec![
                            s(&x["original_seq"]),
                            s(&x["status"]),
                            s(&x["seq"]),
                            s(&x["same_result"]),
                        ]
                    })
                    .collect();
                table(&["replayed", "status", "new seq", "same result"], &rows);
            }
        }
        "policy.load" => kv(&[
            ("policy hash", s(&r["policy_hash"])),
            ("files", s(&r["files"])),
        ]),
        "quarantine.list" => {
            let rows: Vec<Vec<String>> = r["quarantined"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|x| vec![s(&x["domain"]), s(&x["backend"]), s(&x["handle"])])
                .collect();
            if rows.is_empty() {
                println!("no quarantined domains");
            } else {
                table(&["domain", "backend", "handle"], &rows);
            }
        }
        "quarantine.release" => kv(&[("domain", s(&r["domain"])), ("released", s(&r["exit"]))]),
        "audit.export" => kv(&[
            ("exported", s(&r["exported"])),
            ("range", format!("{}..={}", s(&r["from"]), s(&r["to"]))),
        ]),
        "attest" => kv(&[
            ("head group", s(&r["head_group"])),
            ("attestation key", s(&r["quote"]["ak"])),
        ]),
        "key.rotate" => kv(&[
            ("old signing key", s(&r["old_key"])),
            ("new signing key", s(&r["new_key"])),
            ("rotation head", format!("group {}", s(&r["group"]))),
            ("identity key", s(&r["identity_key"])),
        ]),
        "update.install" => kv(&[
            ("written to slot", s(&r["slot"])),
            ("version", s(&r["version"])),
            ("bundle bytes", s(&r["bundle_bytes"])),
            (
                "next boot",
                format!(
                    "slot {} on trial ({} tries, then back to slot {})",
                    s(&r["slot"]),
                    s(&r["tries"]),
                    s(&r["fallback_slot"])
                ),
            ),
        ]),
        "breakglass.open" => kv(&[
            ("console", s(&r["tty"])),
            ("open for", format!("{} minutes", s(&r["minutes"]))),
        ]),
        "update.status" => kv(&[
            ("booted slot", s(&r["booted_slot"])),
            ("committed slot", s(&r["committed_slot"])),
            ("trial slot", s(&r["trial_slot"])),
            ("trial tries left", s(&r["trial_tries_left"])),
            ("image version", s(&r["image_version"])),
            ("version floor", s(&r["version_floor"])),
        ]),
        _ => println!("{r}"),
    }
}

/// `file`, or `tpm (tcti ..., PCRs 7,8,9, sealed_file ...)`.
fn key_source(k: &Value) -> String {
    let Some(obj) = k.as_object() else {
        return "unknown (agent too old)".into();
    };
    let source = obj.get("source").and_then(Value::as_str).unwrap_or("?");
    let rest: Vec<String> = obj
        .iter()
        .filter(|(name, _)| *name != "source")
        .map(|(name, v)| format!("{name} {}", v.as_str().unwrap_or("?")))
        .collect();
    if rest.is_empty() {
        source.to_owned()
    } else {
        format!("{source} ({})", rest.join(", "))
    }
}
