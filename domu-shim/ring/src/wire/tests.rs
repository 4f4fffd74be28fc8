use super::*;
use proptest::prelude::*;

// --- helpers ---------------------------------------------------------------------------

fn key(k: &str) -> Vec<u8> {
    k.as_bytes().to_vec()
}

fn round_trip_request(id: u32, body: Request) {
    let bytes = body.encode(id).unwrap();
    let decoded = Request::decode(&bytes).unwrap();
    assert_eq!(decoded, Envelope { id, body });
    assert_eq!(decoded.body.encode(id).unwrap(), bytes);
}

fn round_trip_response(id: u32, body: Response) {
    let bytes = body.encode(id).unwrap();
    let decoded = Response::decode(&bytes).unwrap();
    assert_eq!(decoded, Envelope { id, body });
    assert_eq!(decoded.body.encode(id).unwrap(), bytes);
}

fn start() -> Start {
    Start {
        tx_id: [1; 16],
        handler: "transfer_v2-a".into(),
        payload: vec![5; 100],
        entropy_seed: [2; 32],
    }
}

/// Rewrites the body-length field after a test edits the body.
fn fix_len(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = (bytes.len() - HEADER_LEN) as u32;
    bytes[12..16].copy_from_slice(&body.to_be_bytes());
    bytes
}

// --- unit tests ------------------------------------------------------------------------

#[test]
fn every_request_round_trips() {
    round_trip_request(
        0,
        Request::Ready {
            protocol_version: PROTOCOL_VERSION,
            handlers: Vec::new(),
        },
    );
    round_trip_request(
        1,
        Request::Ready {
            protocol_version: PROTOCOL_VERSION,
            handlers: vec!["a".into(), "a.b".into(), "b".into(), "x".repeat(64)],
        },
    );
    round_trip_request(u32::MAX, Request::Get { key: key("k") });
    round_trip_request(
        3,
        Request::Put {
            key: vec![0xff; MAX_KEY_LEN],
            value: vec![0; MAX_VALUE_LEN],
        },
    );
    round_trip_request(4, Request::Delete { key: key("d") });
    round_trip_request(
        5,
        Request::Scan {
            start: vec![],
            end: None,
            limit: MAX_SCAN_ENTRIES,
        },
    );
    round_trip_request(
        6,
        Request::Log {
            level: LogLevel::Trace,
            line: "é ✓ ".repeat(100),
        },
    );
    round_trip_request(
        7,
        Request::Commit {
            result: vec![9; MAX_RESULT_LEN],
        },
    );
    round_trip_request(
        8,
        Request::Abort {
            reason: String::new(),
        },
    );
}

#[test]
fn every_response_round_trips() {
    round_trip_response(1, Response::Start(start()));
    round_trip_response(
        1,
        Response::Start(Start {
            payload: vec![3; MAX_PAYLOAD_LEN],
            handler: "a".repeat(MAX_HANDLER_LEN),
            ..start()
        }),
    );
    round_trip_response(2, Response::Value(None));
    round_trip_response(2, Response::Value(Some(vec![])));
    round_trip_response(3, Response::Ok);
    round_trip_response(
        4,
        Response::ScanResult {
            entries: vec![],
            more: false,
        },
    );
    round_trip_response(
        4,
        Response::ScanResult {
            entries: (0..MAX_SCAN_ENTRIES)
                .map(|i| ScanEntry {
                    key: i.to_be_bytes().to_vec(),
                    value: vec![1; 8],
                })
                .collect(),
            more: true,
        },
    );
    round_trip_response(
        5,
        Response::Error {
            code: error_code::DENIED,
            message: "no".into(),
        },
    );
    round_trip_response(6, Response::Committed);
    round_trip_response(7, Response::Aborted);
}

#[test]
fn largest_messages_fit_the_cap() {
    let put = Request::Put {
        key: vec![1; MAX_KEY_LEN],
        value: vec![2; MAX_VALUE_LEN],
    };
    assert_eq!(put.encode(0).unwrap().len(), 65_816);
    let start = Response::Start(Start {
        handler: "h".repeat(MAX_HANDLER_LEN),
        payload: vec![0; MAX_PAYLOAD_LEN],
        ..start()
    });
    assert!(start.encode(0).unwrap().len() <= MAX_MESSAGE_LEN);
}

#[test]
fn header_errors() {
    let good = Request::Get { key: key("k") }.encode(1).unwrap();
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        Request::decode(&bad),
        Err(WireError::BadMagic { .. })
    ));
    let mut bad = good.clone();
    bad[5] = 2;
    assert_eq!(
        Request::decode(&bad),
        Err(WireError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    );
    let mut bad = good.clone();
    bad[7] = 0x42;
    assert_eq!(
        Request::decode(&bad),
        Err(WireError::BadType {
            tag: 0x42,
            expected: "request"
        })
    );
    // Direction is part of the type.
    assert!(matches!(
        Response::decode(&good),
        Err(WireError::BadType {
            tag: 0x0002,
            expected: "response"
        })
    ));
    let mut bad = good.clone();
    bad.push(0);
    assert_eq!(
        Request::decode(&bad),
        Err(WireError::BodyLength {
            declared: 5,
            actual: 6
        })
    );
    assert!(matches!(
        Request::decode(&good[..good.len() - 1]),
        Err(WireError::BodyLength { .. })
    ));
    assert!(matches!(
        Request::decode(&good[..10]),
        Err(WireError::Truncated {
            field: "request id",
            offset: 8,
            needed: 4,
            available: 2
        })
    ));
    assert!(matches!(
        Request::decode(&[]),
        Err(WireError::Truncated { field: "magic", .. })
    ));
    let huge = vec![0u8; MAX_MESSAGE_LEN + 1];
    assert_eq!(
        Request::decode(&huge),
        Err(WireError::MessageTooLarge {
            len: MAX_MESSAGE_LEN + 1,
            max: MAX_MESSAGE_LEN
        })
    );
}

#[test]
fn trailing_bytes_inside_the_body_are_rejected() {
    let bytes = fix_len(
        [
            Request::Delete { key: key("k") }.encode(1).unwrap(),
            vec![0, 0],
        ]
        .concat(),
    );
    assert_eq!(
        Request::decode(&bytes),
        Err(WireError::TrailingBytes {
            offset: 21,
            count: 2
        })
    );
    let bytes = fix_len([Response::Ok.encode(1).unwrap(), vec![0]].concat());
    assert!(matches!(
        Response::decode(&bytes),
        Err(WireError::TrailingBytes { .. })
    ));
}

#[test]
fn field_caps_are_enforced_both_ways() {
    // Encoder.
    let too_long_key = Request::Get {
        key: vec![0; MAX_KEY_LEN + 1],
    };
    assert_eq!(
        too_long_key.encode(0),
        Err(WireError::FieldTooLong {
            field: "key",
            offset: 16,
            len: 257,
            max: 256
        })
    );
    assert_eq!(
        Request::Get { key: vec![] }.encode(0),
        Err(WireError::FieldTooShort {
            field: "key",
            offset: 16,
            len: 0,
            min: 1
        })
    );
    assert!(matches!(
        Request::Put {
            key: key("k"),
            value: vec![0; MAX_VALUE_LEN + 1]
        }
        .encode(0),
        Err(WireError::FieldTooLong { field: "value", .. })
    ));
    // Decoder: a length prefix over the cap is refused before any copy, even if the bytes
    // are not there.
    let mut bytes = Request::Get { key: key("k") }.encode(0).unwrap();
    bytes[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        Request::decode(&bytes),
        Err(WireError::FieldTooLong {
            field: "key",
            offset: 16,
            len: u64::from(u32::MAX),
            max: 256
        })
    );
    // A length within the cap but past the end.
    bytes[16..20].copy_from_slice(&200u32.to_be_bytes());
    assert!(matches!(
        Request::decode(&bytes),
        Err(WireError::Truncated { field: "key", .. })
    ));
    // Empty key.
    let bytes = fix_len(
        [
            Request::Get { key: key("k") }.encode(0).unwrap()[..16].to_vec(),
            vec![0, 0, 0, 0],
        ]
        .concat(),
    );
    assert!(matches!(
        Request::decode(&bytes),
        Err(WireError::FieldTooShort { field: "key", .. })
    ));
}

#[test]
fn flags_levels_and_limits_are_strict() {
    let mut bytes = Response::Value(None).encode(0).unwrap();
    bytes[16] = 2;
    assert_eq!(
        Response::decode(&bytes),
        Err(WireError::BadFlag {
            field: "value",
            offset: 16,
            value: 2
        })
    );
    let mut bytes = Response::ScanResult {
        entries: vec![],
        more: false,
    }
    .encode(0)
    .unwrap();
    bytes[20] = 0xff;
    assert!(matches!(
        Response::decode(&bytes),
        Err(WireError::BadFlag { field: "more", .. })
    ));
    let mut bytes = Response::ScanResult {
        entries: vec![],
        more: false,
    }
    .encode(0)
    .unwrap();
    bytes[16..20].copy_from_slice(&1025u32.to_be_bytes());
    assert!(matches!(
        Response::decode(&bytes),
        Err(WireError::TooManyEntries { count: 1025, .. })
    ));
    let mut bytes = Request::Log {
        level: LogLevel::Info,
        line: "x".into(),
    }
    .encode(0)
    .unwrap();
    bytes[16] = 6;
    assert_eq!(
        Request::decode(&bytes),
        Err(WireError::BadLogLevel {
            offset: 16,
            value: 6
        })
    );
    bytes[16] = 0;
    assert!(Request::decode(&bytes).is_err());
    for limit in [0, MAX_SCAN_ENTRIES + 1] {
        let scan = Request::Scan {
            start: vec![],
            end: None,
            limit,
        };
        assert!(matches!(
            scan.encode(0),
            Err(WireError::BadScanLimit { .. })
        ));
        let mut bytes = Request::Scan {
            start: vec![],
            end: None,
            limit: 1,
        }
        .encode(0)
        .unwrap();
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&limit.to_be_bytes());
        assert_eq!(
            Request::decode(&bytes),
            Err(WireError::BadScanLimit {
                offset: at,
                value: limit,
                max: MAX_SCAN_ENTRIES
            })
        );
    }
}

#[test]
fn text_and_handler_rules() {
    for line in ["a\nb", "tab\there", "\u{7f}", "\u{85}", "\0"] {
        let log = Request::Log {
            level: LogLevel::Warn,
            line: line.into(),
        };
        assert!(
            matches!(
                log.encode(0),
                Err(WireError::ControlCharacter {
                    field: "log line",
                    ..
                })
            ),
            "{line:?}"
        );
    }
    // Invalid UTF-8 on the wire.
    let mut bytes = Request::Abort {
        reason: "abc".into(),
    }
    .encode(0)
    .unwrap();
    bytes[21] = 0xff;
    assert_eq!(
        Request::decode(&bytes),
        Err(WireError::InvalidUtf8 {
            field: "abort reason",
            offset: 21
        })
    );
    // Control character on the wire.
    bytes[21] = b'\r';
    assert_eq!(
        Request::decode(&bytes),
        Err(WireError::ControlCharacter {
            field: "abort reason",
            offset: 21
        })
    );
    for name in ["", "Transfer", "a b", "ü", &"a".repeat(65), "a/b"] {
        let start = Response::Start(Start {
            handler: name.into(),
            ..start()
        });
        assert!(start.encode(0).is_err(), "{name:?}");
    }
    let mut bytes = Response::Start(start()).encode(0).unwrap();
    bytes[16 + 16 + 4] = b'A';
    assert_eq!(
        Response::decode(&bytes),
        Err(WireError::BadHandlerName {
            offset: 36,
            byte: b'A'
        })
    );
}

#[test]
fn scan_results_respect_the_message_cap() {
    let entries: Vec<ScanEntry> = (0..2u8)
        .map(|i| ScanEntry {
            key: vec![i],
            value: vec![0; MAX_VALUE_LEN],
        })
        .collect();
    let too_big = Response::ScanResult {
        entries,
        more: false,
    };
    assert!(matches!(
        too_big.encode(0),
        Err(WireError::MessageTooLarge { .. })
    ));

    let mut builder = ScanResultBuilder::new(1000);
    assert!(builder.is_empty());
    assert!(builder
        .try_push(vec![1; MAX_KEY_LEN], vec![0; MAX_VALUE_LEN])
        .unwrap());
    assert!(!builder.try_push(vec![2], vec![0; 4000]).unwrap());
    assert!(builder.try_push(vec![2], vec![0; 3000]).unwrap());
    assert!(builder.try_push(vec![], vec![]).is_err());
    assert_eq!(builder.len(), 2);
    let response = builder.finish(true);
    let bytes = response.encode(0).unwrap();
    assert!(bytes.len() <= MAX_MESSAGE_LEN);

    // Fill to exactly the cap: the builder's size accounting matches the encoder.
    let mut builder = ScanResultBuilder::new(MAX_SCAN_ENTRIES);
    let mut n = 0u32;
    while builder
        .try_push(n.to_be_bytes().to_vec(), vec![7; 1000])
        .unwrap()
    {
        n += 1;
    }
    let bytes = builder.finish(true).encode(0).unwrap();
    assert!(bytes.len() <= MAX_MESSAGE_LEN);
    assert!(bytes.len() + 1012 > MAX_MESSAGE_LEN);

    let mut builder = ScanResultBuilder::new(2);
    assert!(builder.try_push(vec![1], vec![]).unwrap());
    assert!(builder.try_push(vec![2], vec![]).unwrap());
    assert!(!builder.try_push(vec![3], vec![]).unwrap());
}

// --- documented test vectors -----------------------------------------------------------

type Expected = Result<Envelope<Request>, Envelope<Response>>;

fn expected_vectors() -> Vec<(&'static str, Expected)> {
    let req = |name, id, body| (name, Ok(Envelope { id, body }));
    let rsp = |name, id, body| (name, Err(Envelope { id, body }));
    vec![
        req(
            "ready",
            1,
            Request::Ready {
                protocol_version: 2,
                handlers: vec!["kv_get".into(), "transfer".into()],
            },
        ),
        req(
            "get",
            7,
            Request::Get {
                key: key("user/42"),
            },
        ),
        req(
            "put",
            8,
            Request::Put {
                key: key("k"),
                value: vec![1, 2, 3],
            },
        ),
        req(
            "scan",
            9,
            Request::Scan {
                start: key("a"),
                end: Some(key("b")),
                limit: 10,
            },
        ),
        req(
            "log",
            10,
            Request::Log {
                level: LogLevel::Info,
                line: "hello".into(),
            },
        ),
        req("commit", 11, Request::Commit { result: key("ok") }),
        rsp(
            "start",
            1,
            Response::Start(Start {
                tx_id: core::array::from_fn(|i| i as u8),
                handler: "transfer".into(),
                payload: key("{}"),
                entropy_seed: core::array::from_fn(|i| 0xa0 + i as u8),
            }),
        ),
        rsp("value-none", 7, Response::Value(None)),
        rsp("value-some", 7, Response::Value(Some(key("v")))),
        rsp(
            "scan-result",
            9,
            Response::ScanResult {
                entries: vec![ScanEntry {
                    key: key("a"),
                    value: key("1"),
                }],
                more: true,
            },
        ),
        rsp(
            "error",
            8,
            Response::Error {
                code: error_code::DENIED,
                message: "denied".into(),
            },
        ),
        rsp("committed", 11, Response::Committed),
    ]
}

/// Extracts `(name, bytes)` from `<!-- vector: NAME -->` markers, each followed by a fenced
/// block whose lines hold hex before an optional `|` comment.
fn documented_vectors_in(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- vector:")
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
            let data = l.split('|').next().unwrap();
            hex.extend(data.chars().filter(|c| !c.is_whitespace()));
        }
        assert_eq!(hex.len() % 2, 0, "odd hex in vector {name}");
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        out.push((name.trim().to_string(), bytes));
    }
    out
}

#[test]
fn documented_vectors() {
    let doc = include_str!("../../../../docs/formats.md");
    let found = documented_vectors_in(doc);
    let expected = expected_vectors();
    assert_eq!(
        found.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        expected.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    for ((name, bytes), (_, want)) in found.iter().zip(expected) {
        match want {
            Ok(req) => {
                assert_eq!(Request::decode(bytes).as_ref(), Ok(&req), "{name}");
                assert_eq!(&req.body.encode(req.id).unwrap(), bytes, "{name}");
            }
            Err(rsp) => {
                assert_eq!(Response::decode(bytes).as_ref(), Ok(&rsp), "{name}");
                assert_eq!(&rsp.body.encode(rsp.id).unwrap(), bytes, "{name}");
            }
        }
    }
}

// --- property tests --------------------------------------------------------------------

fn bytes(min: usize, max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), min..=max)
}

/// Text within `max` bytes and without control characters.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        any::<char>().prop_filter("control", |c| !c.is_control()),
        0..64,
    )
    .prop_map(move |chars| {
        let mut s = String::new();
        for c in chars {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    })
}

fn level() -> impl Strategy<Value = LogLevel> {
    prop_oneof![
        Just(LogLevel::Error),
        Just(LogLevel::Warn),
        Just(LogLevel::Info),
        Just(LogLevel::Debug),
        Just(LogLevel::Trace),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        prop::collection::btree_set(handler(), 0..40).prop_map(|names| Request::Ready {
            protocol_version: PROTOCOL_VERSION,
            handlers: names.into_iter().collect(),
        }),
        bytes(1, MAX_KEY_LEN).prop_map(|key| Request::Get { key }),
        (bytes(1, MAX_KEY_LEN), bytes(0, 600)).prop_map(|(key, value)| Request::Put { key, value }),
        bytes(1, MAX_KEY_LEN).prop_map(|key| Request::Delete { key }),
        (
            bytes(0, 40),
            prop::option::of(bytes(1, 40)),
            1..=MAX_SCAN_ENTRIES
        )
            .prop_map(|(start, end, limit)| Request::Scan { start, end, limit }),
        (level(), text(MAX_LOG_LINE_LEN)).prop_map(|(level, line)| Request::Log { level, line }),
        bytes(0, 600).prop_map(|result| Request::Commit { result }),
        text(MAX_REASON_LEN).prop_map(|reason| Request::Abort { reason }),
    ]
}

fn handler() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(b"abcdefghijklmnopqrstuvwxyz0123456789_-".to_vec()),
        1..=MAX_HANDLER_LEN,
    )
    .prop_map(|b| String::from_utf8(b).unwrap())
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (
            any::<[u8; 16]>(),
            handler(),
            bytes(0, 600),
            any::<[u8; 32]>()
        )
            .prop_map(|(tx_id, handler, payload, entropy_seed)| {
                Response::Start(Start {
                    tx_id,
                    handler,
                    payload,
                    entropy_seed,
                })
            }),
        prop::option::of(bytes(0, 600)).prop_map(Response::Value),
        Just(Response::Ok),
        (
            prop::collection::vec(
                (bytes(1, 40), bytes(0, 40)).prop_map(|(key, value)| ScanEntry { key, value }),
                0..20
            ),
            any::<bool>()
        )
            .prop_map(|(entries, more)| Response::ScanResult { entries, more }),
        (any::<u16>(), text(MAX_ERROR_MESSAGE_LEN))
            .prop_map(|(code, message)| Response::Error { code, message }),
        Just(Response::Committed),
        Just(Response::Aborted),
    ]
}

/// Applies byte edits to a valid message.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, value) in edits {
        let i = at % bytes.len();
        bytes[i] = value;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn requests_round_trip(id in any::<u32>(), body in request()) {
        let bytes = body.encode(id).unwrap();
        prop_assert_eq!(Request::decode(&bytes).unwrap(), Envelope { id, body });
    }

    #[test]
    fn responses_round_trip(id in any::<u32>(), body in response()) {
        let bytes = body.encode(id).unwrap();
        prop_assert_eq!(Response::decode(&bytes).unwrap(), Envelope { id, body });
    }

    #[test]
    fn random_bytes_never_panic(data in bytes(0, 2048)) {
        if let Ok(req) = Request::decode(&data) {
            prop_assert_eq!(req.body.encode(req.id).unwrap(), data.clone());
        }
        if let Ok(rsp) = Response::decode(&data) {
            prop_assert_eq!(rsp.body.encode(rsp.id).unwrap(), data);
        }
    }

    #[test]
    fn random_bodies_behind_a_valid_header_never_panic(
        tag in prop_oneof![0u16..=9, 0x8000u16..=0x8008],
        body in bytes(0, 300),
    ) {
        let mut data = Vec::new();
        data.extend_from_slice(&WIRE_MAGIC);
        data.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        data.extend_from_slice(&tag.to_be_bytes());
        data.extend_from_slice(&7u32.to_be_bytes());
        data.extend_from_slice(&(body.len() as u32).to_be_bytes());
        data.extend_from_slice(&body);
        if let Ok(req) = Request::decode(&data) {
            prop_assert_eq!(req.body.encode(req.id).unwrap(), data.clone());
        }
        if let Ok(rsp) = Response::decode(&data) {
            prop_assert_eq!(rsp.body.encode(rsp.id).unwrap(), data);
        }
    }

    /// Canonical: any mutation of a valid message that still decodes re-encodes to itself.
    #[test]
    fn accepted_mutations_re_encode_identically(
        req in request(),
        rsp in response(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let data = mutate(req.encode(1).unwrap(), &edits, cut);
        if let Ok(decoded) = Request::decode(&data) {
            prop_assert_eq!(decoded.body.encode(decoded.id).unwrap(), data);
        }
        let data = mutate(rsp.encode(1).unwrap(), &edits, cut);
        if let Ok(decoded) = Response::decode(&data) {
            prop_assert_eq!(decoded.body.encode(decoded.id).unwrap(), data);
        }
    }
}

// --- the handler list of Ready (protocol version 2) -----------------------------------------

/// A `Ready` assembled by hand: `version`, `count`, then each name length-prefixed as given.
fn raw_ready(version: u16, count: u32, names: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&count.to_be_bytes());
    for name in names {
        body.extend_from_slice(&(name.len() as u32).to_be_bytes());
        body.extend_from_slice(name);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&WIRE_MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    out.extend_from_slice(&0x0001_u16.to_be_bytes());
    out.extend_from_slice(&9_u32.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn ready(names: &[&str]) -> Request {
    Request::Ready {
        protocol_version: PROTOCOL_VERSION,
        handlers: names.iter().map(|n| (*n).to_owned()).collect(),
    }
}

#[test]
fn ready_hand_built_matches_the_encoder() {
    let bytes = raw_ready(2, 2, &[b"a", b"b.c"]);
    assert_eq!(ready(&["a", "b.c"]).encode(9).unwrap(), bytes);
    assert_eq!(Request::decode(&bytes).unwrap().body, ready(&["a", "b.c"]));
}

#[test]
fn ready_of_another_protocol_version_is_refused() {
    for version in [0, 1, 3, u16::MAX] {
        assert_eq!(
            Request::decode(&raw_ready(version, 0, &[])),
            Err(WireError::UnsupportedProtocol {
                found: version,
                supported: 2
            })
        );
        let request = Request::Ready {
            protocol_version: version,
            handlers: Vec::new(),
        };
        assert!(matches!(
            request.encode(1),
            Err(WireError::UnsupportedProtocol { .. })
        ));
    }
    // Version 1's body (the version alone) is refused too, as a too-short version 2 would be.
    let v1 = fix_len(raw_ready(1, 0, &[])[..18].to_vec());
    assert!(Request::decode(&v1).is_err());
}

#[test]
fn ready_truncated_anywhere_is_refused() {
    let bytes = raw_ready(2, 3, &[b"alpha", b"beta", b"gamma"]);
    for cut in HEADER_LEN..bytes.len() {
        let short = fix_len(bytes[..cut].to_vec());
        assert!(
            matches!(Request::decode(&short), Err(WireError::Truncated { .. })),
            "cut at {cut}: {:?}",
            Request::decode(&short)
        );
    }
    // A count promising more names than follow.
    let lying = raw_ready(2, 4, &[b"alpha", b"beta", b"gamma"]);
    assert!(matches!(
        Request::decode(&lying),
        Err(WireError::Truncated {
            field: "handler name",
            ..
        })
    ));
}

#[test]
fn ready_unsorted_or_duplicate_names_are_refused() {
    assert_eq!(
        Request::decode(&raw_ready(2, 2, &[b"b", b"a"])),
        Err(WireError::HandlersOutOfOrder {
            offset: 27,
            duplicate: false
        })
    );
    assert_eq!(
        Request::decode(&raw_ready(2, 3, &[b"a", b"kv", b"kv"])),
        Err(WireError::HandlersOutOfOrder {
            offset: 33,
            duplicate: true
        })
    );
    // "a.b" < "a_b" < "ab" bytewise ('.' 0x2e < '_' 0x5f < 'b'): sorted means bytewise.
    assert!(Request::decode(&raw_ready(2, 3, &[b"a.b", b"a_b", b"ab"])).is_ok());
    assert!(Request::decode(&raw_ready(2, 2, &[b"ab", b"a_b"])).is_err());
    assert!(matches!(
        ready(&["b", "a"]).encode(1),
        Err(WireError::HandlersOutOfOrder {
            duplicate: false,
            ..
        })
    ));
    assert!(matches!(
        ready(&["a", "a"]).encode(1),
        Err(WireError::HandlersOutOfOrder {
            duplicate: true,
            ..
        })
    ));
}

#[test]
fn ready_bad_names_are_refused() {
    for (name, want) in [
        (&b"Kv"[..], "BadHandlerName"),
        (b"kv get", "BadHandlerName"),
        (b"kv\xff", "BadHandlerName"),
        (b"", "FieldTooShort"),
    ] {
        let err = Request::decode(&raw_ready(2, 1, &[name])).unwrap_err();
        assert!(format!("{err:?}").starts_with(want), "{name:?}: {err:?}");
        if let Ok(text) = std::str::from_utf8(name) {
            assert!(ready(&[text]).encode(1).is_err(), "{name:?}");
        }
    }
    let long = vec![b'a'; MAX_HANDLER_LEN + 1];
    assert!(matches!(
        Request::decode(&raw_ready(2, 1, &[&long])),
        Err(WireError::FieldTooLong {
            field: "handler name",
            ..
        })
    ));
    // A length prefix far past the cap is refused before anything is copied.
    let mut huge = raw_ready(2, 1, &[b"a"]);
    huge[22..26].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        Request::decode(&huge),
        Err(WireError::FieldTooLong { .. })
    ));
}

#[test]
fn ready_handler_count_is_bounded() {
    // The count is checked before any name is read: a huge count with no names is refused
    // as too many, not read as truncated (and nothing is reserved for it).
    for count in [MAX_HANDLERS + 1, u32::MAX] {
        assert_eq!(
            Request::decode(&raw_ready(2, count, &[])),
            Err(WireError::TooManyHandlers {
                offset: 18,
                count: u64::from(count),
                max: MAX_HANDLERS
            })
        );
    }
    let names: Vec<String> = (0..=MAX_HANDLERS).map(|i| format!("h{i:05}")).collect();
    let too_many = Request::Ready {
        protocol_version: PROTOCOL_VERSION,
        handlers: names.clone(),
    };
    assert!(matches!(
        too_many.encode(1),
        Err(WireError::TooManyHandlers { .. })
    ));
    // The cap itself fits (short names): 1024 of them round-trip.
    round_trip_request(
        1,
        Request::Ready {
            protocol_version: PROTOCOL_VERSION,
            handlers: names[..MAX_HANDLERS as usize].to_vec(),
        },
    );
    // 1024 names of 64 bytes do not fit one message: the message cap refuses them.
    let fat: Vec<String> = (0..MAX_HANDLERS).map(|i| format!("{i:064}")).collect();
    assert!(matches!(
        Request::Ready {
            protocol_version: PROTOCOL_VERSION,
            handlers: fat,
        }
        .encode(1),
        Err(WireError::MessageTooLarge { .. })
    ));
}

#[test]
fn ready_vector_file_matches_the_encoder() {
    let hex = include_str!("../../../../docs/vectors/ready-2.hex");
    let hex: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let want = Envelope {
        id: 1,
        body: ready(&["kv_get", "transfer"]),
    };
    assert_eq!(Request::decode(&bytes), Ok(want.clone()));
    assert_eq!(want.body.encode(1).unwrap(), bytes);
}
