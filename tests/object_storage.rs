//! S3 and GCS targets against real servers on 127.0.0.1 that the tests start themselves:
//! s3s-fs (an S3-compatible server that stores objects as files and checks signatures) and
//! fake-gcs-server (a GCS JSON-API emulator, filesystem backend). Both keep their data across a
//! restart, which is how the outage tests stop and start "the same" server.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_litestreamd");
const KEY: &str = "litestreamd-test-key";
const SECRET: &str = "litestreamd-test-secret";

fn deps_bin(var: &str, default: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/litestreamd-deps")
            .join(default)
    });
    assert!(
        p.exists(),
        "{var}: {} not found — run the README's test command (tests/run.sh), which installs it",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback server process that can be stopped and started again on the same port and data.
struct Server {
    cmd: Vec<String>,
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start(cmd: Vec<String>, port: u16) -> Server {
        let mut s = Server {
            cmd,
            port,
            child: None,
        };
        s.up();
        s
    }
    fn up(&mut self) {
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_port(self.port);
    }
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// s3s-fs with bucket `litestream-bucket`, data under `root`.
fn s3_server(root: &Path) -> Server {
    let bin = deps_bin("S3S_FS_BIN", "s3s-fs/bin/s3s-fs");
    std::fs::create_dir_all(root.join("litestream-bucket")).unwrap();
    let port = free_port();
    let cmd = vec![
        bin.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--access-key".into(),
        KEY.into(),
        "--secret-key".into(),
        SECRET.into(),
        root.display().to_string(),
    ];
    Server::start(cmd, port)
}

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

fn s3_url(port: u16, path: &str) -> String {
    format!(
        "s3://litestream-bucket/{path}?endpoint=http://127.0.0.1:{port}&region=us-east-1&force-path-style=true"
    )
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

fn replicate(db: &Path, url: &str) -> Child {
    cmd()
        .args([
            "replicate",
            "--monitor-interval",
            "100ms",
            "--sync-interval",
            "100ms",
        ])
        .arg(db)
        .arg(url)
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
    let o = Command::new(&ls)
        .args(["restore", "-config"])
        .arg(&cfg)
        .arg("-o")
        .arg(&out)
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "litestream restore: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(dump(&out), dump_conn(&app));

    // Litestream writes, litestreamd restores.
    let db = dir.path().join("b.db");
    let app = app_conn(&db);
    let cfg = dir.path().join("ls-b.yml");
    std::fs::write(
        &cfg,
        format!("dbs:\n  - path: {}\n    monitor-interval: 100ms\n    min-checkpoint-page-count: 30\n    replicas:\n      -\n{}", db.display(), replica_yaml("b.db")),
    )
    .unwrap();
    let mut child = Command::new(&ls)
        .args(["replicate", "-config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..6 {
        write_mixed(&app, &mut rng, 100);
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(sigterm(&mut child).success());
    let out = dir.path().join("b-by-litestreamd.db");
    let o = restore_url(&s3_url(server.port, "b.db"), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dump(&out), dump_conn(&app));
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
        bucket: "litestream-bucket".into(),
        path: "big.db".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", server.port)),
        region: Some("us-east-1".into()),
        force_path_style: Some(true),
        access_key_id: Some(KEY.into()),
        secret_access_key: Some(SECRET.into()),
        part_size: Some(MIN_PART_SIZE),
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
            path: "app.db".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: Some("us-east-1".into()),
            force_path_style: Some(true),
            access_key_id: Some(KEY.into()),
            secret_access_key: Some(secret.into()),
            part_size: None,
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
                    litestreamd::replicator::ReplicaState::Retrying { .. }
                        | litestreamd::replicator::ReplicaState::Failed { .. }
                ));
            }
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
