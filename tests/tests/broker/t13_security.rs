//! Security defects of issue 10 (items 1-3, 5, 6, 14 and the safe defaults), each
//! reproduced through real sockets.

use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{connack_v3, reason, Connect, Packet, Protocol};
use raftmq_node::config::{FlappingConfig, JwtConfig};
use raftmq_node::security::passwd::PasswordFile;
use raftmq_tests::*;

fn login(protocol: Protocol, id: &str, clean_start: bool, user: Option<&str>, password: Option<&str>) -> Connect {
    let mut c = connect_packet(protocol, id, clean_start);
    if protocol.is_v5() && !clean_start {
        c.properties.session_expiry_interval = Some(300);
    }
    c.username = user.map(str::to_owned);
    c.password = password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    c
}

const HOME_ACL: &str = "allow all both home/%u/#\n";

/// Item 1: bob, with his own password, cannot resume, take over or clean alice's session
/// (offline or online); alice still gets her queued message.
#[tokio::test]
async fn d01_a_session_is_bound_to_the_user_that_created_it() -> anyhow::Result<()> {
    let f = security_files(&[("alice", "wonderland"), ("bob", "builder")], HOME_ACL)?;
    let (passwd, acl) = (f.passwd.clone(), f.acl.clone());
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.acl.file = Some(acl);
    })
    .await?;
    let (mut alice, _) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-phone", false, Some("alice"), Some("wonderland"))).await?;
    alice.subscribe(1, "home/alice/#", QoS::AtLeastOnce).await?;
    // Online: bob is refused and alice keeps her connection.
    for (protocol, clean, code) in [
        (Protocol::V5, false, reason::NOT_AUTHORIZED),
        (Protocol::V5, true, reason::NOT_AUTHORIZED),
        (Protocol::V311, false, connack_v3::NOT_AUTHORIZED),
    ] {
        let (_, ack) = Raw::connect_with(b.addr, login(protocol, "alice-phone", clean, Some("bob"), Some("builder"))).await?;
        assert_eq!((ack.code, ack.session_present), (code, false), "{protocol:?} clean {clean}");
    }
    alice.ping().await?;
    alice.send(&Packet::Disconnect(raftmq_node::codec::Disconnect::new(0))).await?;
    alice.expect_closed(DEADLINE).await?;
    // Offline with a queued message: bob still cannot have it.
    let (mut sender, _) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-tablet", true, Some("alice"), Some("wonderland"))).await?;
    sender.publish("home/alice/door", b"open", QoS::AtLeastOnce, false, 1).await?;
    for clean in [false, true] {
        let (mut bob, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-phone", clean, Some("bob"), Some("builder"))).await?;
        assert_eq!((ack.code, ack.session_present), (reason::NOT_AUTHORIZED, false));
        bob.expect_closed(DEADLINE).await?;
    }
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-phone", false, None, None)).await?;
    assert_eq!(ack.code, reason::NOT_AUTHORIZED, "anonymous is another identity too");
    let (mut alice, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-phone", false, Some("alice"), Some("wonderland"))).await?;
    assert!(ack.session_present && ack.code == 0);
    assert_eq!(&alice.recv_publish().await?.payload[..], b"open");
    Ok(())
}

/// Item 1, configured otherwise: `auth.bind_session_to_user = false` restores the plain
/// MQTT behaviour (any authenticated client may take a client id over).
#[tokio::test]
async fn d01_session_binding_can_be_turned_off() -> anyhow::Result<()> {
    let f = security_files(&[("alice", "wonderland"), ("bob", "builder")], HOME_ACL)?;
    let passwd = f.passwd.clone();
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.auth.bind_session_to_user = false;
    })
    .await?;
    let (_alice, _) = Raw::connect_with(b.addr, login(Protocol::V5, "shared-id", false, Some("alice"), Some("wonderland"))).await?;
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "shared-id", false, Some("bob"), Some("builder"))).await?;
    assert_eq!((ack.code, ack.session_present), (0, true));
    Ok(())
}

/// Item 2: the user name comes from the token's claim: a token for bob with user name
/// `alice` is refused, and bob's token without a user name gets bob's rules.
#[tokio::test]
async fn d02_jwt_fixes_the_user_name_from_its_claim() -> anyhow::Result<()> {
    let f = security_files(&[], HOME_ACL)?;
    let acl = f.acl.clone();
    let b = start_broker(|c| {
        c.auth.jwt = Some(JwtConfig { secret: Some("s3cret".into()), ..JwtConfig::default() });
        c.acl.file = Some(acl);
    })
    .await?;
    let exp = raftmq_cluster::message::now_ms() / 1000 + 600;
    let bob = jwt_hs256("s3cret", serde_json::json!({ "sub": "bob", "exp": exp }))?;
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "x1", true, Some("alice"), Some(&bob))).await?;
    assert_eq!(ack.code, reason::NOT_AUTHORIZED);
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V311, "x2", true, Some("alice"), Some(&bob))).await?;
    assert_eq!(ack.code, connack_v3::NOT_AUTHORIZED);
    let (mut raw, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "x3", true, None, Some(&bob))).await?;
    assert_eq!(ack.code, 0);
    assert_eq!(raw.publish("home/bob/x", b"1", QoS::AtLeastOnce, false, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(raw.publish("home/alice/x", b"1", QoS::AtLeastOnce, false, 2).await?, reason::NOT_AUTHORIZED);
    let nameless = jwt_hs256("s3cret", serde_json::json!({ "exp": exp }))?;
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "x4", true, None, Some(&nameless))).await?;
    assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD, "a token that names no user");
    // Another claim can be configured.
    let b = start_broker(|c| {
        c.auth.jwt = Some(JwtConfig { secret: Some("s3cret".into()), username_claim: "username".into(), ..JwtConfig::default() })
    })
    .await?;
    let carol = jwt_hs256("s3cret", serde_json::json!({ "sub": "id-17", "username": "carol", "exp": exp }))?;
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "x5", true, Some("carol"), Some(&carol))).await?;
    assert_eq!(ack.code, 0);
    Ok(())
}

/// Item 3: failed logins are limited per address: past the limit the address is refused
/// (0x9F) without a password check, even with the right password.
#[tokio::test]
async fn d03_failed_logins_are_limited_per_address() -> anyhow::Result<()> {
    let f = security_files(&[("alice", "wonderland")], "")?;
    let passwd = f.passwd.clone();
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.auth.max_failures_per_address = 3;
    })
    .await?;
    for n in 0..3 {
        let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, &format!("g{n}"), true, Some("alice"), Some("guess"))).await?;
        assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    }
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "g9", true, Some("alice"), Some("wonderland"))).await?;
    assert_eq!(ack.code, reason::CONNECTION_RATE_EXCEEDED);
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V311, "g10", true, Some("alice"), Some("wonderland"))).await?;
    assert_eq!(ack.code, connack_v3::NOT_AUTHORIZED);
    Ok(())
}

/// Item 5: flapping detection is off by default, and when on it counts only connects that
/// authenticated: wrong credentials under the victim's client id do not get it banned.
#[tokio::test]
async fn d05_flapping_is_off_by_default_and_counts_only_authenticated_connects() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    for _ in 0..20 {
        let (_, ack) = Raw::connect(b.addr, Protocol::V5, "looping-device", true).await?;
        assert_eq!(ack.code, 0);
    }
    let f = security_files(&[("owner", "right")], "")?;
    let passwd = f.passwd.clone();
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.auth.max_failures_per_address = 0;
        c.auth.max_failures_per_user = 0;
        c.flapping = FlappingConfig { enabled: true, max_count: 3, window_secs: 60, ban_secs: 300 };
    })
    .await?;
    for _ in 0..16 {
        let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "victim-device", true, Some("owner"), Some("wrong"))).await?;
        assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    }
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "victim-device", true, Some("owner"), Some("right"))).await?;
    assert_eq!(ack.code, 0, "the owner is not banned");
    // Authenticated reconnects in a loop still trip it when enabled.
    let mut last = 0;
    for _ in 0..4 {
        last = Raw::connect_with(b.addr, login(Protocol::V5, "victim-device", true, Some("owner"), Some("right"))).await?.1.code;
    }
    assert_eq!(last, reason::BANNED);
    Ok(())
}

async fn login_time(addr: std::net::SocketAddr, user: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (_, ack) = Raw::connect_with(addr, login(Protocol::V5, "timing", true, Some(user), Some("wrong"))).await?;
    anyhow::ensure!(ack.code == reason::BAD_USER_NAME_OR_PASSWORD, "code {:#x}", ack.code);
    Ok(started.elapsed())
}

/// Item 6: an unknown user name is checked against a dummy hash, so it takes about as long
/// as a known one with a wrong password (before: 0.3 ms against 23 ms).
#[tokio::test]
async fn d06_login_timing_does_not_reveal_which_users_exist() -> anyhow::Result<()> {
    let f = security_files(&[("alice", "wonderland")], "")?;
    let passwd = f.passwd.clone();
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.auth.max_failures_per_address = 0;
        c.auth.max_failures_per_user = 0;
    })
    .await?;
    login_time(b.addr, "nobody").await?; // the dummy hash is made on first use
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        known.push(login_time(b.addr, "alice").await?);
        unknown.push(login_time(b.addr, "mallory").await?);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[2], unknown[2]);
    println!("median login time: known user {k:?}, unknown user {u:?}");
    assert!(u * 2 > k && k * 2 > u, "known {k:?} vs unknown {u:?}");
    Ok(())
}

/// Item 14: after a user is removed from the password file and the ACL and the security
/// files are reloaded, the user's live connection is closed (0x87), and subscriptions the
/// new ACL forbids are removed from everyone else.
#[tokio::test]
async fn d14_a_reload_revokes_removed_users_and_forbidden_subscriptions() -> anyhow::Result<()> {
    let f = security_files(&[("alice", "wonderland"), ("bob", "builder")], "allow all both home/#\n")?;
    let (passwd, acl) = (f.passwd.clone(), f.acl.clone());
    let b = start_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.acl.file = Some(acl);
    })
    .await?;
    let (mut alice, _) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-1", true, Some("alice"), Some("wonderland"))).await?;
    alice.subscribe(1, "home/#", QoS::AtMostOnce).await?;
    let (mut bob, _) = Raw::connect_with(b.addr, login(Protocol::V5, "bob-1", true, Some("bob"), Some("builder"))).await?;
    bob.subscribe(1, "home/#", QoS::AtMostOnce).await?;
    bob.subscribe(2, "home/bob/#", QoS::AtMostOnce).await?;
    // alice leaves the password file; the ACL narrows to each user's own home.
    let mut users = PasswordFile::load(&f.passwd)?;
    users.remove("alice");
    users.save(&f.passwd)?;
    std::fs::write(&f.acl, "allow all both home/%u/#\n")?;
    b.server.broker.reload_security().await?;
    assert_eq!(disconnect_reason(alice.expect_closed(DEADLINE).await?), Some(reason::NOT_AUTHORIZED));
    let (mut admin, _) = Raw::connect_with(b.addr, login(Protocol::V5, "bob-2", true, Some("bob"), Some("builder"))).await?;
    admin.publish("home/carol/x", b"not for bob", QoS::AtMostOnce, false, 0).await?;
    admin.publish("home/bob/x", b"for bob", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&bob.recv_publish().await?.payload[..], b"for bob", "home/# was removed, home/bob/# kept");
    bob.expect_silence(Duration::from_millis(200)).await?;
    let (_, ack) = Raw::connect_with(b.addr, login(Protocol::V5, "alice-2", true, Some("alice"), Some("wonderland"))).await?;
    assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    Ok(())
}

/// Safe defaults: without an ACL file, an anonymous client from outside the trusted
/// networks may not subscribe to `$SYS/#` or a bare `#`; loopback (trusted by default) can.
#[tokio::test]
async fn default_policy_keeps_sys_and_everything_from_anonymous_remote_clients() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut local, _) = Raw::connect(b.addr, Protocol::V5, "local", true).await?;
    let both = vec![("$SYS/#".to_owned(), Default::default()), ("#".to_owned(), Default::default())];
    assert_eq!(local.subscribe_with(1, both, Default::default()).await?, vec![0, 0]);
    // The same client as if it came from elsewhere: nothing is trusted.
    let b = start_broker(|c| c.acl.trusted_networks.clear()).await?;
    let (mut remote, _) = Raw::connect(b.addr, Protocol::V5, "remote", true).await?;
    assert_eq!(remote.subscribe(1, "$SYS/#", QoS::AtMostOnce).await?, vec![reason::NOT_AUTHORIZED]);
    assert_eq!(remote.subscribe(2, "#", QoS::AtMostOnce).await?, vec![reason::NOT_AUTHORIZED]);
    assert_eq!(remote.subscribe(3, "sensors/#", QoS::AtMostOnce).await?, vec![0]);
    let (mut v3, _) = Raw::connect(b.addr, Protocol::V311, "remote3", true).await?;
    assert_eq!(v3.subscribe(1, "$SYS/brokers/#", QoS::AtMostOnce).await?, vec![0x80]);
    Ok(())
}

/// Safe defaults: `mqtt.max_sessions` caps the sessions a flood of client ids can create
/// (MQTT 5 0x97, MQTT 3 0x03); an existing session can still reconnect.
#[tokio::test]
async fn session_count_is_capped() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_sessions = 3).await?;
    let mut held = Vec::new();
    for n in 0..3 {
        let (raw, ack) = Raw::connect(b.addr, Protocol::V5, &format!("s{n}"), false).await?;
        assert_eq!(ack.code, 0);
        held.push(raw);
    }
    let (_, ack) = Raw::connect(b.addr, Protocol::V5, "s3", false).await?;
    assert_eq!(ack.code, reason::QUOTA_EXCEEDED);
    let (_, ack) = Raw::connect(b.addr, Protocol::V311, "s4", false).await?;
    assert_eq!(ack.code, connack_v3::SERVER_UNAVAILABLE);
    drop(held);
    let (_, ack) = Raw::connect(b.addr, Protocol::V5, "s0", false).await?;
    assert_eq!((ack.code, ack.session_present), (0, true));
    assert_eq!(b.server.broker.session_count(), 3);
    Ok(())
}

/// Safe defaults: `mqtt.max_connection_rate` paces accepting on each listener (here 5 a
/// second, a bucket of one second's worth): ten clients take about a second, none is lost.
#[tokio::test]
async fn connection_rate_is_paced_per_listener() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_connection_rate = 5).await?;
    let started = Instant::now();
    for n in 0..10 {
        let (_, ack) = Raw::connect(b.addr, Protocol::V311, &format!("paced-{n}"), true).await?;
        assert_eq!(ack.code, 0);
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800), "ten connects in {took:?}");
    Ok(())
}

/// Safe defaults: client ids up to 65,535 bytes are accepted, as in EMQX (some fleets use
/// long ids; Mosquitto has no limit). Before: 256.
#[tokio::test]
async fn long_client_ids_are_accepted_by_default() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut watcher, _) = Raw::connect(b.addr, Protocol::V5, "watcher", true).await?;
    watcher.subscribe(1, "$SYS/brokers/+/clients/+/connected", QoS::AtMostOnce).await?;
    let id = "d/".repeat(30_000);
    let (mut raw, ack) = Raw::connect(b.addr, Protocol::V5, &id, true).await?;
    assert_eq!(ack.code, 0);
    raw.ping().await?;
    // Its connected event has a topic that is still a valid MQTT string (the escaped id
    // alone would be 90,000 bytes), and the full id in its payload.
    let event = watcher.recv_publish().await?;
    assert!(event.topic.len() < 2048, "{} bytes", event.topic.len());
    assert!(String::from_utf8_lossy(&event.payload).contains(&id));
    let (_, ack) = Raw::connect(b.addr, Protocol::V311, &"d".repeat(65_535), true).await?;
    assert_eq!(ack.code, 0);
    Ok(())
}
