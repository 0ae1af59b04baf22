//! Codec tests: property-based round trips of every packet and property for every protocol
//! version, and the malformed inputs of faults-and-inputs.md B1, B2, B6, B9, B10, B12, B17, B25.

use super::*;
use proptest::prelude::*;
use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;

fn s() -> impl Strategy<Value = String> {
    "[a-z/é]{0,8}"
}
fn nonempty() -> impl Strategy<Value = String> {
    "[a-z/]{1,8}"
}
fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}
fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}
fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::V31), Just(Protocol::V311), Just(Protocol::V5)]
}

fn all_properties() -> BoxedStrategy<Properties> {
    let a = (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of(s()),
        proptest::option::of(s()),
        proptest::option::of(bin()),
        proptest::collection::vec(1u32..=268_435_455, 0..3),
        proptest::option::of(any::<u32>()),
        proptest::option::of(s()),
        proptest::option::of(any::<u16>()),
    );
    let b = (
        proptest::option::of(s()),
        proptest::option::of(bin()),
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of(0u8..=1),
        proptest::option::of(s()),
        proptest::option::of(s()),
        proptest::option::of(s()),
        proptest::option::of(1u16..),
    );
    let c = (
        proptest::option::of(any::<u16>()),
        proptest::option::of(any::<u16>()),
        proptest::option::of(0u8..=1),
        proptest::option::of(0u8..=1),
        proptest::collection::vec((s(), s()), 0..3),
        proptest::option::of(1u32..),
        proptest::option::of(0u8..=1),
        proptest::option::of(0u8..=1),
        proptest::option::of(0u8..=1),
    );
    (a, b, c)
        .prop_map(|(a, b, c)| Properties {
            payload_format_indicator: a.0,
            message_expiry_interval: a.1,
            content_type: a.2,
            response_topic: a.3,
            correlation_data: a.4,
            subscription_identifiers: a.5,
            session_expiry_interval: a.6,
            assigned_client_identifier: a.7,
            server_keep_alive: a.8,
            authentication_method: b.0,
            authentication_data: b.1,
            request_problem_information: b.2,
            will_delay_interval: b.3,
            request_response_information: b.4,
            response_information: b.5,
            server_reference: b.6,
            reason_string: b.7,
            receive_maximum: b.8,
            topic_alias_maximum: c.0,
            topic_alias: c.1,
            maximum_qos: c.2,
            retain_available: c.3,
            user_properties: c.4,
            maximum_packet_size: c.5,
            wildcard_subscription_available: c.6,
            subscription_identifier_available: c.7,
            shared_subscription_available: c.8,
        })
        .boxed()
}

/// Keeps only the properties `ctx` allows, so a generated block is valid for its packet.
fn restrict(mut p: Properties, ctx: PropertyContext) -> Properties {
    macro_rules! keep {
        ($($field:ident = $id:expr),* $(,)?) => {
            $( if !ctx.allows($id) { p.$field = Default::default(); } )*
        };
    }
    keep!(
        payload_format_indicator = 0x01,
        message_expiry_interval = 0x02,
        content_type = 0x03,
        response_topic = 0x08,
        correlation_data = 0x09,
        subscription_identifiers = 0x0B,
        session_expiry_interval = 0x11,
        assigned_client_identifier = 0x12,
        server_keep_alive = 0x13,
        authentication_method = 0x15,
        authentication_data = 0x16,
        request_problem_information = 0x17,
        will_delay_interval = 0x18,
        request_response_information = 0x19,
        response_information = 0x1A,
        server_reference = 0x1C,
        reason_string = 0x1F,
        receive_maximum = 0x21,
        topic_alias_maximum = 0x22,
        topic_alias = 0x23,
        maximum_qos = 0x24,
        retain_available = 0x25,
        user_properties = 0x26,
        maximum_packet_size = 0x27,
        wildcard_subscription_available = 0x28,
        subscription_identifier_available = 0x29,
        shared_subscription_available = 0x2A,
    );
    if ctx == PropertyContext::Subscribe {
        p.subscription_identifiers.truncate(1);
    }
    p
}

fn props_for(protocol: Protocol, ctx: PropertyContext) -> BoxedStrategy<Properties> {
    all_properties().prop_map(move |p| if protocol.is_v5() { restrict(p, ctx) } else { Properties::default() }).boxed()
}

fn connect() -> BoxedStrategy<Packet> {
    protocol()
        .prop_flat_map(|protocol| {
            let will = proptest::option::of(
                (nonempty(), bin(), qos(), any::<bool>(), props_for(protocol, PropertyContext::Will))
                    .prop_map(|(topic, payload, qos, retain, properties)| LastWill { topic, payload, qos, retain, properties }),
            );
            (
                any::<bool>(),
                any::<u16>(),
                props_for(protocol, PropertyContext::Connect),
                s(),
                will,
                proptest::option::of(s()),
                proptest::option::of(bin()),
            )
                .prop_map(move |(clean_start, keep_alive, properties, client_id, will, username, password)| {
                    // MQTT 3.x forbids a password without a user name.
                    let username = if !protocol.is_v5() && password.is_some() { Some(username.unwrap_or_default()) } else { username };
                    Packet::Connect(Box::new(Connect {
                        protocol,
                        clean_start,
                        keep_alive,
                        properties,
                        client_id,
                        will,
                        username,
                        password,
                    }))
                })
        })
        .boxed()
}

fn after_connect(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let p = protocol;
    let v5 = p.is_v5();
    let kind = prop_oneof![Just(PubKind::PubAck), Just(PubKind::PubRec), Just(PubKind::PubRel), Just(PubKind::PubComp)];
    let opts = (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| SubscriptionOptions {
        qos,
        no_local: nl && v5,
        retain_as_published: rap && v5,
        retain_handling: if v5 { rh } else { 0 },
        subscription_identifier: None,
    });
    prop_oneof![
        (any::<bool>(), if v5 { any::<u8>().boxed() } else { (0u8..=5).boxed() }, props_for(p, PropertyContext::ConnAck))
            // MQTT 3.1 has no Session Present flag.
            .prop_map(move |(session_present, code, properties)| {
                Packet::ConnAck(ConnAck { session_present: session_present && p != Protocol::V31, code, properties })
            }),
        (qos(), any::<bool>(), any::<bool>(), s(), 1u16.., props_for(p, PropertyContext::Publish), bin()).prop_map(
            |(qos, dup, retain, topic, id, properties, payload)| {
                let packet_id = if qos == QoS::AtMostOnce { 0 } else { id };
                Packet::Publish(Publish { dup: dup && qos != QoS::AtMostOnce, qos, retain, topic, packet_id, properties, payload })
            }
        ),
        (kind, 1u16.., any::<u8>(), props_for(p, PropertyContext::PubResponse)).prop_map(move |(kind, packet_id, reason, properties)| {
            Packet::PubResponse(PubResponse { kind, packet_id, reason: if v5 { reason } else { 0 }, properties })
        }),
        (1u16.., props_for(p, PropertyContext::Subscribe), proptest::collection::vec((s(), opts), 1..4)).prop_map(
            |(packet_id, properties, filters)| {
                let sid = properties.subscription_identifiers.first().copied();
                let filters = filters.into_iter().map(|(f, o)| (f, SubscriptionOptions { subscription_identifier: sid, ..o })).collect();
                Packet::Subscribe(Subscribe { packet_id, properties, filters })
            }
        ),
        (1u16.., props_for(p, PropertyContext::SubResponse), proptest::collection::vec(any::<u8>(), 1..4))
            .prop_map(|(packet_id, properties, codes)| Packet::SubAck(SubAck { packet_id, properties, codes })),
        (1u16.., props_for(p, PropertyContext::Unsubscribe), proptest::collection::vec(s(), 1..4))
            .prop_map(|(packet_id, properties, filters)| Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })),
        (1u16.., props_for(p, PropertyContext::SubResponse), proptest::collection::vec(any::<u8>(), 0..4)).prop_map(
            move |(packet_id, properties, codes)| {
                Packet::UnsubAck(UnsubAck { packet_id, properties, codes: if v5 { codes } else { Vec::new() } })
            }
        ),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        (any::<u8>(), props_for(p, PropertyContext::Disconnect))
            .prop_map(move |(reason, properties)| { Packet::Disconnect(Disconnect { reason: if v5 { reason } else { 0 }, properties }) }),
    ]
}

fn round_trip(packet: &Packet, protocol: Option<Protocol>, encode_as: Protocol) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::new();
    encode(packet, encode_as, &mut buf);
    let total = buf.len();
    // Every strict prefix is incomplete, never an error.
    for cut in 0..total {
        let mut partial = BytesMut::from(&buf[..cut]);
        assert_eq!(decode(&mut partial, protocol, usize::MAX), Ok(None), "prefix {cut} of {total}");
    }
    let out = decode(&mut buf, protocol, usize::MAX);
    assert!(buf.is_empty());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn connect_round_trips(packet in connect()) {
        let Packet::Connect(c) = &packet else { unreachable!() };
        let protocol = c.protocol;
        prop_assert_eq!(round_trip(&packet, None, protocol), Ok(Some(packet)));
    }

    #[test]
    fn every_other_packet_round_trips((protocol, packet) in protocol().prop_flat_map(|p| (Just(p), after_connect(p)))) {
        prop_assert_eq!(round_trip(&packet, Some(protocol), protocol), Ok(Some(packet)));
    }

    #[test]
    fn auth_round_trips(reason in any::<u8>(), properties in props_for(Protocol::V5, PropertyContext::Auth)) {
        let packet = Packet::Auth(Auth { reason, properties });
        prop_assert_eq!(round_trip(&packet, Some(Protocol::V5), Protocol::V5), Ok(Some(packet)));
    }

    /// Arbitrary bytes never panic the decoder, whatever state it is in.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), state in proptest::option::of(protocol())) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, state, 1 << 20) {}
    }
}

fn dec(bytes: &[u8], protocol: Option<Protocol>) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), protocol, 1 << 20)
}

const V5: Option<Protocol> = Some(Protocol::V5);
const V311: Option<Protocol> = Some(Protocol::V311);

#[test]
fn b1_remaining_length_fifth_byte_is_malformed_mqtt_1_5_5_1() {
    assert_eq!(dec(&[0x10, 0x80, 0x80, 0x80, 0x80, 0x01], None), Err(DecodeError::MalformedLength));
    assert_eq!(dec(&[0x30, 0x80, 0x00], V311), Err(DecodeError::MalformedLength));
}

#[test]
fn b2_huge_remaining_length_refused_before_buffering() {
    // 268,435,455 announced; refused from the header alone.
    let err = decode(&mut BytesMut::from(&[0x10u8, 0xff, 0xff, 0xff, 0x7f][..]), None, 65_536);
    assert!(matches!(err, Err(DecodeError::PacketTooLarge { .. })));
    // Every packet type but CONNECT is refused before CONNECT from its first byte.
    for kind in 2u8..=15 {
        assert_eq!(dec(&[kind << 4, 0xff, 0xff, 0xff, 0x7f], None), Err(DecodeError::ProtocolError("first packet must be CONNECT")));
    }
}

fn connect_bytes(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, flags, 0, 60]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

#[test]
fn b5_unknown_protocol_name_or_level_mqtt_3_1_2_1_and_2() {
    assert_eq!(dec(&connect_bytes(b"MQTT", 6, 2), None), Err(DecodeError::UnsupportedProtocol { level: 6 }));
    assert_eq!(dec(&connect_bytes(b"MQTX", 4, 2), None), Err(DecodeError::UnsupportedProtocol { level: 4 }));
    assert!(dec(&connect_bytes(b"MQIsdp", 3, 2), None).is_ok_and(|p| p.is_some()));
}

#[test]
fn b6_connect_flags_mqtt_3_1_2_3() {
    // Reserved flag.
    assert!(matches!(dec(&connect_bytes(b"MQTT", 4, 0x03), None), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&connect_bytes(b"MQTT", 5, 0x03), None), Err(DecodeError::Malformed(_))));
    // Will QoS/retain without the will flag.
    assert!(matches!(dec(&connect_bytes(b"MQTT", 4, 0x08), None), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&connect_bytes(b"MQTT", 4, 0x20), None), Err(DecodeError::Malformed(_))));
    // Password without user name on 3.1.1 [MQTT-3.1.2-22].
    assert!(matches!(dec(&connect_bytes(b"MQTT", 4, 0x42), None), Err(DecodeError::Malformed(_))));
}

#[test]
fn b9_invalid_utf8_in_topic_is_malformed() {
    assert_eq!(dec(&[0x30, 0x04, 0x00, 0x02, 0xc3, 0x28], V311), Err(DecodeError::InvalidUtf8));
    assert_eq!(dec(&[0x30, 0x04, 0x00, 0x02, b'a', 0x00], V311), Err(DecodeError::InvalidUtf8));
}

#[test]
fn b10_unknown_duplicate_and_misplaced_properties() {
    // PUBLISH topic "t", property length 2: unknown property 0x7f.
    assert!(matches!(dec(&[0x30, 0x06, 0, 1, b't', 2, 0x7f, 0], V5), Err(DecodeError::Malformed(_))));
    // Session Expiry Interval (CONNECT-only) in PUBLISH.
    assert!(matches!(dec(&[0x30, 0x09, 0, 1, b't', 5, 0x11, 0, 0, 0, 1], V5), Err(DecodeError::Malformed(_))));
    // Payload Format Indicator twice.
    assert!(matches!(dec(&[0x30, 0x08, 0, 1, b't', 4, 0x01, 0, 0x01, 1], V5), Err(DecodeError::ProtocolError(_))));
    // Property length past the end of the packet.
    assert!(matches!(dec(&[0x30, 0x04, 0, 1, b't', 9], V5), Err(DecodeError::Malformed(_))));
}

#[test]
fn b12_publish_bad_flags_mqtt_3_3_1_2_and_4() {
    assert!(matches!(dec(&[0x36, 0x05, 0, 1, b't', 0, 1], V311), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0x38, 0x03, 0, 1, b't'], V311), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0x32, 0x05, 0, 1, b't', 0, 0], V311), Err(DecodeError::Malformed(_))));
}

#[test]
fn b17_subscribe_flags_and_options_mqtt_3_8_1_1() {
    assert!(matches!(dec(&[0x80, 0x06, 0, 1, 0, 1, b't', 0], V311), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0x82, 0x06, 0, 1, 0, 1, b't', 3], V311), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0x82, 0x06, 0, 1, 0, 1, b't', 0x04], V311), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0x82, 0x07, 0, 1, 0, 0, 1, b't', 0xc0], V5), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0x82, 0x07, 0, 1, 0, 0, 1, b't', 0x30], V5), Err(DecodeError::ProtocolError(_))));
    assert!(matches!(dec(&[0x82, 0x02, 0, 1], V311), Err(DecodeError::ProtocolError(_))));
    assert!(matches!(dec(&[0xa2, 0x02, 0, 1], V311), Err(DecodeError::ProtocolError(_))));
}

#[test]
fn b25_reserved_types_and_second_connect() {
    assert!(matches!(dec(&[0x00, 0x00], V311), Err(DecodeError::Malformed(_))));
    assert!(matches!(dec(&[0xf0, 0x00], V311), Err(DecodeError::Malformed(_))));
    assert!(dec(&[0xf0, 0x00], V5).is_ok());
    assert_eq!(dec(&connect_bytes(b"MQTT", 4, 2), V311), Err(DecodeError::ProtocolError("second CONNECT")));
    assert!(matches!(dec(&[0xc0, 0x01, 0x00], V311), Err(DecodeError::Malformed(_))));
}

#[test]
fn mqtt_2_2_2_1_empty_properties_encoded_as_zero_length() {
    let mut out = BytesMut::new();
    encode(&Packet::ConnAck(ConnAck::default()), Protocol::V5, &mut out);
    assert_eq!(&out[..], &[0x20, 0x03, 0x00, 0x00, 0x00]);
    out.clear();
    encode(&Packet::ConnAck(ConnAck::default()), Protocol::V311, &mut out);
    assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x00]);
}
