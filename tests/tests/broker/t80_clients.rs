//! Interoperability with a real MQTT client library (rumqttc) speaking 3.1.1 and 5.0.

use std::time::Duration;

use raftmq_tests::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

async fn next_publish_v4(el: &mut EventLoop) -> anyhow::Result<rumqttc::Publish> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await? {
                return Ok(p);
            }
        }
    })
    .await?
}

async fn until_suback_v4(el: &mut EventLoop) -> anyhow::Result<Vec<rumqttc::SubscribeReasonCode>> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Event::Incoming(Packet::SubAck(s)) = el.poll().await? {
                return Ok(s.return_codes);
            }
        }
    })
    .await?
}

#[tokio::test]
async fn rumqttc_v311_pub_sub_all_qos_and_retained() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut opts = MqttOptions::new("rumqttc-sub", "127.0.0.1", b.addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (sub, mut sub_el) = AsyncClient::new(opts, 16);
    sub.subscribe("rq/#", QoS::ExactlyOnce).await?;
    assert_eq!(until_suback_v4(&mut sub_el).await?, vec![rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]);

    let opts = MqttOptions::new("rumqttc-pub", "127.0.0.1", b.addr.port());
    let (publ, mut pub_el) = AsyncClient::new(opts, 16);
    let driver = tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        publ.publish("rq/x", qos, false, vec![i as u8]).await?;
        let p = next_publish_v4(&mut sub_el).await?;
        assert_eq!((p.qos, p.payload[0]), (qos, i as u8));
    }
    publ.publish("rq/retained", QoS::AtLeastOnce, true, "kept").await?;
    assert_eq!(&next_publish_v4(&mut sub_el).await?.payload[..], b"kept");

    let opts = MqttOptions::new("rumqttc-late", "127.0.0.1", b.addr.port());
    let (late, mut late_el) = AsyncClient::new(opts, 16);
    late.subscribe("rq/+", QoS::AtLeastOnce).await?;
    let p = next_publish_v4(&mut late_el).await?;
    assert_eq!((p.topic.as_str(), p.retain), ("rq/retained", true));
    driver.abort();
    Ok(())
}

#[tokio::test]
async fn rumqttc_v5_pub_sub_with_properties() -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let b = start_broker(|_| {}).await?;
    let (sub, mut sub_el) = C5::new(O5::new("v5-sub", "127.0.0.1", b.addr.port()), 16);
    sub.subscribe("v5/#", Q5::AtLeastOnce).await?;
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let E5::Incoming(P5::SubAck(_)) = sub_el.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await??;
    let (publ, mut pub_el) = C5::new(O5::new("v5-pub", "127.0.0.1", b.addr.port()), 16);
    let driver = tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publ.publish_with_properties("v5/a", Q5::AtLeastOnce, false, "hello", props).await?;
    let p = tokio::time::timeout(DEADLINE, async {
        loop {
            if let E5::Incoming(P5::Publish(p)) = sub_el.poll().await? {
                return anyhow::Ok(p);
            }
        }
    })
    .await??;
    assert_eq!(&p.payload[..], b"hello");
    let props = p.properties.unwrap_or_default();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, vec![("k".to_string(), "v".to_string())]);
    driver.abort();
    Ok(())
}
