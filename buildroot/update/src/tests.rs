//! Install and boot-check against temporary files standing in for the slots, the EFI
//! partition and the data partition.

use super::*;
use crate::bundle::tests::{bundle, key};
use ring::signature::KeyPair;

struct Rig {
    _dir: tempfile::TempDir,
    sys: System,
    slot_b: PathBuf,
    bundle: PathBuf,
    /// Every switch the install asked to re-seal the signing key for.
    resealed: std::cell::RefCell<Vec<Switch>>,
    /// Whether that re-seal fails.
    reseal_fails: std::cell::Cell<bool>,
}

const SLOT_SIZE: usize = 64 << 10;

fn rig(booted: Slot, env: &[(&str, &str)]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let esp = dir.path().join("esp");
    fs::create_dir_all(esp.join("EFI/BOOT")).unwrap();
    let mut e = GrubEnv::default();
    for (n, v) in env {
        e.set(n, v);
    }
    fs::write(esp.join(GRUBENV), e.serialize().unwrap()).unwrap();
    let slot_b = dir.path().join("root-b");
    fs::write(&slot_b, vec![0xeeu8; SLOT_SIZE]).unwrap();
    let mut update_key = [0u8; 32];
    update_key.copy_from_slice(key().public_key().as_ref());
    let sys = System {
        cmdline: format!("console=hvc0 root=PARTUUID={} ro", booted.uuid()),
        image_version: 5,
        update_key,
        state_dir: dir.path().join("state"),
        esp,
    };
    let bundle = dir.path().join("update.bundle");
    Rig {
        _dir: dir,
        sys,
        slot_b,
        bundle,
        resealed: std::cell::RefCell::new(Vec::new()),
        reseal_fails: std::cell::Cell::new(false),
    }
}

impl Rig {
    fn install(&self, bytes: &[u8]) -> Result<Installed, UpdateError> {
        fs::write(&self.bundle, bytes).unwrap();
        let b = self.slot_b.clone();
        install(
            &self.sys,
            &self.bundle,
            move |s| {
                assert_eq!(s, Slot::B, "only the inactive slot is ever opened");
                Ok(b.clone())
            },
            2,
            |sw| {
                self.resealed.borrow_mut().push(sw.clone());
                if self.reseal_fails.get() {
                    Err("the TPM refused".to_owned())
                } else {
                    Ok(())
                }
            },
        )
    }
    fn env(&self) -> GrubEnv {
        grubenv::read(&self.sys.esp.join(GRUBENV)).unwrap()
    }
    fn untouched(&self) -> bool {
        fs::read(&self.slot_b).unwrap().iter().all(|&b| b == 0xee)
            && !self.sys.esp.join("xen-b").exists()
            && self.env().get(VAR_TRY).unwrap_or_default().is_empty()
    }
    fn events(&self) -> String {
        fs::read_to_string(self.sys.state_dir.join("events.log")).unwrap_or_default()
    }
}

#[test]
fn a_good_bundle_is_written_to_the_inactive_slot_and_armed() {
    let r = rig(Slot::A, &[(VAR_SLOT, "a")]);
    let i = r.install(&bundle(6, b"hsqs new root")).unwrap();
    assert_eq!((i.slot, i.version, i.tries), (Slot::B, 6, 2));
    let written = fs::read(&r.slot_b).unwrap();
    assert!(written.starts_with(b"hsqs new root"));
    assert_eq!(fs::read(r.sys.esp.join("xen-b")).unwrap(), b"XEN");
    assert_eq!(fs::read(r.sys.esp.join("vmlinux-b")).unwrap(), b"LINUX");
    assert_eq!(
        fs::read(r.sys.esp.join("expected-pcrs-b")).unwrap(),
        b"PCRS\n"
    );
    let env = r.env();
    assert_eq!(env.get(VAR_SLOT), Some("a"));
    assert_eq!(env.get(VAR_TRY), Some("b"));
    assert_eq!(env.get(VAR_TRIES), Some("2"));
    assert!(r.events().contains("event=update_installed"));
    // The signing key was re-sealed for this switch, with both images' expected PCRs.
    assert_eq!(
        *r.resealed.borrow(),
        vec![Switch {
            from: Slot::A,
            to: Slot::B,
            tries: 2,
            current_pcrs: r.sys.esp.join("expected-pcrs-a"),
            next_pcrs: r.sys.esp.join("expected-pcrs-b"),
        }]
    );
}

#[test]
fn a_failed_reseal_leaves_the_trial_unarmed() {
    let r = rig(Slot::A, &[(VAR_SLOT, "a")]);
    r.reseal_fails.set(true);
    let e = r.install(&bundle(6, b"hsqs new root")).unwrap_err();
    assert!(matches!(e, UpdateError::Reseal(_)), "{e}");
    assert!(e.to_string().contains("the TPM refused"), "{e}");
    let env = r.env();
    assert_eq!(env.get(VAR_SLOT), Some("a"));
    assert!(
        env.get(VAR_TRY).unwrap_or_default().is_empty(),
        "no trial armed"
    );
    assert!(r.events().contains("event=update_refused"));
}

#[test]
fn refused_bundles_write_nothing_and_are_recorded() {
    let r = rig(Slot::A, &[(VAR_SLOT, "a")]);
    let good = bundle(6, b"hsqs new root");
    // A bad signature (a flipped manifest byte), a changed part, a truncated bundle.
    let mut bad_sig = good.clone();
    bad_sig[20] ^= 1;
    let mut bad_part = good.clone();
    let n = bad_part.len();
    bad_part[n - 8] ^= 1;
    let truncated = good[..good.len() - 3].to_vec();
    for (what, b) in [
        ("signature", bad_sig),
        ("part", bad_part),
        ("truncated", truncated),
        // Rollback: older than and equal to the running version 5.
        ("older", bundle(4, b"hsqs old")),
        ("same", bundle(5, b"hsqs same")),
        // Not a squashfs.
        ("not squashfs", bundle(9, b"ELF.....")),
    ] {
        let e = r.install(&b).unwrap_err();
        assert!(r.untouched(), "{what}: {e}");
    }
    let ev = r.events();
    assert_eq!(ev.matches("event=update_refused").count(), 6, "{ev}");
    assert!(ev.contains("signature does not verify"), "{ev}");
    assert!(ev.contains("is not newer than 5"), "{ev}");
}

#[test]
fn the_stored_floor_refuses_a_version_the_running_image_would_accept() {
    let r = rig(Slot::A, &[(VAR_SLOT, "a")]);
    fs::create_dir_all(&r.sys.state_dir).unwrap();
    fs::write(r.sys.state_dir.join("version-floor"), "8\n").unwrap();
    assert!(matches!(
        r.install(&bundle(7, b"hsqs")),
        Err(UpdateError::NotNewer { floor: 8, .. })
    ));
    assert!(r.untouched());
    r.install(&bundle(9, b"hsqs")).unwrap();
}

#[test]
fn no_install_over_the_fallback_slot() {
    // A trial of b is armed: a is the fallback and stays as it is.
    let r = rig(
        Slot::A,
        &[(VAR_SLOT, "a"), (VAR_TRY, "b"), (VAR_TRIES, "2")],
    );
    assert!(matches!(
        r.install(&bundle(6, b"hsqs")),
        Err(UpdateError::TrialPending("b"))
    ));
    // Running b on trial: a (the committed slot) would be the target.
    let r = rig(Slot::B, &[(VAR_SLOT, "a")]);
    assert!(matches!(
        r.install(&bundle(6, b"hsqs")),
        Err(UpdateError::NotCommitted { .. })
    ));
}

#[test]
fn a_healthy_trial_boot_commits_the_slot_and_raises_the_floor() {
    let r = rig(
        Slot::B,
        &[(VAR_SLOT, "a"), (VAR_TRY, "b"), (VAR_TRIES, "1")],
    );
    let mut polls = 0;
    let out = boot_check(
        &r.sys,
        || {
            polls += 1;
            if polls == 3 {
                Health::Ok
            } else {
                Health::NotYet
            }
        },
        Duration::from_secs(5),
        Duration::from_millis(1),
    )
    .unwrap();
    assert_eq!(
        out,
        BootCheck::Committed {
            slot: Slot::B,
            version: 5
        }
    );
    let env = r.env();
    assert_eq!(
        BootState::of(&env),
        BootState {
            committed: Slot::B,
            trial: None,
            tries: 0
        }
    );
    assert_eq!(r.sys.stored_floor().unwrap(), 5);
    assert!(r.events().contains("event=update_committed"));
}

#[test]
fn an_unhealthy_trial_boot_fails_after_the_timeout_and_keeps_the_trial() {
    let r = rig(
        Slot::B,
        &[(VAR_SLOT, "a"), (VAR_TRY, "b"), (VAR_TRIES, "1")],
    );
    let failed = BootCheck::TrialFailed {
        slot: Slot::B,
        tries_left: 1,
    };
    let ms = Duration::from_millis;
    assert_eq!(
        boot_check(&r.sys, || Health::NotYet, ms(30), ms(5)).unwrap(),
        failed
    );
    // An agent that is not running fails the trial at once, however long the timeout.
    let started = Instant::now();
    let long = Duration::from_secs(600);
    assert_eq!(
        boot_check(&r.sys, || Health::Down, long, ms(1000)).unwrap(),
        failed
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(r.env().get(VAR_TRY), Some("b"));
    assert_eq!(r.env().get(VAR_SLOT), Some("a"));
}

#[test]
fn a_boot_of_the_committed_slot_with_a_trial_left_over_is_a_fallback() {
    let r = rig(
        Slot::A,
        &[(VAR_SLOT, "a"), (VAR_TRY, "b"), (VAR_TRIES, "0")],
    );
    let out = boot_check(&r.sys, || Health::Ok, Duration::ZERO, Duration::ZERO).unwrap();
    assert_eq!(
        out,
        BootCheck::FellBack {
            failed: Slot::B,
            running: Slot::A
        }
    );
    assert_eq!(BootState::of(&r.env()).trial, None);
    assert!(r.events().contains("event=update_fell_back"));
    // The next boot is a normal one.
    let again = boot_check(&r.sys, || Health::Ok, Duration::ZERO, Duration::ZERO).unwrap();
    assert_eq!(again, BootCheck::Normal(Slot::A));
}

#[test]
fn the_approved_digest_and_the_size_bound_are_checked_before_anything_is_written() {
    let r = rig(Slot::A, &[(VAR_SLOT, "a")]);
    let good = bundle(6, b"hsqs new root");
    fs::write(&r.bundle, &good).unwrap();
    let b = r.slot_b.clone();
    let run = |approved: Option<[u8; 32]>, max: u64| {
        let b = b.clone();
        install_with(
            &r.sys,
            &r.bundle,
            move |_| Ok(b.clone()),
            &InstallOptions {
                tries: 2,
                approved_sha256: approved,
                max_bundle_bytes: max,
            },
            |_| Ok(()),
        )
    };
    let digest = |bytes: &[u8]| {
        let mut d = [0u8; 32];
        d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        d
    };
    // Another bundle's digest: a validly signed bundle the admins did not approve.
    let e = run(Some(digest(b"some other bundle")), u64::MAX).unwrap_err();
    assert_eq!(e.refusal_code(), Some("not_approved"), "{e}");
    assert!(r.untouched());
    // One byte over the bound.
    let e = run(Some(digest(&good)), good.len() as u64 - 1).unwrap_err();
    assert_eq!(e.refusal_code(), Some("too_large"), "{e}");
    assert!(r.untouched());
    // The approved bundle, exactly at the bound.
    let i = run(Some(digest(&good)), good.len() as u64).unwrap();
    assert_eq!((i.slot, i.version), (Slot::B, 6));
    assert_eq!(r.env().get(VAR_TRY), Some("b"));
}

#[test]
fn a_bundle_on_the_medium_is_a_plain_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("v2.bundle"), b"x").unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.bundle")).unwrap();
    assert_eq!(
        medium_file(dir.path(), "v2.bundle").unwrap(),
        dir.path().join("v2.bundle")
    );
    for bad in [
        "",
        ".hidden",
        "../v2.bundle",
        "sub/x",
        "a b",
        &"a".repeat(129),
    ] {
        let e = medium_file(dir.path(), bad).unwrap_err();
        assert_eq!(e.refusal_code(), Some("bad_name"), "{bad:?}: {e}");
    }
    for not_file in ["sub", "link.bundle"] {
        let e = medium_file(dir.path(), not_file).unwrap_err();
        assert_eq!(e.refusal_code(), Some("not_a_file"), "{not_file}: {e}");
    }
    assert!(medium_file(dir.path(), "missing.bundle").is_err());
}
