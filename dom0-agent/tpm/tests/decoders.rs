//! The decoders of hostile bytes (a sealed-key file from the data directory, an
//! expected-PCR file, a quote from an agent) never panic and accept only what they encode.

use mayfly_tpm::quote::{parse_attest, verify_quote};
use mayfly_tpm::{pcrfile, SealedBlob};
use proptest::prelude::*;

fn blob() -> impl Strategy<Value = SealedBlob> {
    (
        any::<[u8; 32]>(),
        proptest::collection::btree_map(0u8..=23, any::<[u8; 32]>(), 1..=24),
        proptest::collection::vec(any::<u8>(), 1..=64),
        proptest::collection::vec(any::<u8>(), 1..=64),
        0usize..mayfly_tpm::blob::MAX_STATES,
        any::<u8>(),
    )
        .prop_map(
            |(public_key, pcrs, tpm_public, tpm_private, further, fill)| {
                let n = pcrs.len();
                SealedBlob {
                    public_key,
                    pcrs: pcrs.into_iter().collect(),
                    // Further states: distinct values per state and PCR.
                    more: (0..further)
                        .map(|s| {
                            (0..n)
                                .map(|i| [fill ^ u8::try_from(s * 24 + i).unwrap_or(0); 32])
                                .collect()
                        })
                        .collect(),
                    tpm_public,
                    tpm_private,
                }
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = SealedBlob::decode(&bytes);
        let _ = pcrfile::parse(&bytes);
        let _ = parse_attest(&bytes);
        let _ = verify_quote(&[4; 65], &bytes, &[1; 64], &[0; 32], &[(7, [0; 32])]);
    }

    #[test]
    fn sealed_blobs_round_trip(b in blob()) {
        let bytes = b.encode();
        prop_assert_eq!(SealedBlob::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn expected_pcr_files_round_trip(
        pcrs in proptest::collection::btree_map(0u8..=23, any::<[u8; 32]>(), 1..=24),
        comment in "[ -~]{0,40}",
    ) {
        let values: Vec<_> = pcrs.into_iter().collect();
        let text = pcrfile::render(&values, &comment);
        prop_assert_eq!(pcrfile::parse(text.as_bytes()).unwrap(), values);
    }

    #[test]
    fn a_quote_header_with_random_fields_parses_or_is_refused(
        extra in proptest::collection::vec(any::<u8>(), 0..80),
        tail in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        // A well-formed start (magic, type) then arbitrary lengths and bytes.
        let mut a = vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x18, 0x00, 0x00];
        a.extend_from_slice(&u16::try_from(extra.len()).unwrap().to_be_bytes());
        a.extend_from_slice(&extra);
        a.extend_from_slice(&tail);
        if let Ok((data, _)) = parse_attest(&a) {
            prop_assert!(data.len() <= 64);
        }
    }
}
