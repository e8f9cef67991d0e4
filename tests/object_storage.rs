//! S3 and GCS targets against real servers on 127.0.0.1 that the tests start themselves:
//! s3s-fs (an S3-compatible server that stores objects as files and checks signatures) and
//! fake-gcs-server (a GCS JSON-API emulator, filesystem backend). Both keep their data across a
//! restart, which is how the outage tests stop and start "the same" server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_litestreamd");

/// fake-gcs-server with bucket `litestream-bucket`, filesystem backend under `root`.
fn gcs_server(root: &Path) -> Server {
    let bin = deps_bin("FAKE_GCS_BIN", "gcs/bin/fake-gcs-server");
    std::fs::create_dir_all(root.join("litestream-bucket")).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let cmd = vec![
        bin.display().to_string(),
        "-scheme".into(),
        "http".into(),
        "-host".into(),
        "127.0.0.1".into(),
        "-port".into(),
        port.to_string(),
        "-backend".into(),
        "filesystem".into(),
        "-filesystem-root".into(),
        root.display().to_string(),
        "-external-url".into(),
        url,
        "-public-host".into(),
        format!("127.0.0.1:{port}"),
        "-log-level".into(),
        "error".into(),
    ];
    Server::start(cmd, port)
}

fn gcs_url(port: u16, path: &str) -> String {
    format!("gs://litestream-bucket/{path}?endpoint=http://127.0.0.1:{port}")
}

fn cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env_remove("AWS_PROFILE");
    c
}

/// `litestreamd replicate` with fast intervals and `extra` flags, not yet spawned.
fn replicate_cmd(db: &Path, url: &str, extra: &[&str]) -> Command {
    let mut c = cmd();
    c.args([
        "replicate",
        "--monitor-interval",
        "100ms",
        "--sync-interval",
        "100ms",
    ])
    .args(extra)
    .arg(db)
    .arg(url);
    c
}

fn replicate(db: &Path, url: &str) -> Child {
    replicate_cmd(db, url, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn fruits_db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode = wal;
         CREATE TABLE fruits (name TEXT, color TEXT);
         INSERT INTO fruits VALUES ('apple', 'red'), ('banana', 'yellow');",
    )
    .unwrap();
    c
}

fn fruits(path: &Path) -> Vec<(String, String)> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c
        .prepare("SELECT name, color FROM fruits ORDER BY rowid")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn restore_url(url: &str, out: &Path) -> std::process::Output {
    cmd()
        .args(["restore", "-o"])
        .arg(out)
        .arg(url)
        .output()
        .unwrap()
}

/// Restores `url` into `out` and checks it holds what `app` holds.
fn assert_restores(url: &str, out: &Path, app: &rusqlite::Connection) {
    let o = restore_url(url, out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(out), dump_conn(app));
}

/// Polls restores of `url` until `check` holds (the data reached the bucket).
fn wait_restorable(url: &str, scratch: &Path, check: impl Fn(&Path) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let out = scratch.join(format!("probe-{n}.db"));
        if restore_url(url, &out).status.success() && check(&out) {
            return;
        }
        assert!(Instant::now() < deadline, "data never reached {url}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes a Litestream config for `db` with one replica (`replica`: its YAML keys) and fast
/// intervals, and starts `litestream replicate` on it.
fn litestream_replicate(ls: &Path, cfg: &Path, db: &Path, replica: &str) -> Litestream {
    std::fs::write(
        cfg,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 100ms\n    min-checkpoint-page-count: 30\n    replicas:\n      -\n{replica}",
            db.display()
        ),
    )
    .unwrap();
    Litestream::start(ls, cfg)
}

/// `litestream restore -config CFG -o OUT DB`, which must succeed.
fn litestream_restore(ls: &Path, cfg: &Path, out: &Path, db: &Path) {
    let o = Command::new(ls)
        .args(["restore", "-config"])
        .arg(cfg)
        .arg("-o")
        .arg(out)
        .arg(db)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "litestream restore of {}: {}",
        db.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

/// The MinIO walkthrough of Litestream's docs, then the outage, on one target.
fn walkthrough_and_outage(server: &mut Server, url: &str, dir: &Path) {
    let db = dir.join("fruits.db");
    let app = fruits_db(&db);
    let mut child = replicate(&db, url);
    app.execute("INSERT INTO fruits VALUES ('grape', 'purple')", [])
        .unwrap();
    let probes = dir.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    wait_restorable(url, &probes, |p| fruits(p).len() == 3);

    // Outage: the server goes away, the application keeps writing, the server comes back with
    // the same data, and the row arrives without any further write.
    server.down();
    app.execute("INSERT INTO fruits VALUES ('mango', 'orange')", [])
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    server.up();
    wait_restorable(url, &probes, |p| fruits(p).len() == 4);
    assert!(sigterm(&mut child).success());

    let out = dir.join("restore_fruits.db");
    let o = restore_url(url, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let beside: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.starts_with("restore_fruits"))
        .collect();
    assert_eq!(
        beside,
        vec!["restore_fruits.db".to_string()],
        "nothing is left beside the restored file"
    );
    assert_eq!(
        fruits(&out),
        vec![
            pair("apple", "red"),
            pair("banana", "yellow"),
            pair("grape", "purple"),
            pair("mango", "orange")
        ]
    );
}

#[test]
fn s3_walkthrough_and_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = s3_server(&dir.path().join("s3"));
    let url = s3_url(server.port, "fruits.db");
    walkthrough_and_outage(&mut server, &url, dir.path());
    // The objects are where Litestream puts them.
    let gens = dir
        .path()
        .join("s3/litestream-bucket/fruits.db/generations");
    assert_eq!(names(&gens).len(), 1);
}

#[test]
fn gcs_walkthrough_and_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = gcs_server(&dir.path().join("gcs"));
    let url = gcs_url(server.port, "fruits.db");
    walkthrough_and_outage(&mut server, &url, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_compatibility_with_litestream_0_3_13() {
    let ls = litestream_bin();
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(&dir.path().join("s3"));

    // litestreamd writes, Litestream restores.
    let db = dir.path().join("a.db");
    let app = app_conn(&db);
    let mut rng = Lcg(41);
    let url = s3_url(server.port, "a.db");
    let mut child = replicate(&db, &url);
    for _ in 0..5 {
        write_mixed(&app, &mut rng, 100);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(sigterm(&mut child).success());
    let cfg = dir.path().join("ls.yml");
    let replica_yaml = |path: &str| {
        format!(
            "        type: s3\n        bucket: litestream-bucket\n        path: {path}\n        endpoint: http://127.0.0.1:{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {KEY}\n        secret-access-key: {SECRET}\n        sync-interval: 100ms\n",
            server.port
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      -\n{}",
            db.display(),
            replica_yaml("a.db")
        ),
    )
    .unwrap();
    let out = dir.path().join("a-by-litestream.db");
    litestream_restore(&ls, &cfg, &out, &db);
    assert_eq!(dump(&out), dump_conn(&app));

    // Litestream writes, litestreamd restores.
    let db = dir.path().join("b.db");
    let app = app_conn(&db);
    let cfg = dir.path().join("ls-b.yml");
    let child = litestream_replicate(&ls, &cfg, &db, &replica_yaml("b.db"));
    for _ in 0..6 {
        write_mixed(&app, &mut rng, 100);
        std::thread::sleep(Duration::from_millis(300));
    }
    child.stop(&dir.path().join("s3"));
    let out = dir.path().join("b-by-litestreamd.db");
    let o = restore_url(&s3_url(server.port, "b.db"), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), dump_conn(&app));
}

/// The config of an S3 store at `path` in the test bucket of the s3s-fs on `port`, as
/// `s3_url` names it, with the test credentials.
fn s3_config(port: u16, path: &str) -> litestreamd::replica::s3::S3Config {
    litestreamd::replica::s3::S3Config {
        access_key_id: Some(KEY.into()),
        secret_access_key: Some(SECRET.into()),
        ..litestreamd::replica::s3::S3Config::from_url(
            &url::Url::parse(&s3_url(port, path)).unwrap(),
        )
        .unwrap()
    }
}

/// s3s-fs leaves Nagle on, so without quick ACKs on our side every response's tail waits for
/// Linux's delayed ACK (~40 ms a GET). 20 ranged GETs of 256 KiB one after the other take
/// 0.08 s with `replica/http.rs`'s client and 0.8 s without it (at least 20 x 40 ms); the bound,
/// 0.6 s, leaves room for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_ranged_gets_do_not_wait_for_delayed_acks() {
    use litestreamd::replica::ObjectStore;
    use litestreamd::replica::s3::S3Store;
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(&dir.path().join("s3"));
    let store = S3Store::new(s3_config(server.port, "acks")).await.unwrap();
    const RANGE: usize = 256 << 10;
    let data: Vec<u8> = (0..20 * RANGE as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    store
        .put("blob", Box::pin(std::io::Cursor::new(data.clone())))
        .await
        .unwrap();
    // One warm-up GET opens the connection.
    let mut got = Vec::new();
    store
        .get_range("blob", 0, RANGE as u64, &mut got)
        .await
        .unwrap();
    let t = std::time::Instant::now();
    for i in 0..20 {
        let (a, b) = (i * RANGE, (i + 1) * RANGE);
        got.clear();
        store
            .get_range("blob", a as u64, b as u64, &mut got)
            .await
            .unwrap();
        assert_eq!(got, data[a..b], "range {a}..{b}");
    }
    let took = t.elapsed();
    println!("20 ranged GETs of 256 KiB: {took:?}");
    assert!(
        took < Duration::from_millis(600),
        "20 ranged GETs took {took:?}: each waited for a delayed ACK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_snapshot_restores_byte_identical() {
    use litestreamd::replica::ReplicaClient;
    use litestreamd::replica::s3::{MIN_PART_SIZE, S3Config, S3Store};
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(&dir.path().join("s3"));
    let db = dir.path().join("big.db");
    let app = app_conn(&db);
    // ~14 MiB of incompressible rows: the LZ4 snapshot is bigger than two 5 MiB parts.
    for _ in 0..14 {
        app.execute_batch("BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 256) INSERT INTO t (v) SELECT randomblob(4000) FROM n; COMMIT;").unwrap();
    }
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let store = S3Store::new(S3Config {
        part_size: Some(MIN_PART_SIZE),
        ..s3_config(server.port, "big.db")
    })
    .await
    .unwrap();
    let client = ReplicaClient::new(std::sync::Arc::new(store));
    let replicas = vec![(
        litestreamd::replicator::ReplicaOptions {
            name: "s3".into(),
            ..fast_opts().1
        },
        client.clone(),
    )];
    let spec = litestreamd::worker::DbSpec {
        name: "big".into(),
        path: db.clone(),
        opts: fast_opts().0,
        replicas,
        restore_on_start: false,
        drill: None,
        standby: None,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let (handle, join) = litestreamd::worker::spawn(spec, cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handle.caught_up() {
        assert!(Instant::now() < deadline, "{:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    join.await.unwrap();

    let generation = client.generations().await.unwrap().remove(0);
    let snap = client.snapshots(&generation).await.unwrap().remove(0);
    assert!(
        snap.size > 2 * MIN_PART_SIZE as u64,
        "snapshot of {} bytes spans several parts",
        snap.size
    );
    // A multipart upload's ETag ends in -<parts>.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::new()
            .behavior_version_latest()
            .endpoint_url(format!("http://127.0.0.1:{}", server.port))
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                KEY, SECRET, None, None, "test",
            ))
            .build(),
    );
    let head = s3
        .head_object()
        .bucket("litestream-bucket")
        .key(format!(
            "big.db/generations/{generation}/snapshots/{:08x}.snapshot.lz4",
            snap.index
        ))
        .send()
        .await
        .unwrap();
    let etag = head.e_tag().unwrap_or_default().to_string();
    assert!(
        etag.trim_matches('"').contains('-'),
        "multipart ETag expected, got {etag}"
    );

    drop(app);
    let source = rusqlite::Connection::open(&db).unwrap();
    source
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let out = dir.path().join("restored.db");
    let o = restore_url(&s3_url(server.port, "big.db"), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&db).unwrap(),
        "restored file is byte-identical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_are_reported_and_do_not_stop_the_good_one() {
    use litestreamd::replica::ReplicaClient;
    use litestreamd::replica::s3::{S3Config, S3Store};
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(&dir.path().join("s3"));
    let s3 = |bucket: &str, port: u16, secret: &str| {
        let cfg = S3Config {
            bucket: bucket.into(),
            secret_access_key: Some(secret.into()),
            ..s3_config(port, "app.db")
        };
        async move { ReplicaClient::new(std::sync::Arc::new(S3Store::new(cfg).await.unwrap())) }
    };
    let unreachable = free_port();
    let (dbo, ro) = fast_opts();
    let named = |n: &str| litestreamd::replicator::ReplicaOptions {
        name: n.into(),
        ..ro.clone()
    };
    let good_dir = dir.path().join("good");
    let replicas = vec![
        (named("good"), file_client(&good_dir)),
        (
            named("wrong-keys"),
            s3("litestream-bucket", server.port, "not-the-secret").await,
        ),
        (
            named("missing-bucket"),
            s3("no-such-bucket", server.port, SECRET).await,
        ),
        (
            named("unreachable"),
            s3("litestream-bucket", unreachable, SECRET).await,
        ),
    ];
    let db = dir.path().join("app.db");
    let app = app_conn(&db);
    write_mixed(&app, &mut Lcg(1), 100);
    let spec = litestreamd::worker::DbSpec {
        name: "app".into(),
        path: db.clone(),
        opts: dbo,
        replicas,
        restore_on_start: false,
        drill: None,
        standby: None,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let (handle, join) = litestreamd::worker::spawn(spec, cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = handle.status();
        let good = &st.replicas[0];
        let bad_reported = st.replicas[1..]
            .iter()
            .all(|r| r.retries >= 2 && r.last_error.is_some());
        if good.pos.is_some() && good.pos == st.pos && bad_reported {
            for r in &st.replicas[1..] {
                let e = r.last_error.as_ref().unwrap();
                assert!(
                    e.contains("s3://"),
                    "{}: error names the target: {e}",
                    r.name
                );
                assert!(matches!(
                    r.state,
                    litestreamd::status::ReplicaState::Retrying { .. }
                        | litestreamd::status::ReplicaState::Failed { .. }
                ));
                // One readable line, not the SDK's debug dump.
                assert!(
                    !e.contains('\n') && e.len() < 400 && !e.contains("ConnectorError {"),
                    "{}: {e}",
                    r.name
                );
            }
            let e = st.replicas[3].last_error.as_ref().unwrap();
            assert!(e.contains("cannot reach the endpoint"), "{e}");
            assert!(
                st.replicas[1]
                    .last_error
                    .as_ref()
                    .unwrap()
                    .contains("SignatureDoesNotMatch")
                    || st.replicas[1].last_error.as_ref().unwrap().contains("403"),
                "{:?}",
                st.replicas[1].last_error
            );
            assert!(
                st.replicas[2]
                    .last_error
                    .as_ref()
                    .unwrap()
                    .contains("NoSuchBucket")
                    || st.replicas[2].last_error.as_ref().unwrap().contains("404"),
                "{:?}",
                st.replicas[2].last_error
            );
            break;
        }
        assert!(Instant::now() < deadline, "{st:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More writes still reach the good replica.
    write_mixed(&app, &mut Lcg(2), 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        handle.sync_now().await.unwrap();
        let st = handle.status();
        if st.replicas[0].pos == st.pos {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(60), join)
        .await
        .expect("stops despite dead targets")
        .unwrap();
    let out = dir.path().join("out.db");
    restore_to(&good_dir, &out, |_| {}).await.unwrap();
    assert_eq!(dump(&out), dump_conn(&app));
}

// ---- Protecting the replica: age encryption and the lease (issue 8) ----

/// A fresh X25519 key pair as files (`age-keygen` format) and as strings.
struct AgeKey {
    identity_file: PathBuf,
    recipient_file: PathBuf,
    identity: String,
    recipient: String,
}

fn age_key(dir: &Path, name: &str) -> AgeKey {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let k = AgeKey {
        identity_file: dir.join(format!("{name}.key")),
        recipient_file: dir.join(format!("{name}.pub")),
        identity: id.to_string().expose_secret().to_string(),
        recipient: id.to_public().to_string(),
    };
    std::fs::write(
        &k.identity_file,
        format!("# public key: {}\n{}\n", k.recipient, k.identity),
    )
    .unwrap();
    std::fs::write(&k.recipient_file, format!("{}\n", k.recipient)).unwrap();
    k
}

/// `litestreamd replicate` with extra flags, its log (stderr) going to `log`.
fn replicate_with(db: &Path, url: &str, extra: &[&str], log: &Path) -> Child {
    replicate_cmd(db, url, extra)
        .env("LITESTREAMD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

const MARKER: &str = "PLAINTEXT-MARKER-7f3a9c";

/// Rows whose text is the marker, so the stored bytes can be searched for it.
fn write_marked(app: &rusqlite::Connection, n: usize) {
    app.execute_batch("CREATE TABLE IF NOT EXISTS secrets (id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..n {
        app.execute(
            "INSERT INTO secrets (v) VALUES (?1)",
            [format!("{MARKER}-{i}-{}", "x".repeat(200))],
        )
        .unwrap();
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every snapshot and segment under `dir` is age-encrypted and holds none of the plaintext.
fn assert_encrypted(dir: &Path) {
    let objects: Vec<PathBuf> = files_under(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".lz4"))
        .collect();
    assert!(objects.len() >= 2, "no objects under {}", dir.display());
    for p in files_under(dir) {
        let data = std::fs::read(&p).unwrap();
        assert!(
            !data.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "{} contains plaintext",
            p.display()
        );
    }
    for p in objects {
        let data = std::fs::read(&p).unwrap();
        assert!(
            data.starts_with(b"age-encryption.org/v1\n"),
            "{} is not an age file",
            p.display()
        );
    }
}

fn litestream_age_yaml(k: &AgeKey) -> String {
    format!(
        "        age:\n          identities:\n            - {}\n          recipients:\n            - {}\n",
        k.identity, k.recipient
    )
}

/// One round of the encryption checks on one target. `storage` is where the target keeps the
/// replica's bytes on disk (the directory, or s3s-fs's files), `yaml` Litestream's replica keys.
fn age_round_trip(dir: &Path, label: &str, url: &str, storage: &Path, yaml: &str) {
    let ls = litestream_bin();
    let key = age_key(dir, &format!("{label}-key"));
    let flags = [
        "--age-recipient-file",
        key.recipient_file.to_str().unwrap(),
        "--age-identity-file",
        key.identity_file.to_str().unwrap(),
    ];

    // litestreamd writes an encrypted replica, stops, and resumes from it (which reads the
    // newest segment back, decrypting it) in the same generation.
    let db = dir.join(format!("{label}-a.db"));
    let app = app_conn(&db);
    let mut rng = Lcg(7);
    let mut child = replicate_with(&db, url, &flags, &dir.join(format!("{label}-a1.log")));
    write_marked(&app, 50);
    write_mixed(&app, &mut rng, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert!(sigterm(&mut child).success());
    // (No write while it is stopped: if the WAL restarts meanwhile, a new generation is right.)
    let mut child = replicate_with(&db, url, &flags, &dir.join(format!("{label}-a2.log")));
    write_marked(&app, 50);
    write_mixed(&app, &mut rng, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert!(sigterm(&mut child).success());
    assert_encrypted(storage);
    let gens = cmd().args(["generations", "--json", url]).output().unwrap();
    assert!(
        gens.status.success(),
        "{}",
        String::from_utf8_lossy(&gens.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&gens.stdout).unwrap();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "resuming an encrypted replica keeps its generation: {listed}\n{}",
        std::fs::read_to_string(dir.join(format!("{label}-a2.log"))).unwrap()
    );

    // Litestream 0.3.13 restores it.
    let cfg = dir.join(format!("{label}-ls-a.yml"));
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      -\n{yaml}{}",
            db.display(),
            litestream_age_yaml(&key)
        ),
    )
    .unwrap();
    let out = dir.join(format!("{label}-a-by-litestream.db"));
    litestream_restore(&ls, &cfg, &out, &db);
    assert_eq!(dump(&out), dump_conn(&app));
    drop(app);

    // litestreamd restores with the identity; without one, or with the wrong one, it fails
    // naming the replica and the object, and leaves no output.
    let restore = |out: &Path, identity: Option<&Path>| {
        let mut c = cmd();
        c.args(["restore", "-o"]).arg(out);
        if let Some(i) = identity {
            c.arg("--age-identity-file").arg(i);
        }
        c.arg(url).output().unwrap()
    };
    let out = dir.join(format!("{label}-a-by-litestreamd.db"));
    let o = restore(&out, Some(&key.identity_file));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), dump(&db));
    let url_root = url.split('?').next().unwrap().trim_end_matches('/');
    for (what, identity) in [
        ("no age identity", None),
        ("wrong identity", Some(age_key(dir, "other").identity_file)),
    ] {
        let out = dir.join(format!("{label}-{}.db", what.replace(' ', "-")));
        let o = restore(&out, identity.as_deref());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: restore succeeded");
        assert!(err.contains(what), "{what}: {err}");
        assert!(
            err.contains(url_root),
            "{what}: the error names the replica: {err}"
        );
        assert!(
            err.contains(".lz4"),
            "{what}: the error names the object: {err}"
        );
        assert!(!out.exists(), "{what}: output left behind");
    }

    // Litestream 0.3.13 writes an encrypted replica; litestreamd restores it.
    let db = dir.join(format!("{label}-b.db"));
    let app = app_conn(&db);
    let cfg = dir.join(format!("{label}-ls-b.yml"));
    let b_yaml = yaml.replace(&format!("{label}-a"), &format!("{label}-b"));
    let replica = format!("{b_yaml}{}", litestream_age_yaml(&key));
    let child = litestream_replicate(&ls, &cfg, &db, &replica);
    write_marked(&app, 30);
    for _ in 0..4 {
        write_mixed(&app, &mut rng, 100);
        std::thread::sleep(Duration::from_millis(300));
    }
    child.stop(storage);
    let b_url = url.replace(&format!("{label}-a"), &format!("{label}-b"));
    let out = dir.join(format!("{label}-b-by-litestreamd.db"));
    let mut c = cmd();
    let o = c
        .args(["restore", "-o"])
        .arg(&out)
        .arg("--age-identity-file")
        .arg(&key.identity_file)
        .arg(&b_url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), dump_conn(&app));
}

#[test]
fn age_encrypted_replicas_round_trip_with_litestream_0_3_13() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let replica = d.join("file-a-replica");
    let url = format!("file://{}", replica.display());
    let yaml = format!("        path: {}\n", replica.display());
    age_round_trip(d, "file", &url, &replica, &yaml);

    let server = s3_server(&d.join("s3"));
    let url = s3_url(server.port, "s3-a-replica");
    let yaml = format!(
        "        type: s3\n        bucket: litestream-bucket\n        path: s3-a-replica\n        endpoint: http://127.0.0.1:{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {KEY}\n        secret-access-key: {SECRET}\n        sync-interval: 100ms\n",
        server.port
    );
    age_round_trip(
        d,
        "s3",
        &url,
        &d.join("s3/litestream-bucket/s3-a-replica"),
        &yaml,
    );
}

/// Waits until `log` contains `needle`.
fn wait_log(log: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said {needle:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn generation_count(url: &str) -> usize {
    let o = cmd().args(["generations", "--json", url]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn second_replicator_of_the_same_database_waits_and_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = format!("file://{}", d.join("replica").display());
    let db = d.join("app.db");
    let app = app_conn(&db);
    let mut rng = Lcg(11);
    write_mixed(&app, &mut rng, 100);

    let (log1, log2) = (d.join("first.log"), d.join("second.log"));
    let mut first = replicate_with(&db, &url, &[], &log1);
    wait_log(&log1, "snapshot written", Duration::from_secs(30));
    let mut second = replicate_with(&db, &url, &[], &log2);
    wait_log(
        &log2,
        "another litestreamd replicates this database",
        Duration::from_secs(30),
    );
    for _ in 0..5 {
        write_mixed(&app, &mut rng, 50);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(generation_count(&url), 1, "only the first writes");

    // The first stops (final sync, lease released); the second takes over and the writes made
    // after that reach the replica too.
    assert!(sigterm(&mut first).success());
    write_mixed(&app, &mut rng, 100);
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    let want = dump_conn(&app);
    wait_restorable(&url, &probes, |p| dump(p) == want);
    assert!(sigterm(&mut second).success());
    let out = d.join("restored.db");
    let o = restore_url(&url, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), dump_conn(&app));
    assert_eq!(integrity(&out), "ok");
}

#[test]
fn two_databases_on_one_replica_path_only_the_first_ever_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = s3_server(&d.join("s3"));
    let url = s3_url(server.port, "shared.db");
    let flags = ["--lease-ttl", "3s"];
    let (a, b) = (d.join("a.db"), d.join("b.db"));
    let (app_a, app_b) = (app_conn(&a), app_conn(&b));
    let mut rng = Lcg(5);
    write_mixed(&app_a, &mut rng, 100);
    write_mixed(&app_b, &mut rng, 100);

    let (log_a, log_b) = (d.join("a.log"), d.join("b.log"));
    let mut first = replicate_with(&a, &url, &flags, &log_a);
    wait_log(&log_a, "snapshot written", Duration::from_secs(30));
    let mut second = replicate_with(&b, &url, &flags, &log_b);
    wait_log(&log_b, "lineage", Duration::from_secs(30));
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        log.contains(&a.display().to_string()),
        "names the database the path belongs to: {log}"
    );
    for _ in 0..10 {
        write_mixed(&app_a, &mut rng, 20);
        write_mixed(&app_b, &mut rng, 20);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(generation_count(&url), 1, "only the first database writes");
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    let want_a = dump_conn(&app_a);
    wait_restorable(&url, &probes, |p| dump(p) == want_a);

    // The first dies without releasing its lease, which expires: the path still belongs to
    // a's lineage, so b never writes there (the lease alone let ownership alternate, and a
    // restore of "latest" returned the other database).
    send_signal(&first, 9);
    first.wait().unwrap();
    write_mixed(&app_b, &mut rng, 50);
    std::thread::sleep(Duration::from_secs(6));
    assert!(second.try_wait().unwrap().is_none(), "b keeps running");
    assert_eq!(generation_count(&url), 1, "b never wrote a generation");
    let out = d.join("latest.db");
    let o = restore_url(&url, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), want_a, "the path holds a's data only");
    assert!(sigterm(&mut second).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_conditional_writes_on_s3_and_gcs() {
    use litestreamd::lease::{CHAIN_DIR, Lease, Scheme};
    use litestreamd::replica::{ObjectStore, StoreError, gcs, s3};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let s3_srv = s3_server(&dir.path().join("s3"));
    let gcs_srv = gcs_server(&dir.path().join("gcs"));
    let s3_cfg = s3_config(s3_srv.port, "lease.db");
    let gcs_cfg =
        gcs::GcsConfig::from_url(&url::Url::parse(&gcs_url(gcs_srv.port, "lease.db")).unwrap())
            .unwrap();
    let stores: Vec<Arc<dyn ObjectStore>> = vec![
        Arc::new(s3::S3Store::new(s3_cfg).await.unwrap()),
        Arc::new(gcs::GcsStore::new(gcs_cfg).await.unwrap()),
        Arc::new(litestreamd::replica::file::FileStore::new(
            dir.path().join("file"),
        )),
    ];
    for store in stores {
        let url = store.url();
        let ttl = Duration::from_secs(60);
        let mut a = Lease::new(store.clone(), ttl, "/srv/a.db");
        let mut b = Lease::new(store.clone(), ttl, "/srv/b.db");
        a.ensure().await.unwrap();
        one_holder_then_the_other(&mut a, &mut b, &url).await;
        b.release().await;
        // The lease sits beside generations/, where Litestream never looks.
        assert!(
            store
                .get_versioned("litestreamd.lease")
                .await
                .unwrap()
                .is_none()
        );

        // Append-only: records created once each (the wrapper refuses anything else), the
        // newest found with a one-key listing, whatever the number of older records.
        let ao: Arc<dyn ObjectStore> = Arc::new(
            litestreamd::replica::append_only::AppendOnly::new(store.clone()),
        );
        let chain = |db: &str, ttl| Lease::with_scheme(ao.clone(), Scheme::Chain, ttl, db);
        let mut a = chain("/srv/a.db", Duration::from_millis(400));
        let mut b = chain("/srv/b.db", ttl);
        a.ensure().await.unwrap();
        for _ in 0..3 {
            // Past half the TTL: each renewal is a new record.
            tokio::time::sleep(Duration::from_millis(250)).await;
            a.ensure().await.unwrap();
        }
        one_holder_then_the_other(&mut a, &mut b, &url).await;
        let records = store.list(CHAIN_DIR).await.unwrap().objects;
        assert_eq!(records.len(), 6, "{url}: {records:?}");
        // The store's own preconditions (not only the lease's reading of who holds it).
        let absent = litestreamd::replica::Precondition::Absent;
        let v1 = store.put_if("cond", b"1".to_vec(), &absent).await.unwrap();
        assert!(v1.is_some(), "{url}");
        assert_eq!(
            store.put_if("cond", b"2".to_vec(), &absent).await.unwrap(),
            None,
            "{url}"
        );
        let stale = litestreamd::replica::Precondition::Version("1234".into());
        assert_eq!(
            store.put_if("cond", b"3".to_vec(), &stale).await.unwrap(),
            None,
            "{url}"
        );
        let current = litestreamd::replica::Precondition::Version(v1.unwrap());
        assert!(
            store
                .put_if("cond", b"4".to_vec(), &current)
                .await
                .unwrap()
                .is_some(),
            "{url}"
        );
        // Append-only uploads are create-only at the store: a second upload of a key fails
        // with `Exists` and leaves the first object as it was.
        let body = |b: &'static [u8]| -> litestreamd::replica::ObjectReader { Box::pin(b) };
        ao.put("generations/g/wal/x", body(b"first")).await.unwrap();
        match ao.put("generations/g/wal/x", body(b"second")).await {
            Err(StoreError::Exists { key, .. }) => assert_eq!(key, "generations/g/wal/x"),
            other => panic!("{url}: second create-only upload: {other:?}"),
        }
        let (data, _) = store
            .get_versioned("generations/g/wal/x")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(data, b"first", "{url}");
        assert!(matches!(
            ao.delete(&["generations/g/wal/x".to_string()]).await,
            Err(StoreError::Refused { .. })
        ));
        let newest = store.first(CHAIN_DIR).await.unwrap().unwrap();
        assert_eq!(
            newest.name,
            records.iter().map(|r| r.name.clone()).min().unwrap(),
            "{url}"
        );
    }
}

/// `a` holds the lease: `b` is refused naming `a`; once `a` releases it `b` takes it, and `a`
/// is refused.
async fn one_holder_then_the_other(
    a: &mut litestreamd::lease::Lease,
    b: &mut litestreamd::lease::Lease,
    url: &str,
) {
    use litestreamd::lease::LeaseError;
    match b.ensure().await {
        Err(LeaseError::Held { holder, .. }) => assert!(holder.contains("/srv/a.db"), "{url}"),
        other => panic!("{url}: second lease: {other:?}"),
    }
    a.release().await;
    b.ensure().await.unwrap();
    assert!(a.ensure().await.is_err(), "{url}: b holds it now");
}

fn listing(kind: &str, url: &str) -> Vec<serde_json::Value> {
    let o = cmd().args([kind, "--json", url]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Retention on a bucket: an old generation goes whole (listing + batch delete), and in the
/// current one snapshots and segments below the oldest kept snapshot go; the rest restores.
fn retention_on(url: &str, dir: &Path) {
    let db = dir.join("ret.db");
    let app = app_conn(&db);
    let mut rng = Lcg(17);
    let retention = ["--retention", "3s"];
    let mut child = replicate_with(&db, url, &retention, &dir.join("ret1.log"));
    write_mixed(&app, &mut rng, 100);
    wait_log(
        &dir.join("ret1.log"),
        "snapshot written",
        Duration::from_secs(30),
    );
    assert!(sigterm(&mut child).success());
    let old = listing("generations", url);
    assert_eq!(old.len(), 1);
    // While stopped, the application truncates the WAL: the next run starts a new generation.
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();

    let log = dir.join("ret2.log");
    let mut child = replicate_with(&db, url, &retention, &log);
    // More than min_checkpoint_page_count (1000 pages): a checkpoint, then a new WAL index.
    app.execute_batch("CREATE TABLE IF NOT EXISTS big (v BLOB)")
        .unwrap();
    for _ in 0..3 {
        for _ in 0..600 {
            app.execute("INSERT INTO big VALUES (randomblob(4000))", [])
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
    wait_log(&log, "retention: deleting", Duration::from_secs(30));
    write_mixed(&app, &mut rng, 50);
    // Retention runs every 3 s here; give it two passes after the newest writes are up.
    std::thread::sleep(Duration::from_secs(7));
    assert!(sigterm(&mut child).success());

    let gens = listing("generations", url);
    assert_eq!(gens.len(), 1, "the old generation is deleted: {gens:?}");
    assert_ne!(gens[0]["generation"], old[0]["generation"]);
    let snaps = listing("snapshots", url);
    let min_snap = snaps
        .iter()
        .map(|s| s["index"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(min_snap > 0, "old snapshots deleted: {snaps:?}");
    let segs = listing("wal", url);
    assert!(
        segs.iter()
            .all(|s| s["index"].as_u64().unwrap() >= min_snap),
        "old segments deleted (oldest snapshot {min_snap}): {segs:?}"
    );
    let out = dir.join("ret-restored.db");
    let o = restore_url(url, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), dump_conn(&app));
}

#[test]
fn retention_on_s3_and_gcs() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = s3_server(&dir.path().join("s3"));
    let s3_dir = dir.path().join("s3-run");
    std::fs::create_dir_all(&s3_dir).unwrap();
    retention_on(&s3_url(s3.port, "ret.db"), &s3_dir);
    let gcs = gcs_server(&dir.path().join("gcs"));
    let gcs_dir = dir.path().join("gcs-run");
    std::fs::create_dir_all(&gcs_dir).unwrap();
    retention_on(&gcs_url(gcs.port, "ret.db"), &gcs_dir);
}

/// A TLS front for a plain server (s3s-fs speaks only HTTP): a self-signed certificate made
/// with openssl, and a small Python proxy (the test command installs neither: openssl comes
/// from tests/run.sh's system tools, Python is what installs the other servers).
fn tls_proxy(dir: &Path, backend: u16) -> Server {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let o = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=litestreamd-test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed by tests/run.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let port = free_port();
    let script = format!(
        r#"
import asyncio, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert:?}, {key:?})
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        br, bw = await asyncio.open_connection("127.0.0.1", {backend})
    except Exception:
        cw.close()
        return
    await asyncio.gather(pipe(cr, bw), pipe(br, cw))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", {port}, ssl=ctx)
    await srv.serve_forever()
asyncio.run(main())
"#,
        cert = cert.display().to_string(),
        key = key.display().to_string(),
    );
    Server::start(vec!["python3".into(), "-c".into(), script], port)
}

#[test]
fn s3_skip_verify_accepts_a_self_signed_endpoint_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = s3_server(&d.join("s3"));
    let tls = tls_proxy(d, s3.port);
    let base = format!(
        "s3://litestream-bucket/tls.db?endpoint=https://127.0.0.1:{}&region=us-east-1&force-path-style=true",
        tls.port
    );
    let db = d.join("tls.db");
    let app = app_conn(&db);
    write_mixed(&app, &mut Lcg(3), 100);

    // Verification on (the default): the self-signed certificate is refused, and said so.
    let log = d.join("verify.log");
    let mut child = replicate_with(&db, &base, &[], &log);
    wait_log(&log, "replica sync failed", Duration::from_secs(30));
    assert!(sigterm(&mut child).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "the error says why: {text}"
    );

    // skip-verify=true: replication and restore work through TLS.
    let url = format!("{base}&skip-verify=true");
    let mut child = replicate_with(&db, &url, &[], &d.join("skip.log"));
    write_mixed(&app, &mut Lcg(4), 100);
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    let want = dump_conn(&app);
    wait_restorable(&url, &probes, |p| dump(p) == want);
    assert!(sigterm(&mut child).success());
}

/// `litestreamd status --json` of the daemon behind `socket`: (replica state, lag seconds) of
/// the first replica of the first database.
fn replica_state(socket: &Path) -> Option<(String, f64)> {
    let v = status_json(socket)?;
    let r = &v[0]["replicas"][0];
    Some((r["state"].as_str()?.to_string(), r["lag_seconds"].as_f64()?))
}

/// The bucket emptied under a running daemon (s3s-fs restarted on an empty directory): the
/// replica notices within `restorable_check_interval`, takes a new snapshot at once, and is
/// never reported healthy while a restore would fail.
#[test]
fn an_emptied_bucket_is_noticed_and_made_restorable_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3root = d.join("s3");
    let mut server = s3_server(&s3root);
    let url = s3_url(server.port, "app.db");
    let db = d.join("app.db");
    let socket = d.join("control.sock");
    std::fs::create_dir_all(d.join("dbs.d")).unwrap();
    std::fs::write(
        d.join("litestreamd.toml"),
        format!(
            "dbs_dir = \"dbs.d\"\nmetrics_addr = \"\"\ncontrol_socket = \"{}\"\n[defaults]\nmonitor_interval = \"100ms\"\nsync_interval = \"100ms\"\n[defaults.retry]\ninitial = \"100ms\"\nmax = \"500ms\"\nfailed_after = 100\n",
            socket.display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dbs.d/app.toml"),
        format!(
            "path = \"{}\"\n[[replicas]]\nname = \"s3\"\nurl = \"{url}\"\nrestorable_check_interval = \"1s\"\n",
            db.display()
        ),
    )
    .unwrap();
    let app = fruits_db(&db);
    let log = d.join("daemon.log");
    let mut daemon = cmd()
        .args(["run", "--config"])
        .arg(d.join("litestreamd.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    wait_restorable(&url, &probes, |p| fruits(p).len() == 2);

    server.down();
    std::fs::remove_dir_all(s3root.join("litestream-bucket")).unwrap();
    std::fs::create_dir_all(s3root.join("litestream-bucket")).unwrap();
    server.up();
    let emptied = Instant::now();
    let mut n = 2;
    let (mut unhealthy_seen, mut restorable_again) = (false, None);
    let mut probe = 0;
    while restorable_again.is_none() {
        assert!(
            emptied.elapsed() < Duration::from_secs(60),
            "never restorable again:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        app.execute("INSERT INTO fruits VALUES ('kiwi', 'green')", [])
            .unwrap();
        n += 1;
        std::thread::sleep(Duration::from_millis(150));
        let Some((state, _)) = replica_state(&socket) else {
            continue;
        };
        if state != "healthy" {
            unhealthy_seen = true;
            continue;
        }
        // Past the check interval, "healthy" must mean restorable.
        probe += 1;
        let out = probes.join(format!("after-{probe}.db"));
        let ok = restore_url(&url, &out);
        if emptied.elapsed() > Duration::from_millis(2500) {
            assert!(
                ok.status.success(),
                "reported healthy {:?} after the bucket was emptied, but the restore fails: {}",
                emptied.elapsed(),
                String::from_utf8_lossy(&ok.stderr)
            );
        }
        if ok.status.success()
            && (unhealthy_seen || emptied.elapsed() > Duration::from_millis(2500))
        {
            restorable_again = Some((emptied.elapsed(), fruits(&out).len()));
        }
    }
    let (took, rows) = restorable_again.unwrap();
    eprintln!("restorable again {took:?} after the bucket was emptied ({rows} of {n} rows)");
    assert!(
        rows >= 3,
        "the new snapshot holds the data written before: {rows}"
    );
    wait_restorable(&url, &probes, |p| fruits(p).len() == n);
    assert!(sigterm(&mut daemon).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("is gone"), "the loss is reported:\n{text}");
}

/// moto's S3 server (in memory) with bucket `litestream-bucket`.
fn moto_server() -> Server {
    let bin = deps_bin("MOTO_BIN", "moto/bin/moto_server");
    let port = free_port();
    let server = Server::start(
        vec![
            bin.display().to_string(),
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        port,
    );
    boto3(port, "s3.create_bucket(Bucket='litestream-bucket')");
    server
}

/// boto3 against moto: runs `code` with `s3` bound to a client; returns its stdout.
fn boto3(port: u16, code: &str) -> String {
    let py = deps_bin("MOTO_BIN", "moto/bin/moto_server").with_file_name("python");
    let out = Command::new(py)
        .args([
            "-c",
            &format!(
                "import boto3\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', region_name='us-east-1', aws_access_key_id='k', aws_secret_access_key='s')\n{code}"
            ),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What interrupted uploads leave (a snapshot's temporary file in a directory replica, an
/// incomplete multipart upload on S3) is removed when replication starts; nothing outside the
/// replica's own path is touched.
#[test]
fn leftovers_of_interrupted_uploads_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A directory replica with a killed snapshot upload's temporary file.
    let replica = d.join("replica");
    let snaps = replica.join("generations/0123456789abcdef/snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let tmp = snaps.join(".00000000.snapshot.lz4.deadbeef.tmp");
    std::fs::write(&tmp, vec![7u8; 1 << 20]).unwrap();
    let keep = snaps.join("notes.tmp");
    std::fs::write(&keep, b"not ours").unwrap();
    let db = d.join("app.db");
    let app = app_conn(&db);
    for _ in 0..5 {
        app.execute("INSERT INTO t (v) VALUES (randomblob(100))", [])
            .unwrap();
    }
    let url = format!("file://{}", replica.display());
    let mut child = replicate(&db, &url);
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    wait_restorable(&url, &probes, |p| dump(p).len() == 5);
    assert!(
        !tmp.exists(),
        "the interrupted upload's temporary file is gone"
    );
    assert!(keep.exists(), "a file that is not an upload's is kept");
    assert!(sigterm(&mut child).success());

    // S3 (moto; s3s-fs cannot list multipart uploads): an incomplete multipart upload under
    // the replica's path is aborted, one under another path is not.
    let server = moto_server();
    let port = server.port;
    let create = |key: &str| {
        boto3(
            port,
            &format!(
                "u = s3.create_multipart_upload(Bucket='litestream-bucket', Key='{key}')\ns3.upload_part(Bucket='litestream-bucket', Key='{key}', UploadId=u['UploadId'], PartNumber=1, Body=b'x' * (5 << 20))"
            ),
        )
    };
    create("s3app.db/generations/0123456789abcdef/snapshots/00000000.snapshot.lz4");
    create("other/generations/0123456789abcdef/snapshots/00000000.snapshot.lz4");
    let uploads = || {
        boto3(
            port,
            "print(sorted(u['Key'] for u in s3.list_multipart_uploads(Bucket='litestream-bucket').get('Uploads', [])))",
        )
    };
    assert!(uploads().contains("s3app.db/"), "{}", uploads());
    let s3 = s3_url(port, "s3app.db");
    let mut child = replicate(&db, &s3);
    wait_restorable(&s3, &probes, |p| dump(p).len() == 5);
    let left = uploads();
    assert!(!left.contains("s3app.db/"), "aborted: {left}");
    assert!(
        left.contains("other/"),
        "another path's upload is kept: {left}"
    );
    assert!(sigterm(&mut child).success());
}

/// Objects bigger than one ranged GET, encrypted: a WAL-heavy history (transactions of several
/// MiB after a small snapshot) restores from S3 and GCS through parallel ranged reads, equal to
/// the source, and a point in time in the middle equals the source at that index.
#[test]
fn big_encrypted_objects_restore_by_ranges_from_s3_and_gcs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = s3_server(&d.join("s3"));
    let gcs = gcs_server(&d.join("gcs"));
    for (label, url) in [
        ("s3", s3_url(s3.port, "big.db")),
        ("gcs", gcs_url(gcs.port, "big.db")),
    ] {
        let key = age_key(d, label);
        let flags = [
            "--age-recipient-file",
            key.recipient_file.to_str().unwrap(),
            "--age-identity-file",
            key.identity_file.to_str().unwrap(),
        ];
        let db = d.join(format!("{label}.db"));
        let app = app_conn(&db);
        app.execute_batch("PRAGMA wal_autocheckpoint = 0").unwrap();
        write_marked(&app, 10);
        let log = d.join(format!("{label}.log"));
        let mut child = replicate_with(&db, &url, &flags, &log);
        std::thread::sleep(Duration::from_millis(1500));
        let mut middle = None;
        for round in 0..3 {
            // ~6 MiB of incompressible rows in one transaction: one segment above 4 MiB.
            app.execute_batch("BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 1500) INSERT INTO t (v) SELECT randomblob(4000) FROM n; COMMIT;").unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            if round == 1 {
                middle = Some(dump_conn(&app));
                // The next transaction goes into a new WAL index.
                app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(1500));
            }
        }
        assert!(sigterm(&mut child).success());
        let segs = listing("wal", &url);
        let big = segs
            .iter()
            .filter(|s| s["size"].as_u64().unwrap_or(0) > 4 << 20)
            .count();
        assert!(big >= 2, "{label}: segments above one range: {segs:?}");
        let indexes: Vec<u64> = segs.iter().filter_map(|s| s["index"].as_u64()).collect();
        let (first, last) = (indexes[0], *indexes.last().unwrap());
        assert!(last > first, "{label}: several WAL indexes: {indexes:?}");

        let restore_with = |out: &Path, index: Option<u64>, parallelism: &str| {
            let mut c = cmd();
            c.args(["restore", "--parallelism", parallelism, "-o"])
                .arg(out)
                .arg("--age-identity-file")
                .arg(&key.identity_file);
            if let Some(i) = index {
                c.args(["--index", &format!("{i:08x}")]);
            }
            let o = c.arg(&url).output().unwrap();
            assert!(
                o.status.success(),
                "{label}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let restore = |out: &Path, index: Option<u64>| restore_with(out, index, "8");
        let out = d.join(format!("{label}-restored.db"));
        restore(&out, None);
        assert_eq!(integrity(&out), "ok");
        assert_eq!(dump(&out), dump_conn(&app), "{label}: latest");
        // One connection: every object by one plain GET, the same result.
        let plain = d.join(format!("{label}-plain.db"));
        restore_with(&plain, None, "1");
        assert!(
            std::fs::read(&plain).unwrap() == std::fs::read(&out).unwrap(),
            "{label}: --parallelism 1 restores the same bytes"
        );
        // The index before the TRUNCATE checkpoint holds the state after round 1.
        let before_truncate = segs
            .iter()
            .filter(|s| s["size"].as_u64().unwrap_or(0) > 4 << 20)
            .nth(1)
            .and_then(|s| s["index"].as_u64())
            .unwrap();
        let out = d.join(format!("{label}-middle.db"));
        restore(&out, Some(before_truncate));
        assert_eq!(
            dump(&out),
            middle.clone().unwrap(),
            "{label}: at index {before_truncate}"
        );
    }
}

/// A standby following an S3 replica that the daemon writes (issue 19): whole commits only,
/// and while caught up two GETs per poll and a listing every `LIST_EVERY` polls, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_follows_s3_with_probes_not_listings() {
    use litestreamd::replica::{ReplicaClient, meter::RequestMeter, s3};
    use litestreamd::standby::{Follower, LIST_EVERY, Step};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(&dir.path().join("s3"));
    let url = s3_url(server.port, "standby.db");
    let db = dir.path().join("app.db");
    let app = rusqlite::Connection::open(&db).unwrap();
    app.busy_timeout(Duration::from_secs(10)).unwrap();
    app.execute_batch("PRAGMA journal_mode = wal").unwrap();
    bank(&app);
    let mut primary = replicate(&db, &url);
    let scratch = dir.path().join("probes");
    std::fs::create_dir_all(&scratch).unwrap();
    let check = |p: &Path| accounts(&rusqlite::Connection::open(p).unwrap()) == (10_000, 0);
    tokio::task::block_in_place(|| wait_restorable(&url, &scratch, check));

    let cfg = s3_config(server.port, "standby.db");
    let meter = Arc::new(RequestMeter::default());
    let store = Arc::new(s3::S3Store::new(cfg).await.unwrap());
    let standby = dir.path().join("standby.db");
    let mut f = Follower::new(&standby, ReplicaClient::metered(store, meter.clone())).unwrap();
    bootstraps_first(&mut f).await;
    let mut rng = Lcg(3);
    let mut lags = Vec::new();
    for round in 1..=3 {
        transfer(&app, &mut rng, 100);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Step::Applied { lag, .. } = f.step().await.unwrap() {
                lags.push(lag.expect("S3 downloads say when the object was written"));
            }
            let c = rusqlite::Connection::open_with_flags(
                &standby,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let (sum, blobs) = accounts(&c);
            assert_eq!(sum, 10_000, "a torn transaction on the standby");
            if blobs == round * 100 {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: {blobs} rows");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // From the upload to its application: the primary's 100 ms sync interval and a poll
    // here, far below the bound (a stalled follow would exceed it).
    assert!(
        !lags.is_empty() && lags.iter().all(|l| *l < Duration::from_secs(10)),
        "{lags:?}"
    );
    assert!(sigterm(&mut primary).success());
    while f.step().await.unwrap() != Step::CaughtUp {}
    assert_eq!(dump_rows(&standby, "blob"), dump_rows(&db, "blob"));

    let before = meter.totals();
    for _ in 0..2 * LIST_EVERY {
        assert_eq!(f.step().await.unwrap(), Step::CaughtUp);
    }
    let after = meter.totals();
    let polls = 2 * LIST_EVERY as u64;
    assert_eq!(after.get - before.get, 2 * polls, "two GETs per idle poll");
    // A listing: generations, then the generation's snapshots and segments (for the plan),
    // and its segments again (for a gap).
    assert_eq!(after.list - before.list, 2 * 4, "{before:?} -> {after:?}");
    assert_eq!(
        (after.put, after.delete, after.head),
        (before.put, before.delete, before.head),
        "a standby never writes"
    );
}

/// An S3 front that logs every request (`METHOD path` per line in `log`, then ` if-none-match`
/// for a create-only request and ` lock=MODE` for one carrying an Object Lock mode) and, with
/// `deny_deletes`, answers every deletion (DELETE, and POST `?delete`, the batch delete) with
/// 403 AccessDenied as S3 does for credentials without `s3:DeleteObject`. A small Python
/// proxy, like `tls_proxy`; stopping it (`Server::down`) is an outage of the store.
fn s3_proxy(backend: u16, log: &Path, deny_deletes: bool) -> Server {
    let port = free_port();
    let script = r#"
import http.client, http.server, sys, threading
backend, port, log, deny = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "deny"
lock = threading.Lock()
HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}
DENIED = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""
    def any(self):
        body = self.body()
        query = self.path.partition("?")[2].split("&")
        deleting = self.command == "DELETE" or (self.command == "POST" and "delete" in [q.split("=")[0] for q in query])
        with lock, open(log, "a") as f:
            inm = " if-none-match" if self.headers.get("If-None-Match") == "*" else ""
            mode = self.headers.get("x-amz-object-lock-mode")
            locked = f" lock={mode}" if mode else ""
            f.write(f"{self.command} {self.path}{inm}{locked}{' DENIED' if deleting and deny else ''}\n")
        if deleting and deny:
            self.send_response_only(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(DENIED)))
            self.end_headers()
            self.wfile.write(DENIED)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=120)
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        self.send_response_only(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = any
http.server.ThreadingHTTPServer(("127.0.0.1", port), Proxy).serve_forever()
"#;
    Server::start(
        vec![
            "python3".into(),
            "-c".into(),
            script.into(),
            backend.to_string(),
            port.to_string(),
            log.display().to_string(),
            if deny_deletes { "deny" } else { "pass" }.into(),
        ],
        port,
    )
}

/// The requests a proxy logged that delete something (DELETE, batch delete).
fn deletions(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("DELETE ") || (l.starts_with("POST ") && l.contains("delete")))
        .map(str::to_string)
        .collect()
}

fn s3_bucket_url(bucket: &str, port: u16, path: &str) -> String {
    format!(
        "s3://{bucket}/{path}?endpoint=http://127.0.0.1:{port}&region=us-east-1&force-path-style=true"
    )
}

/// `litestreamd run` on a config dir under `d` with one database whose replica is
/// `replica_toml` (the `[[replicas]]` keys) and fast intervals; returns the child, its control
/// socket and its log.
fn run_daemon(
    d: &Path,
    db: &Path,
    replica_toml: &str,
    log_name: &str,
) -> (Child, PathBuf, PathBuf) {
    let socket = d.join("control.sock");
    std::fs::create_dir_all(d.join("dbs.d")).unwrap();
    std::fs::write(
        d.join("litestreamd.toml"),
        format!(
            "dbs_dir = \"dbs.d\"\nmetrics_addr = \"\"\ncontrol_socket = \"{}\"\n[defaults]\nmonitor_interval = \"100ms\"\nsync_interval = \"100ms\"\ncheckpoint_interval = \"1s\"\nmin_checkpoint_page_count = 50\n[defaults.retry]\ninitial = \"100ms\"\nmax = \"500ms\"\nfailed_after = 1000\n",
            socket.display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dbs.d/app.toml"),
        format!(
            "path = \"{}\"\n[[replicas]]\nname = \"s3\"\n{replica_toml}\n",
            db.display()
        ),
    )
    .unwrap();
    let log = d.join(log_name);
    let child = cmd()
        .args(["run", "--config"])
        .arg(d.join("litestreamd.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, socket, log)
}

fn status_json(socket: &Path) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Issue 20 on moto with S3 Object Lock (a bucket created with Object Lock and a default
/// retention): an append-only replica with `object_lock` replicates through checkpoints and
/// snapshots, a restart and an outage of the store, and restores identical; every object
/// version carries the retention, no key was written twice, and no deletion was ever sent
/// (counted by the proxy in front of moto).
#[test]
fn append_only_replica_on_an_object_lock_bucket_never_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let moto = moto_server();
    boto3(
        moto.port,
        "s3.create_bucket(Bucket='locked', ObjectLockEnabledForBucket=True)\ns3.put_object_lock_configuration(Bucket='locked', ObjectLockConfiguration={'ObjectLockEnabled': 'Enabled', 'Rule': {'DefaultRetention': {'Mode': 'GOVERNANCE', 'Days': 1}}})",
    );
    let plog = d.join("proxy.log");
    let mut proxy = s3_proxy(moto.port, &plog, false);
    let url = s3_bucket_url("locked", proxy.port, "app.db");
    let db = d.join("app.db");
    let app = app_conn(&db);
    let mut rng = Lcg(20);
    write_mixed(&app, &mut rng, 50);
    // ~6 MiB of incompressible rows: each snapshot is a multipart upload of 5 MiB parts
    // (per-part checksums, lock headers on its creation, If-None-Match on its completion).
    app.execute_batch(
        "CREATE TABLE noise (v BLOB); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 1500) INSERT INTO noise SELECT randomblob(4000) FROM n;",
    )
    .unwrap();
    let replica = format!(
        "url = \"{url}\"\npart_size = 5242880\nappend_only = true\nsnapshot_interval = \"2s\"\nobject_lock = {{ mode = \"compliance\", days = 2 }}"
    );
    let (mut daemon, socket, log) = run_daemon(d, &db, &replica, "run1.log");
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    // Checkpoints (min_checkpoint_page_count 50) and interval snapshots while it writes.
    for _ in 0..6 {
        app.execute_batch("CREATE TABLE IF NOT EXISTS big (v BLOB)")
            .unwrap();
        for _ in 0..40 {
            app.execute("INSERT INTO big VALUES (randomblob(3000))", [])
                .unwrap();
        }
        write_mixed(&app, &mut rng, 20);
        std::thread::sleep(Duration::from_millis(700));
    }
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    let snaps = listing("snapshots", &url);
    assert!(
        snaps.len() >= 2,
        "interval snapshots were written: {snaps:?}"
    );

    // Restart: the lease is released by a new (expired) record and taken again.
    assert!(sigterm(&mut daemon).success());
    write_mixed(&app, &mut rng, 30);
    let (mut daemon, _, log2) = run_daemon(d, &db, &replica, "run2.log");
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));

    // An outage of the store while the application writes; replication recovers.
    proxy.down();
    write_mixed(&app, &mut rng, 40);
    std::thread::sleep(Duration::from_secs(2));
    proxy.up();
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    let st = status_json(&socket).expect("status");
    assert_eq!(st[0]["replicas"][0]["state"], "healthy", "{st}");
    assert!(sigterm(&mut daemon).success());

    let out = d.join("restored.db");
    assert_restores(&url, &out, &app);
    assert_eq!(integrity(&out), "ok");

    // Every version of every object: one version per key (nothing replaced), no delete
    // marker, each locked in compliance mode until ~2 days after its upload.
    let report = boto3(
        moto.port,
        r#"import datetime, json
v = s3.list_object_versions(Bucket='locked', Prefix='app.db/')
out = {'markers': len(v.get('DeleteMarkers', [])), 'objects': []}
for o in v.get('Versions', []):
    h = s3.head_object(Bucket='locked', Key=o['Key'], VersionId=o['VersionId'])
    until = h.get('ObjectLockRetainUntilDate')
    left = (until - datetime.datetime.now(datetime.timezone.utc)).total_seconds() if until else None
    out['objects'].append([o['Key'], h.get('ObjectLockMode'), left])
print(json.dumps(out))"#,
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(v["markers"], 0, "{v}");
    let objects = v["objects"].as_array().unwrap();
    let mut keys: Vec<&str> = objects.iter().map(|o| o[0].as_str().unwrap()).collect();
    assert!(keys.iter().any(|k| k.contains("/snapshots/")), "{v}");
    assert!(keys.iter().any(|k| k.contains("/wal/")), "{v}");
    assert!(keys.iter().any(|k| k.contains("litestreamd-lease/")), "{v}");
    // What went up in one request carries the lock as moto stores it. A multipart upload's
    // lock is sent on its creation (checked in the proxy's log below), but moto does not
    // apply it at completion (`complete_multipart_upload` in its models.py), so those versions
    // are checked by the request, not by the store.
    let requests = std::fs::read_to_string(&plog).unwrap();
    let multipart: Vec<String> = requests
        .lines()
        .filter(|l| l.starts_with("POST /locked/") && l.contains("?uploads"))
        .map(|l| {
            assert!(l.ends_with(" lock=COMPLIANCE"), "{l}");
            l["POST /locked/".len()..l.find('?').unwrap()].to_string()
        })
        .collect();
    for o in objects {
        let key = o[0].as_str().unwrap();
        if multipart.iter().any(|k| k == key) && o[2].is_null() {
            continue;
        }
        assert_eq!(o[1], "COMPLIANCE", "{o}");
        let left = o[2].as_f64().unwrap();
        assert!(left > 47.0 * 3600.0 && left <= 48.0 * 3600.0, "{o}");
    }
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "a key was written twice: {v}");
    assert!(
        !keys.contains(&"app.db/litestreamd.lease"),
        "the append-only lease never uses the replaceable object"
    );
    // Every upload under the replica path is create-only (If-None-Match: *), so a bucket
    // policy can require it: the owner record, lease records, snapshots and segments.
    let puts: Vec<&str> = requests
        .lines()
        .filter(|l| l.starts_with("PUT /locked/app.db/") && !l.contains("partNumber="))
        .collect();
    assert!(puts.len() > 10, "{requests}");
    assert!(
        puts.iter()
            .all(|l| l.ends_with(" if-none-match lock=COMPLIANCE")),
        "{requests}"
    );
    assert!(!multipart.is_empty(), "no multipart snapshot: {requests}");
    // Multipart snapshots: created, their parts uploaded, completed create-only.
    let completions: Vec<&str> = requests
        .lines()
        .filter(|l| l.starts_with("POST /locked/app.db/") && l.contains("uploadId="))
        .collect();
    assert!(
        completions.iter().all(|l| l.ends_with(" if-none-match")),
        "{requests}"
    );
    assert_eq!(
        deletions(&plog),
        Vec::<String>::new(),
        "no deletion is ever sent"
    );
    for l in [&log, &log2] {
        let text = std::fs::read_to_string(l).unwrap();
        assert!(
            !text.contains("refused: this replica is append-only"),
            "nothing tried to delete:\n{text}"
        );
    }
}

/// Issue 20 against credentials that cannot delete (a proxy answering every deletion with
/// AccessDenied in front of s3s-fs): an append-only replica works end to end and sends no
/// deletion; a normal replica's retention fails with the store's error shown in `status`,
/// counted, and logged, while replication goes on.
#[test]
fn without_delete_permission_append_only_works_and_normal_mode_reports_retention() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = s3_server(&d.join("s3"));
    let wait_until = |what: &str, secs: u64, mut f: Box<dyn FnMut() -> bool + '_>| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();

    // Normal mode: retention of 2 s, checked every second, snapshots every second.
    let normal = d.join("normal");
    std::fs::create_dir_all(&normal).unwrap();
    let nlog = normal.join("proxy.log");
    let proxy = s3_proxy(s3.port, &nlog, true);
    let url = s3_url(proxy.port, "normal.db");
    let db = normal.join("normal.db");
    let app = app_conn(&db);
    let mut rng = Lcg(7);
    write_mixed(&app, &mut rng, 30);
    let (mut daemon, socket, log) = run_daemon(
        &normal,
        &db,
        &format!(
            "url = \"{url}\"\nretention = \"2s\"\nretention_check_interval = \"1s\"\nsnapshot_interval = \"1s\""
        ),
        "daemon.log",
    );
    let mut error = String::new();
    wait_until(
        "the failed retention never showed in status",
        60,
        Box::new(|| {
            write_mixed(&app, &mut rng, 2);
            let Some(st) = status_json(&socket) else {
                return false;
            };
            error = st[0]["replicas"][0]["retention_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            !error.is_empty()
        }),
    );
    assert!(error.contains("AccessDenied"), "{error}");
    assert!(error.contains("retention failed"), "{error}");
    // Still replicating: what is written now reaches the replica, and the replica is healthy.
    write_mixed(&app, &mut rng, 20);
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    let st = status_json(&socket).unwrap();
    assert_eq!(st[0]["replicas"][0]["state"], "healthy", "{st}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("retention pass failed"), "{text}");
    assert!(!deletions(&nlog).is_empty(), "normal mode tried to delete");
    assert!(deletions(&nlog).iter().all(|l| l.ends_with("DENIED")));
    assert!(sigterm(&mut daemon).success());
    drop(proxy);

    // Append-only: the same credentials, end to end, keep-alive snapshots included.
    let ao = d.join("append-only");
    std::fs::create_dir_all(&ao).unwrap();
    let alog = ao.join("proxy.log");
    let proxy = s3_proxy(s3.port, &alog, true);
    let url = s3_url(proxy.port, "ao.db");
    let db = ao.join("ao.db");
    let app = app_conn(&db);
    write_mixed(&app, &mut rng, 30);
    let (mut daemon, socket, log) = run_daemon(
        &ao,
        &db,
        &format!(
            "url = \"{url}\"\nappend_only = true\nsnapshot_keepalive = \"2s\"\nretention_check_interval = \"1s\""
        ),
        "daemon.log",
    );
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    // Idle for a few keep-alives: new snapshots, none replaced.
    let before = listing("snapshots", &url).len();
    std::thread::sleep(Duration::from_secs(5));
    write_mixed(&app, &mut rng, 10);
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    let after = listing("snapshots", &url).len();
    assert!(
        after >= before + 2,
        "keep-alive snapshots: {before} then {after}"
    );
    let st = status_json(&socket).unwrap();
    let r = &st[0]["replicas"][0];
    assert_eq!(r["state"], "healthy", "{st}");
    assert!(r["retention_error"].is_null(), "{st}");
    assert!(sigterm(&mut daemon).success());
    assert_eq!(deletions(&alog), Vec::<String>::new());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("keep-alive snapshot"), "{text}");
    let out = d.join("ao-restored.db");
    assert_restores(&url, &out, &app);
}

/// Issue 20's lifecycle: an idle database on an append-only replica whose "bucket" deletes
/// every object older than 6 s (the test plays the lifecycle rule on a directory replica)
/// stays restorable at every moment thanks to keep-alive snapshots every 2 s; with a
/// keep-alive longer than the expiry, the same database is soon not restorable at all — the
/// coverage gap `docs/operations.md` warns about.
#[test]
fn keep_alive_snapshots_keep_an_idle_database_restorable_under_a_lifecycle_rule() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let expiry = Duration::from_secs(6);
    let expire = |replica: &Path| {
        for f in files_under(&replica.join("generations")) {
            let old = std::fs::metadata(&f)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > expiry);
            if old {
                let _ = std::fs::remove_file(&f);
            }
        }
    };
    for (keepalive, label) in [("2s", "kept-alive"), ("1h", "not-kept-alive")] {
        let replica = d.join(format!("{label}-replica"));
        let url = format!("file://{}", replica.display());
        let db = d.join(format!("{label}.db"));
        let app = app_conn(&db);
        let mut rng = Lcg(9);
        write_mixed(&app, &mut rng, 40);
        let mut child = replicate_with(
            &db,
            &url,
            &[
                "--append-only",
                "--snapshot-keepalive",
                keepalive,
                "--retention-check-interval",
                "1s",
            ],
            &d.join(format!("{label}.log")),
        );
        let probes = d.join(format!("{label}-probes"));
        std::fs::create_dir_all(&probes).unwrap();
        wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
        let want = dump_conn(&app);
        // Idle from here; the lifecycle runs for three expiry periods.
        let start = Instant::now();
        let mut failures = Vec::new();
        let mut n = 0;
        while start.elapsed() < expiry * 3 {
            expire(&replica);
            n += 1;
            let out = probes.join(format!("idle-{n}.db"));
            let o = restore_url(&url, &out);
            if !o.status.success() || dump(&out) != want {
                failures.push(format!(
                    "{:?}: {}",
                    start.elapsed(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(sigterm(&mut child).success());
        if label == "kept-alive" {
            assert!(n > 30, "{n} probes");
            assert_eq!(
                failures,
                Vec::<String>::new(),
                "not restorable at some moment"
            );
        } else {
            assert!(
                !failures.is_empty(),
                "without keep-alive the lifecycle leaves nothing to restore"
            );
            eprintln!(
                "without keep-alive: {} of {n} restores failed, first: {}",
                failures.len(),
                failures[0]
            );
        }
    }
}

/// An append-only replica on GCS (fake-gcs-server, which has no IAM or retention policy: what is
/// tested is that the append-only path works end to end there — create-only uploads with
/// `ifGenerationMatch=0`, the chain lease, checkpoints, a restart — not the bucket's refusal).
#[test]
fn append_only_replica_on_gcs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gcs = gcs_server(&d.join("gcs"));
    let url = gcs_url(gcs.port, "ao.db");
    let db = d.join("ao.db");
    let app = app_conn(&db);
    let mut rng = Lcg(31);
    write_mixed(&app, &mut rng, 40);
    let flags = ["--append-only", "--snapshot-interval", "1s"];
    let mut child = replicate_with(&db, &url, &flags, &d.join("run1.log"));
    let probes = d.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    // More than a checkpoint's worth of pages: a new WAL index, and interval snapshots.
    app.execute_batch("CREATE TABLE IF NOT EXISTS big (v BLOB)")
        .unwrap();
    for _ in 0..1200 {
        app.execute("INSERT INTO big VALUES (randomblob(3000))", [])
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(sigterm(&mut child).success());
    write_mixed(&app, &mut rng, 20);
    let mut child = replicate_with(&db, &url, &flags, &d.join("run2.log"));
    wait_restorable(&url, &probes, |p| dump(p) == dump_conn(&app));
    assert!(sigterm(&mut child).success());
    let snaps = listing("snapshots", &url);
    assert!(snaps.len() >= 2, "{snaps:?}");
    let objects = files_under(&d.join("gcs/litestream-bucket"));
    let names: Vec<String> = objects.iter().map(|p| p.display().to_string()).collect();
    assert!(
        names
            .iter()
            .filter(|n| n.contains("litestreamd-lease"))
            .count()
            >= 4,
        "two runs: a record to take and one to release each: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.ends_with("litestreamd.lease")),
        "{names:?}"
    );
    for l in ["run1.log", "run2.log"] {
        let text = std::fs::read_to_string(d.join(l)).unwrap();
        assert!(!text.contains("already exists"), "{text}");
        assert!(!text.contains("refused: this replica"), "{text}");
    }
}
