//! Shared subscriptions: `$share/{group}/{filter}` and `$queue/{filter}`, strategies,
//! redelivery when a member leaves, validation (B18).

use std::collections::HashMap;

use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;
use raftmq_node::codec::{reason, Packet, Properties, Protocol, PubKind, PubResponse};
use raftmq_node::routing::shared::Strategy;
use raftmq_tests::*;

/// Counts how many of `total` messages each member receives.
async fn spread(members: &mut [Raw], total: usize) -> anyhow::Result<Vec<usize>> {
    let mut counts = vec![0; members.len()];
    let mut seen = 0;
    // Every member acknowledges and counts; a marker per member would cost ordering, so
    // poll members in turn until all messages arrived.
    while seen < total {
        let mut progressed = false;
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(Packet::Publish(p)) = m.recv_within(std::time::Duration::from_millis(20)).await.ok().flatten() {
                if p.qos != QoS::AtMostOnce {
                    m.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
                }
                counts[i] += 1;
                seen += 1;
                progressed = true;
            }
        }
        anyhow::ensure!(progressed || seen >= total, "stalled after {seen} of {total}: {counts:?}");
    }
    Ok(counts)
}

#[tokio::test]
async fn round_robin_balances_3000_messages_over_3_members_within_5_percent() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut members = Vec::new();
    for (i, protocol) in [Protocol::V5, Protocol::V311, Protocol::V5].into_iter().enumerate() {
        let (mut m, _) = Raw::connect(b.addr, protocol, &format!("worker-{i}"), true).await?;
        assert_eq!(m.subscribe(1, "$share/workers/jobs/+", QoS::AtLeastOnce).await?, vec![1]);
        members.push(m);
    }
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "dispatcher", true).await?;
    for i in 0..3000u32 {
        publ.send(&Packet::Publish(publish("jobs/a", &i.to_be_bytes(), QoS::AtMostOnce, false, 0))).await?;
    }
    publ.ping().await?;
    let counts = spread(&mut members, 3000).await?;
    for c in &counts {
        assert!((950..=1050).contains(c), "unbalanced: {counts:?}");
    }
    Ok(())
}

#[tokio::test]
async fn queue_prefix_is_a_shared_group_and_no_retained_on_shared() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "qp", true).await?;
    publ.publish("q/t", b"retained", QoS::AtLeastOnce, true, 1).await?;
    let (mut a, _) = Raw::connect(b.addr, Protocol::V311, "qa", true).await?;
    let (mut c, _) = Raw::connect(b.addr, Protocol::V311, "qc", true).await?;
    a.subscribe(1, "$queue/q/t", QoS::AtMostOnce).await?;
    c.subscribe(1, "$queue/q/t", QoS::AtMostOnce).await?;
    for i in 0..10u8 {
        publ.publish("q/t", &[i], QoS::AtLeastOnce, false, u16::from(i) + 10).await?;
    }
    let mut members = [a, c];
    let counts = spread(&mut members, 10).await?;
    assert_eq!(counts, vec![5, 5]);
    // Neither member got the retained message: exactly 10 deliveries arrived.
    for m in members.iter_mut() {
        m.expect_silence(std::time::Duration::from_millis(100)).await?;
    }
    Ok(())
}

#[tokio::test]
async fn shared_and_ordinary_subscriptions_are_independent() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut both, _) = Raw::connect(b.addr, Protocol::V5, "both", true).await?;
    both.subscribe(1, "$share/g/x", QoS::AtMostOnce).await?;
    both.subscribe(2, "x", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "bp", true).await?;
    publ.publish("x", b"1", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&both.recv_publish().await?.payload[..], b"1");
    assert_eq!(&both.recv_publish().await?.payload[..], b"1");
    // Unsubscribing the shared filter leaves the ordinary one.
    both.send(&Packet::Unsubscribe(raftmq_node::codec::Unsubscribe {
        packet_id: 3,
        properties: Properties::default(),
        filters: vec!["$share/g/x".into()],
    }))
    .await?;
    assert!(matches!(both.recv().await?, Packet::UnsubAck(u) if u.codes == vec![0]));
    publ.publish("x", b"2", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&both.recv_publish().await?.payload[..], b"2");
    both.expect_silence(std::time::Duration::from_millis(100)).await
}

#[tokio::test]
async fn unacknowledged_message_of_a_member_that_disconnects_goes_to_another_member() -> anyhow::Result<()> {
    let b = start_broker(|c| c.shared.strategy = Strategy::Sticky).await?;
    let (mut first, _) = Raw::connect(b.addr, Protocol::V5, "m1", true).await?;
    first.subscribe(1, "$share/g/orders", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "op", true).await?;
    publ.publish("orders", b"order-1", QoS::AtLeastOnce, false, 1).await?;
    assert_eq!(&first.recv_publish().await?.payload[..], b"order-1");
    // The second member joins; the sticky strategy keeps sending to the first.
    let (mut second, _) = Raw::connect(b.addr, Protocol::V5, "m2", true).await?;
    second.subscribe(1, "$share/g/orders", QoS::AtLeastOnce).await?;
    // The first member vanishes without acknowledging: the order must not be lost.
    drop(first);
    let p = second.recv_publish().await?;
    assert_eq!(&p.payload[..], b"order-1");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    Ok(())
}

#[tokio::test]
async fn hash_clientid_sends_one_publishers_messages_to_one_member() -> anyhow::Result<()> {
    let b = start_broker(|c| c.shared.strategy = Strategy::HashClientid).await?;
    let mut members = Vec::new();
    for i in 0..3 {
        let (mut m, _) = Raw::connect(b.addr, Protocol::V5, &format!("h{i}"), true).await?;
        m.subscribe(1, "$share/h/t", QoS::AtMostOnce).await?;
        members.push(m);
    }
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "same-publisher", true).await?;
    for i in 0..30u8 {
        publ.publish("t", &[i], QoS::AtMostOnce, false, 0).await?;
    }
    publ.ping().await?;
    let counts = spread(&mut members, 30).await?;
    assert_eq!(counts.iter().filter(|c| **c == 30).count(), 1, "{counts:?}");
    Ok(())
}

#[tokio::test]
async fn b18_invalid_shared_filters_and_no_local() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "b18", true).await?;
    let opts = SubscriptionOptions::default();
    let filters = ["$share//t", "$share/g+/t", "$share/g", "$share/g/a/#/b", "$share/g/ok"];
    let codes = raw.subscribe_with(1, filters.iter().map(|f| (f.to_string(), opts)).collect(), Properties::default()).await?;
    let bad = reason::TOPIC_FILTER_INVALID;
    assert_eq!(codes, vec![bad, bad, bad, bad, 0]);
    let no_local = SubscriptionOptions { no_local: true, ..opts };
    raw.send(&Packet::Subscribe(raftmq_node::codec::Subscribe {
        packet_id: 2,
        properties: Properties::default(),
        filters: vec![("$share/g/t".into(), no_local)],
    }))
    .await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    assert_serving(b.addr).await
}

#[tokio::test]
async fn least_inflight_prefers_the_idle_member() -> anyhow::Result<()> {
    let b = start_broker(|c| c.shared.strategy = Strategy::LeastInflight).await?;
    let (mut busy, _) = Raw::connect(b.addr, Protocol::V5, "busy", true).await?;
    busy.subscribe(1, "$share/l/t", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "lp", true).await?;
    for id in 1..=3u16 {
        publ.publish("t", b"first", QoS::AtLeastOnce, false, 10 + id).await?;
        assert_eq!(&busy.recv_publish().await?.payload[..], b"first");
    }
    // "busy" never acknowledges (3 in flight); "idle" joins, acknowledges at once (at most 1
    // in flight) and so gets everything after.
    let (mut idle, _) = Raw::connect(b.addr, Protocol::V5, "idle", true).await?;
    idle.subscribe(1, "$share/l/t", QoS::AtLeastOnce).await?;
    let mut got: HashMap<&str, usize> = HashMap::new();
    for i in 0..3u16 {
        publ.publish("t", b"next", QoS::AtLeastOnce, false, i + 2).await?;
        let p = idle.recv_publish().await?;
        idle.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
        *got.entry("idle").or_default() += 1;
    }
    assert_eq!(got.get("idle"), Some(&3));
    busy.expect_silence(std::time::Duration::from_millis(100)).await
}
