use super::*;
use proptest::prelude::*;

fn sample() -> BootInfo {
    BootInfo {
        backend_domid: 0,
        event_channel: 5,
        entropy: core::array::from_fn(|i| 0xa0 + i as u8),
        grant_refs: vec![8, 9, 0x1_0000],
    }
}

/// `(name, bytes)` of every `<!-- bootinfo-vector: NAME -->` block in `doc`: hex before an
/// optional `|` comment on each line of the fenced block that follows.
fn documented(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- bootinfo-vector:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        assert!(lines.next().unwrap().starts_with("```"));
        let mut hex = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            hex.extend(
                l.split('|')
                    .next()
                    .unwrap()
                    .chars()
                    .filter(|c| !c.is_whitespace()),
            );
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        out.push((name.trim().to_string(), bytes));
    }
    out
}

#[test]
fn documented_vectors_decode_and_reencode() {
    let doc = include_str!("../../../../docs/formats.md");
    let found = documented(doc);
    let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["three-pages", "bad-reserved"]);
    let (_, ok) = &found[0];
    assert_eq!(BootInfo::decode(ok), Ok(sample()));
    assert_eq!(&sample().encode().unwrap(), ok);
    let (_, bad) = &found[1];
    assert_eq!(
        BootInfo::decode(bad),
        Err(BootInfoError::Reserved { found: 1 })
    );
}

#[test]
fn round_trip_at_the_limits() {
    for pages in [1, 69, MAX_PAGES] {
        let info = BootInfo {
            backend_domid: DOMID_FIRST_RESERVED - 1,
            event_channel: MAX_PORT - 1,
            entropy: [7; 32],
            grant_refs: (0..pages as u32).map(|i| i * 3 + 1).collect(),
        };
        let bytes = info.encode().unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 4 * pages);
        assert_eq!(BootInfo::decode(&bytes), Ok(info));
    }
}

#[test]
fn every_bad_field_is_refused() {
    let good = sample().encode().unwrap();
    let with = |at: usize, patch: &[u8]| {
        let mut b = good.clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        BootInfo::decode(&b)
    };
    assert_eq!(
        with(0, b"MFBX"),
        Err(BootInfoError::Magic { found: *b"MFBX" })
    );
    assert_eq!(with(4, &[0, 2]), Err(BootInfoError::Version { found: 2 }));
    assert_eq!(with(6, &[0, 0]), Err(BootInfoError::Pages { pages: 0 }));
    assert_eq!(with(6, &[1, 1]), Err(BootInfoError::Pages { pages: 257 }));
    // A count that disagrees with the length.
    assert_eq!(
        with(6, &[0, 4]),
        Err(BootInfoError::Length {
            len: good.len(),
            expected: HEADER_LEN + 16
        })
    );
    assert_eq!(
        with(8, &[0x7f, 0xf0]),
        Err(BootInfoError::Domid { domid: 0x7ff0 })
    );
    assert_eq!(
        with(12, &[0, 0, 0, 0]),
        Err(BootInfoError::Port { port: 0 })
    );
    assert_eq!(
        with(12, &[0, 2, 0, 0]),
        Err(BootInfoError::Port { port: 1 << 17 })
    );
    // Cut and trailing bytes.
    assert!(matches!(
        BootInfo::decode(&good[..HEADER_LEN - 1]),
        Err(BootInfoError::Length { .. })
    ));
    assert!(matches!(
        BootInfo::decode(&good[..good.len() - 1]),
        Err(BootInfoError::Length { .. })
    ));
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        BootInfo::decode(&long),
        Err(BootInfoError::Length { .. })
    ));
}

#[test]
fn encode_refuses_what_decode_would() {
    let mut info = sample();
    info.grant_refs.clear();
    assert_eq!(info.encode(), Err(BootInfoError::Pages { pages: 0 }));
    let mut info = sample();
    info.grant_refs = vec![1; MAX_PAGES + 1];
    assert_eq!(info.encode(), Err(BootInfoError::Pages { pages: 257 }));
    let mut info = sample();
    info.event_channel = 0;
    assert_eq!(info.encode(), Err(BootInfoError::Port { port: 0 }));
    let mut info = sample();
    info.backend_domid = 0xffff;
    assert_eq!(info.encode(), Err(BootInfoError::Domid { domid: 0xffff }));
}

#[cfg(feature = "std")]
#[test]
fn page_cap_matches_the_xen_transport() {
    assert_eq!(MAX_PAGES, crate::xen::MAX_RING_PAGES);
}

proptest! {
    #[test]
    fn random_bytes_never_panic_and_accepted_ones_are_canonical(
        bytes in prop::collection::vec(any::<u8>(), 0..=MAX_LEN + 8)
    ) {
        if let Ok(info) = BootInfo::decode(&bytes) {
            prop_assert_eq!(info.encode().unwrap(), bytes);
        }
    }

    #[test]
    fn valid_blocks_round_trip(
        domid in 0u16..DOMID_FIRST_RESERVED,
        port in 1u32..MAX_PORT,
        entropy in any::<[u8; 32]>(),
        refs in prop::collection::vec(any::<u32>(), 1..=MAX_PAGES),
    ) {
        let info = BootInfo { backend_domid: domid, event_channel: port, entropy, grant_refs: refs };
        prop_assert_eq!(BootInfo::decode(&info.encode().unwrap()), Ok(info));
    }
}
