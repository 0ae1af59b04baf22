//! Authentication (password file, JWT, anonymous), authorization (ACL), bans and flapping,
//! and fail-closed handling of bad security files (B8, B14, B31, B35).

use std::path::PathBuf;

use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;
use raftmq_node::codec::{connack_v3, reason, Connect, LastWill, Properties, Protocol};
use raftmq_node::config::{BanConfig, FlappingConfig, JwtConfig};
use raftmq_tests::*;

fn files(acl: &str) -> anyhow::Result<SecurityFiles> {
    security_files(&[("alice", "wonderland"), ("bob", "builder")], acl)
}

fn with_login(protocol: Protocol, id: &str, user: Option<&str>, password: Option<&str>) -> Connect {
    let mut c = connect_packet(protocol, id, true);
    c.username = user.map(str::to_owned);
    c.password = password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    c
}

#[tokio::test]
async fn authentication_outcomes_on_v311_and_v5() -> anyhow::Result<()> {
    let f = files("allow all both #")?;
    let passwd = f.passwd.clone();
    let b = start_broker(|c| c.auth.password_file = Some(passwd)).await?;
    for protocol in [Protocol::V311, Protocol::V5] {
        let v5 = protocol.is_v5();
        let (_ok, ack) = Raw::connect_with(b.addr, with_login(protocol, "a1", Some("alice"), Some("wonderland"))).await?;
        assert_eq!(ack.code, 0);
        let (_, ack) = Raw::connect_with(b.addr, with_login(protocol, "a2", Some("alice"), Some("wrong"))).await?;
        assert_eq!(ack.code, if v5 { reason::BAD_USER_NAME_OR_PASSWORD } else { connack_v3::BAD_USER_NAME_OR_PASSWORD });
        let (_, ack) = Raw::connect_with(b.addr, with_login(protocol, "a3", Some("mallory"), Some("x"))).await?;
        assert_eq!(ack.code, if v5 { reason::BAD_USER_NAME_OR_PASSWORD } else { connack_v3::BAD_USER_NAME_OR_PASSWORD });
        // With a password file, anonymous access is off unless enabled.
        let (_, ack) = Raw::connect_with(b.addr, with_login(protocol, "a4", None, None)).await?;
        assert_eq!(ack.code, if v5 { reason::NOT_AUTHORIZED } else { connack_v3::NOT_AUTHORIZED });
    }
    assert_eq!(b.server.broker.stats.auth_failures.load(std::sync::atomic::Ordering::Relaxed), 6);
    Ok(())
}

#[tokio::test]
async fn allow_anonymous_can_be_enabled_beside_a_password_file() -> anyhow::Result<()> {
    let f = files("allow all both #")?;
    let passwd = f.passwd.clone();
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.auth.allow_anonymous = Some(true);
    })
    .await?;
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "anon", None, None)).await?;
    assert_eq!(ack.code, 0);
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "liar", Some("bob"), Some("x"))).await?;
    assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    Ok(())
}

#[tokio::test]
async fn jwt_authentication_checks_signature_and_expiry_and_feeds_acl_claims() -> anyhow::Result<()> {
    let f = files("allow all both tenants/%{tenant}/#\n")?;
    let acl = f.acl.clone();
    let b = start_broker(|c| {
        c.auth.jwt = Some(JwtConfig { secret: Some("s3cret".into()), ..JwtConfig::default() });
        c.acl.file = Some(acl);
    })
    .await?;
    let exp = raftmq_cluster::message::now_ms() / 1000 + 600;
    let good = jwt_hs256("s3cret", serde_json::json!({ "sub": "dev", "tenant": "acme", "exp": exp }))?;
    let (mut dev, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "jwt-1", Some("dev"), Some(&good))).await?;
    assert_eq!(ack.code, 0);
    assert_eq!(dev.publish("tenants/acme/x", b"1", QoS::AtLeastOnce, false, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(dev.publish("tenants/other/x", b"1", QoS::AtLeastOnce, false, 2).await?, reason::NOT_AUTHORIZED);
    let expired = jwt_hs256("s3cret", serde_json::json!({ "sub": "dev", "exp": 1_000_000 }))?;
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "jwt-2", Some("dev"), Some(&expired))).await?;
    assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    let forged = jwt_hs256("guess", serde_json::json!({ "sub": "dev", "exp": exp }))?;
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V311, "jwt-3", Some("dev"), Some(&forged))).await?;
    assert_eq!(ack.code, connack_v3::BAD_USER_NAME_OR_PASSWORD);
    Ok(())
}

const MATRIX: &str = "
# ordered: first match wins
deny   user:bob   subscribe  secret/#
allow  user:alice publish    home/%u/#
allow  all        subscribe  home/%c/+  public/#  secret/#
allow  all        publish    public/#
";

#[tokio::test]
async fn acl_matrix_placeholders_wildcards_share_and_sys() -> anyhow::Result<()> {
    let f = files(MATRIX)?;
    let (passwd, acl) = (f.passwd.clone(), f.acl.clone());
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.acl.file = Some(acl);
    })
    .await?;
    let (mut alice, _) = Raw::connect_with(b.addr, with_login(Protocol::V5, "alice-phone", Some("alice"), Some("wonderland"))).await?;
    let (mut bob, _) = Raw::connect_with(b.addr, with_login(Protocol::V311, "bob-pc", Some("bob"), Some("builder"))).await?;
    // Publish: %u placeholder; others denied (v5: 0x87; v3: acknowledged, dropped).
    assert_eq!(alice.publish("home/alice/door", b"open", QoS::AtLeastOnce, false, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(alice.publish("home/bob/door", b"open", QoS::AtLeastOnce, false, 2).await?, reason::NOT_AUTHORIZED);
    assert_eq!(alice.publish("$SYS/x", b"x", QoS::AtLeastOnce, false, 3).await?, reason::NOT_AUTHORIZED);
    // Subscribe: %c placeholder, wildcard coverage, $share stripped, deny before allow.
    let sub = |f: &str| (f.to_string(), SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() });
    let codes = alice
        .subscribe_with(
            1,
            vec![sub("home/alice-phone/+"), sub("home/alice-phone/#"), sub("$share/g/public/news"), sub("#"), sub("secret/x")],
            Properties::default(),
        )
        .await?;
    assert_eq!(codes, vec![1, reason::NOT_AUTHORIZED, 1, reason::NOT_AUTHORIZED, 1]);
    let codes = bob.subscribe_with(1, vec![sub("secret/x"), sub("secret/+"), sub("public/+")], Properties::default()).await?;
    assert_eq!(codes, vec![0x80, 0x80, 1]);
    // The v3.1.1 publisher denied by the ACL gets a plain PUBACK; nobody receives the message.
    assert_eq!(bob.publish("home/bob/x", b"no", QoS::AtLeastOnce, false, 5).await?, 0);
    bob.publish("public/ok", b"yes", QoS::AtLeastOnce, false, 6).await?;
    assert_eq!(&bob.recv_publish().await?.payload[..], b"yes");
    assert!(b.server.broker.stats.acl_denied.load(std::sync::atomic::Ordering::Relaxed) >= 5);
    Ok(())
}

#[tokio::test]
async fn b8_client_ids_with_wildcards_never_match_placeholders() -> anyhow::Result<()> {
    let f = files("allow all both devices/%c/#\n")?;
    let acl = f.acl.clone();
    let b = start_broker(|c| c.acl.file = Some(acl)).await?;
    let (mut evil, _) = Raw::connect(b.addr, Protocol::V5, "#", true).await?;
    assert_eq!(evil.subscribe(1, "devices/#", QoS::AtMostOnce).await?, vec![reason::NOT_AUTHORIZED]);
    assert_eq!(evil.subscribe(2, "devices/+/#", QoS::AtMostOnce).await?, vec![reason::NOT_AUTHORIZED]);
    let (mut good, _) = Raw::connect(b.addr, Protocol::V5, "d1", true).await?;
    assert_eq!(good.subscribe(1, "devices/d1/#", QoS::AtMostOnce).await?, vec![0]);
    Ok(())
}

#[tokio::test]
async fn b31_will_topic_not_permitted_refuses_connect() -> anyhow::Result<()> {
    let f = files("allow all both public/#\n")?;
    let acl = f.acl.clone();
    let b = start_broker(|c| c.acl.file = Some(acl)).await?;
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut c = connect_packet(protocol, "willer", true);
        c.will = Some(LastWill {
            topic: "private/alarm".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        let (mut raw, ack) = Raw::connect_with(b.addr, c).await?;
        assert_eq!(ack.code, if protocol.is_v5() { reason::NOT_AUTHORIZED } else { connack_v3::NOT_AUTHORIZED });
        raw.expect_closed(DEADLINE).await?;
    }
    Ok(())
}

#[tokio::test]
async fn deny_action_disconnect() -> anyhow::Result<()> {
    let f = files("allow all both public/#\n")?;
    let acl = f.acl.clone();
    let b = start_broker(|c| {
        c.acl.file = Some(acl);
        c.acl.deny_action = raftmq_node::config::DenyAction::Disconnect;
    })
    .await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "rogue", true).await?;
    raw.send(&raftmq_node::codec::Packet::Publish(publish("private/x", b"x", QoS::AtMostOnce, false, 0))).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::NOT_AUTHORIZED));
    Ok(())
}

#[tokio::test]
async fn bans_refuse_clients_users_and_addresses() -> anyhow::Result<()> {
    let b = start_broker(|c| {
        c.bans = vec![BanConfig { who: "client:stolen".into(), until: None }, BanConfig { who: "user:eve".into(), until: None }];
    })
    .await?;
    let (_, ack) = Raw::connect(b.addr, Protocol::V5, "stolen", true).await?;
    assert_eq!(ack.code, reason::BANNED);
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V311, "fine", Some("eve"), Some("x"))).await?;
    assert_eq!(ack.code, connack_v3::NOT_AUTHORIZED);
    let ip_banned = start_broker(|c| c.bans = vec![BanConfig { who: "ip:127.0.0.0/8".into(), until: None }]).await?;
    let mut raw = Raw::open(ip_banned.addr, Protocol::V311).await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    Ok(())
}

#[tokio::test]
async fn flapping_client_is_banned_for_a_while() -> anyhow::Result<()> {
    let b = start_broker(|c| c.flapping = FlappingConfig { enabled: true, max_count: 3, window_secs: 60, ban_secs: 60 }).await?;
    for _ in 0..3 {
        let (raw, ack) = Raw::connect(b.addr, Protocol::V5, "flappy", true).await?;
        assert_eq!(ack.code, 0);
        drop(raw);
    }
    let (_, ack) = Raw::connect(b.addr, Protocol::V5, "flappy", true).await?;
    assert_eq!(ack.code, reason::BANNED);
    // Still banned, and other clients are unaffected.
    let (_, ack) = Raw::connect(b.addr, Protocol::V311, "flappy", true).await?;
    assert_eq!(ack.code, connack_v3::NOT_AUTHORIZED);
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b35_bad_security_files_stop_the_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let bad_passwd = write("passwd", "alice:plaintext\n")?;
    assert!(start_broker(|c| c.auth.password_file = Some(bad_passwd)).await.is_err());
    let empty_acl = write("empty.acl", "\n# nothing\n\n")?;
    assert!(start_broker(|c| c.acl.file = Some(empty_acl)).await.is_err());
    let bad_acl = write("bad.acl", "allow everyone publish #\n")?;
    assert!(start_broker(|c| c.acl.file = Some(bad_acl)).await.is_err());
    let missing = dir.path().join("missing");
    assert!(start_broker(|c| c.auth.password_file = Some(missing)).await.is_err());
    assert!(start_broker(|c| c.auth.jwt = Some(JwtConfig::default())).await.is_err(), "HS256 without a secret");
    Ok(())
}

#[tokio::test]
async fn failed_reload_keeps_the_previous_settings() -> anyhow::Result<()> {
    let f = files("allow all both public/#\n")?;
    let (passwd, acl) = (f.passwd.clone(), f.acl.clone());
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.acl.file = Some(acl);
    })
    .await?;
    std::fs::write(&f.acl, "garbage\n")?;
    assert!(b.server.broker.reload_security().await.is_err());
    let (mut alice, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "a", Some("alice"), Some("wonderland"))).await?;
    assert_eq!(ack.code, 0);
    assert_eq!(alice.publish("public/x", b"1", QoS::AtLeastOnce, false, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    // A good reload takes effect for new checks.
    std::fs::write(&f.acl, "allow all both other/#\n")?;
    b.server.broker.reload_security().await?;
    assert_eq!(alice.publish("public/x", b"1", QoS::AtLeastOnce, false, 2).await?, reason::NOT_AUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn jwt_es256_with_a_public_key_file() -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let dir = tempfile::tempdir()?;
    let public = dir.path().join("jwt.pem");
    std::fs::write(&public, key.public_key_pem())?;
    let b = start_broker(|c| {
        c.auth.jwt = Some(JwtConfig {
            algorithm: raftmq_node::config::JwtAlgorithm::ES256,
            public_key_file: Some(public.clone()),
            ..JwtConfig::default()
        })
    })
    .await?;
    let exp = raftmq_cluster::message::now_ms() / 1000 + 600;
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &serde_json::json!({ "sub": "dev", "exp": exp }),
        &signing,
    )?;
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "es", Some("dev"), Some(&token))).await?;
    assert_eq!(ack.code, 0);
    // An HS256 token is not accepted by an ES256 key.
    let other = jwt_hs256("secret", serde_json::json!({ "sub": "dev", "exp": exp }))?;
    let (_, ack) = Raw::connect_with(b.addr, with_login(Protocol::V5, "hs", Some("dev"), Some(&other))).await?;
    assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    Ok(())
}
