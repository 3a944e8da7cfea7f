//! The store's contract, run against both engines: the embedded SQLite one and PostgreSQL (a
//! real server, started for the test). What one engine does, the other must.

use std::sync::Arc;

use burrow_edge::secret::Secret;
use burrow_edge::store::{DevboxRecord, Postgres, Sqlite, Store, StoreError, TunnelRecord};
use burrow_protocol::AuthMode;
use burrow_tests::postgres::{self, Postgres as Server};

fn devbox(id: &str, created_at: i64) -> (DevboxRecord, Secret) {
    let token = Secret::new(format!("agent-token-{id}"));
    let record = DevboxRecord {
        id: id.to_owned(),
        agent_token: token.hash(),
        created_at,
        tunnel: None,
    };
    (record, token)
}

fn tunnel(key: &str, mode: AuthMode) -> (TunnelRecord, Secret) {
    let token = Secret::new(format!("auth-token-{key}"));
    let record = TunnelRecord {
        key: key.to_owned(),
        auth_mode: mode,
        auth_token: (mode == AuthMode::Authenticated).then(|| token.hash()),
        rewrite_host: mode == AuthMode::Open,
        raw_tcp: true,
        // Both values of each, so a column read back wrong shows.
        http_keep_alive: mode == AuthMode::Authenticated,
        wake_on_http: mode == AuthMode::Open,
        created_ms: 1_765_000_000_123 + i64::from(key.len() as u8),
    };
    (record, token)
}

/// The contract. `reopen` opens the same store again (a restart of the edge).
fn conformance(store: &dyn Store, reopen: &dyn Fn() -> Box<dyn Store>) {
    assert!(store.all().expect("all").is_empty(), "a new store is empty");
    assert!(store.get("b1").expect("get").is_none());
    assert!(store.ping().is_ok(), "ping");

    // Inserted, listed oldest first (then by id), one by one.
    let (b2, _) = devbox("b2", 20);
    let (b1, b1_token) = devbox("b1", 10);
    let (mut b3, _) = devbox("a3", 20);
    let (t3, _) = tunnel("k3", AuthMode::Open);
    b3.tunnel = Some(t3.clone());
    for record in [&b2, &b1, &b3] {
        store.insert(record).expect("insert");
    }
    let ids: Vec<String> = store
        .all()
        .expect("all")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["b1", "a3", "b2"], "ordered by created_at, then id");
    assert_eq!(store.get("a3").expect("get"), Some(b3.clone()));
    let got = store.get("b1").expect("get").expect("b1 stored");
    assert!(got.agent_token.matches(b1_token.expose()));

    // A taken id is refused as such, and changes nothing.
    let (again, _) = devbox("b1", 99);
    match store.insert(&again) {
        Err(StoreError::Exists(id)) => assert_eq!(id, "b1"),
        other => panic!("a second b1: {other:?}"),
    }
    assert_eq!(store.get("b1").expect("get").expect("b1").created_at, 10);

    // Tunnels: set, changed, cleared; a missing devbox is `false`.
    let (auth, auth_token) = tunnel("k1", AuthMode::Authenticated);
    assert!(store.set_tunnel("b1", Some(&auth)).expect("set tunnel"));
    let stored = store
        .get("b1")
        .expect("get")
        .expect("b1")
        .tunnel
        .expect("tunnel");
    assert_eq!(stored, auth);
    assert!(
        stored
            .auth_token
            .expect("hash")
            .matches(auth_token.expose())
    );
    assert!(
        !store
            .set_tunnel("nope", Some(&auth))
            .expect("missing devbox")
    );
    assert!(store.set_tunnel("a3", None).expect("clear"));
    assert_eq!(store.get("a3").expect("get").expect("a3").tunnel, None);

    // The agent token: replaced, the old one no longer matches.
    let fresh = Secret::new("a fresh agent token");
    assert!(store.set_agent_token("b1", &fresh.hash()).expect("rotate"));
    let rotated = store.get("b1").expect("get").expect("b1").agent_token;
    assert!(rotated.matches(fresh.expose()) && !rotated.matches(b1_token.expose()));
    assert!(
        !store
            .set_agent_token("nope", &fresh.hash())
            .expect("missing devbox")
    );

    // Deleted once.
    assert!(store.delete("b2").expect("delete"));
    assert!(!store.delete("b2").expect("delete again"));
    assert!(store.get("b2").expect("get").is_none());

    // Everything written is there for the next process.
    let reopened = reopen();
    let all = reopened.all().expect("all after reopening");
    assert_eq!(all.len(), 2, "{all:?}");
    let b1 = all.iter().find(|r| r.id == "b1").expect("b1 kept");
    assert!(b1.agent_token.matches(fresh.expose()));
    assert_eq!(b1.tunnel.as_ref(), Some(&auth));
    assert!(all.iter().any(|r| r.id == "a3" && r.tunnel.is_none()));
}

#[test]
fn sqlite_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("burrow.db");
    let store = Sqlite::open(&path).expect("open");
    conformance(&store, &|| Box::new(Sqlite::open(&path).expect("reopen")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_the_contract() {
    let server = Server::start().await;
    let url = server.url().parse().expect("url");
    let store = Postgres::connect(&url).expect("connect and migrate");
    conformance(&store, &|| {
        Box::new(Postgres::connect(&url).expect("a second connection"))
    });
    // Every write was logged for the other edges: 3 inserts, 2 tunnel changes, 1 token, 1
    // delete; the refused ones (taken id, missing devbox) were not.
    let logged = postgres::psql(server.port, "SELECT count(*) FROM devbox_changes").await;
    assert_eq!(logged, "7");
    assert_eq!(store.last_change().expect("last change"), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrates_once_and_refuses_a_newer_schema() {
    let server = Server::start().await;
    let url = server.url().parse().expect("url");
    // Edges starting together: each migrates or finds the schema migrated.
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let url = Arc::new(server.url());
            std::thread::spawn(move || Postgres::connect(&url.parse().expect("url")).map(|_| ()))
        })
        .collect();
    for start in starts {
        start.join().expect("thread").expect("connects");
    }
    let versions = postgres::psql(server.port, "SELECT count(*) FROM burrow_migrations").await;
    assert_eq!(versions, "5", "each migration applied once");

    postgres::psql(
        server.port,
        "INSERT INTO burrow_migrations (version) VALUES (99)",
    )
    .await;
    let newer = Postgres::connect(&url).expect_err("a schema from a newer burrow");
    let message = newer.to_string();
    assert!(
        message.contains("schema version 99") && message.contains("upgrade this edge"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_is_unavailable_and_back_is_usable() {
    let server = Server::start().await;
    let url = server.url().parse().expect("url");
    let store = Postgres::connect(&url).expect("connect");
    store.insert(&devbox("before", 1).0).expect("insert");

    server.kill().await;
    let (record, _) = devbox("during", 2);
    let err = store.insert(&record).expect_err("no database");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        err.to_string().contains("PostgreSQL is unavailable"),
        "{err}"
    );
    assert!(store.ping().is_err(), "ping reports it");

    server.start_again().await;
    // The next call connects again by itself.
    store.insert(&record).expect("insert once it is back");
    let ids: Vec<String> = store
        .all()
        .expect("all")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["before", "during"]);
    assert!(store.ping().is_ok(), "ping recovers with the call");
}

#[test]
fn a_store_url_is_checked_and_never_shows_its_password() {
    use burrow_edge::store::StoreUrl;
    let url: StoreUrl = "postgres://burrow:s3cret@db.internal:6543/burrow"
        .parse()
        .expect("a URL");
    let shown = format!("{url} {url:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("burrow@db.internal:6543/burrow"), "{shown}");
    for bad in ["", "mysql://x@y/z", "postgres://"] {
        let err = bad.parse::<StoreUrl>().expect_err(bad);
        assert!(
            err.contains("postgres://user@host/database"),
            "{bad}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_written_in_batches_and_a_late_disconnect_removes_nothing_newer() {
    use burrow_edge::store::{PresenceEvent, PresenceStats};
    let server = Server::start().await;
    let url = server.url().parse().expect("url");
    let store = Postgres::connect(&url).expect("connect");
    let storm = 500;
    postgres::psql(
        server.port,
        &format!(
            "INSERT INTO devboxes (id, agent_token_hash, created_at)
             SELECT 'd' || i, md5(i::text) || md5(i::text), 0 FROM generate_series(1, {storm}) i"
        ),
    )
    .await;
    let stats = Arc::new(PresenceStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let events = store.join(
        "edge-a",
        Default::default(),
        Vec::new,
        stats.clone(),
        stop.clone(),
    );

    // A connect storm: every agent at once.
    for i in 1..=storm {
        let devbox = format!("d{i}");
        let event = PresenceEvent {
            devbox,
            epoch: 1,
            present: true,
        };
        events.send(event).expect("writer running");
    }
    let count = || postgres::psql(server.port, "SELECT count(*) FROM presence");
    let start = std::time::Instant::now();
    while count().await != storm.to_string() {
        assert!(
            start.elapsed() < burrow_tests::WAIT,
            "the storm is not written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let transactions = stats.transactions.get();
    println!("{storm} connects written in {transactions} transactions");
    assert!(
        transactions <= 10,
        "{storm} connects took {transactions} transactions: not batched"
    );

    // d1's agent reconnects (epoch 2); the old connection's disconnect (epoch 1) comes late.
    let send = |devbox: &str, epoch, present| {
        let devbox = devbox.to_owned();
        events
            .send(PresenceEvent {
                devbox,
                epoch,
                present,
            })
            .expect("writer running");
    };
    send("d1", 2, true);
    send("d1", 1, false);
    send("d2", 1, false);
    let rows = || {
        postgres::psql(
            server.port,
            "SELECT count(*) FROM presence WHERE devbox IN ('d1', 'd2')",
        )
    };
    let start = std::time::Instant::now();
    while rows().await != "1" {
        assert!(
            start.elapsed() < burrow_tests::WAIT,
            "the changes are not written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        presence_rows_of(&server, "d1").await,
        "d1@edge-a:2",
        "the newer connection stays"
    );

    // The edge heartbeats.
    let edges = postgres::psql(server.port, "SELECT node || ':' || agents FROM edges").await;
    assert!(edges.starts_with("edge-a:"), "{edges}");
    stop.cancel();
}

/// A devbox's presence rows as `devbox@node:epoch`.
async fn presence_rows_of(server: &Server, devbox: &str) -> String {
    postgres::psql(
        server.port,
        &format!(
            "SELECT devbox || '@' || node || ':' || epoch FROM presence WHERE devbox = '{devbox}'"
        ),
    )
    .await
}
