//! The daemon (`litestreamd run`) end to end: a config directory, SIGHUP reloads, systemd
//! notifications on a datagram socket bound by the test, Prometheus metrics over HTTP,
//! `restore_on_start`, and `config check`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_litestreamd");

const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;

struct Daemon {
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
    metrics_port: u16,
}

impl Daemon {
    fn start(dir: &Path, main: &Path, watchdog_usec: Option<u64>) -> Daemon {
        Daemon::start_with(dir, main, watchdog_usec, |_| {})
    }

    /// `start`, with a last say over the command (limits, environment).
    fn start_with(
        dir: &Path,
        main: &Path,
        watchdog_usec: Option<u64>,
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let sock = dir.join(format!("notify-{}.sock", rand_suffix()));
        let notify = UnixDatagram::bind(&sock).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let log = dir.join(format!("daemon-{}.log", rand_suffix()));
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(main)
            .env("NOTIFY_SOCKET", &sock)
            .env_remove("WATCHDOG_PID");
        if let Some(us) = watchdog_usec {
            cmd.env("WATCHDOG_USEC", us.to_string());
        }
        customize(&mut cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let metrics_port = std::fs::read_to_string(main)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("metrics_addr = \"127.0.0.1:"))
            .map(|p| p.trim_end_matches('"').parse().unwrap())
            .unwrap_or(0);
        Daemon {
            child,
            notify,
            log,
            metrics_port,
        }
    }

    /// Next notification datagram (all its lines).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification: {e}\nlog:\n{}", self.log()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits for a datagram containing `line`, returning everything seen before it too.
    fn expect(&self, line: &str) -> (String, Vec<String>) {
        let mut seen = Vec::new();
        loop {
            let m = self.next();
            if m.lines().any(|l| l == line) {
                return (m, seen);
            }
            seen.push(m);
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn stop(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        send_signal(&self.child, SIGTERM);
        let mut msgs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.notify
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.notify.recv(&mut buf) {
                msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, msgs, self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not stop");
        }
    }
}

/// A test that fails must not leave its daemon running.
impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|v| v.trim().parse().ok())
    })
}

fn db_file(dir: &Path, name: &str, replica: &Path) -> String {
    format!(
        "path = \"{}\"\n\n[[replicas]]\nname = \"local\"\ntype = \"file\"\npath = \"{}\"\n",
        dir.join(format!("{name}.db")).display(),
        replica.display()
    )
}

fn write_main(dir: &Path, extra: &str) -> PathBuf {
    let main = dir.join("litestreamd.toml");
    std::fs::write(
        &main,
        format!(
            "dbs_dir = \"dbs.d\"\nmetrics_addr = \"127.0.0.1:{}\"\nmetrics_idle_timeout = \"2s\"\n{extra}{socket}\n[defaults]\nmonitor_interval = \"100ms\"\nsync_interval = \"100ms\"\n\n[defaults.retry]\ninitial = \"100ms\"\nmax = \"500ms\"\nfailed_after = 50\n",
            free_port(),
            // Each daemon gets its own control socket (tests run in parallel).
            socket = if extra.contains("control_socket") {
                String::new()
            } else {
                format!("control_socket = \"{}\"\n", dir.join("control.sock").display())
            },
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("dbs.d")).unwrap();
    main
}

/// Polls until a restore of the replica has `rows` rows in t.
fn wait_replica_rows(replica: &Path, scratch: &Path, rows: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let out = scratch.join(format!("probe-{}-{n}.db", rand_suffix()));
        let ok = Command::new(BIN)
            .args(["restore", "--no-integrity-check", "-o"])
            .arg(&out)
            .arg(format!("file://{}", replica.display()))
            .output()
            .unwrap();
        if ok.status.success() && dump(&out).len() == rows {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {} never reached {rows} rows",
            replica.display()
        );
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// `n` databases `db0`..: a config file each (replica `replica-I`) and 5 rows; their
/// application connections.
fn databases(d: &Path, n: usize) -> Vec<rusqlite::Connection> {
    (0..n)
        .map(|i| {
            let name = format!("db{i}");
            std::fs::write(
                d.join(format!("dbs.d/{name}.toml")),
                db_file(d, &name, &d.join(format!("replica-{i}"))),
            )
            .unwrap();
            let app = app_conn(&d.join(format!("{name}.db")));
            insert(&app, 5);
            app
        })
        .collect()
}

/// Runs the daemon with at most `n` open files.
fn limit_files(cmd: &mut Command, n: u64) {
    use nix::sys::resource::{Resource, setrlimit};
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(std::io::Error::from)
        });
    }
}

fn insert(c: &rusqlite::Connection, n: usize) {
    for _ in 0..n {
        c.execute("INSERT INTO t (v) VALUES (randomblob(100))", [])
            .unwrap();
    }
}

fn generation(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!(".{name}.db-litestream/generation")))
        .unwrap_or_default()
}

#[test]
fn reload_notify_metrics_and_final_sync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let scratch = d.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let main = write_main(d, "");
    let rep = |n: &str| d.join(format!("replica-{n}"));
    let apps: Vec<(String, rusqlite::Connection)> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            let c = app_conn(&d.join(format!("{n}.db")));
            insert(&c, 5);
            (n.to_string(), c)
        })
        .collect();
    let app = |n: &str| &apps.iter().find(|(m, _)| m == n).unwrap().1;
    for n in ["a", "b", "c"] {
        std::fs::write(d.join(format!("dbs.d/{n}.toml")), db_file(d, n, &rep(n))).unwrap();
    }
    // Ignored: an editor backup and a dpkg leftover.
    std::fs::write(d.join("dbs.d/a.toml~"), "not toml").unwrap();
    std::fs::write(d.join("dbs.d/x.toml.dpkg-dist"), "not toml").unwrap();

    let daemon = Daemon::start(d, &main, Some(400_000));
    let (ready, _) = daemon.expect("READY=1");
    assert!(ready.contains("STATUS=replicating 3 databases"), "{ready}");
    for n in ["a", "b", "c"] {
        wait_replica_rows(&rep(n), &scratch, 5);
    }
    // Watchdog pings at half of WATCHDOG_USEC.
    let (_, _) = daemon.expect("WATCHDOG=1");
    let gen_a = generation(d, "a");

    // Metrics: per-database and per-replica series, values that move with writes.
    let m1 = daemon.metrics();
    for series in [
        "litestreamd_db_size_bytes{db=\"a\"}",
        "litestreamd_wal_size_bytes{db=\"a\"}",
        "litestreamd_shadow_wal_bytes{db=\"a\"}",
        "litestreamd_replica_lag_seconds{db=\"a\",replica=\"local\"}",
        "litestreamd_replica_lag_bytes{db=\"a\",replica=\"local\"}",
        "litestreamd_replica_last_sync_timestamp_seconds{db=\"a\",replica=\"local\"}",
        "litestreamd_replica_state{db=\"a\",replica=\"local\",state=\"healthy\"}",
        "litestreamd_replica_wal_index{db=\"a\",replica=\"local\"}",
        "litestreamd_checkpoints_total{db=\"a\",mode=\"PASSIVE\"}",
        "litestreamd_db_syncs_total{db=\"a\"}",
        "litestreamd_replica_uploads_total{db=\"a\",replica=\"local\"}",
        "litestreamd_databases{state=\"replicating\"}",
    ] {
        assert!(metric(&m1, series).is_some(), "missing {series} in\n{m1}");
    }
    assert!(m1.contains("litestreamd_build_info{version="), "{m1}");
    assert_eq!(
        metric(
            &m1,
            "litestreamd_replica_state{db=\"a\",replica=\"local\",state=\"healthy\"}"
        ),
        Some(1.0)
    );
    let written1 = metric(&m1, "litestreamd_shadow_wal_written_bytes_total{db=\"a\"}").unwrap();
    let uploads1 = metric(
        &m1,
        "litestreamd_replica_uploads_total{db=\"a\",replica=\"local\"}",
    )
    .unwrap();
    insert(app("a"), 20);
    wait_replica_rows(&rep("a"), &scratch, 25);
    let m2 = daemon.metrics();
    assert!(
        metric(&m2, "litestreamd_shadow_wal_written_bytes_total{db=\"a\"}").unwrap() > written1
    );
    assert!(
        metric(
            &m2,
            "litestreamd_replica_uploads_total{db=\"a\",replica=\"local\"}"
        )
        .unwrap()
            > uploads1
    );

    // Add d.
    std::fs::write(d.join("dbs.d/d.toml"), db_file(d, "d", &rep("d"))).unwrap();
    send_signal(&daemon.child, SIGHUP);
    let (reloading, _) = daemon.expect("RELOADING=1");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 and MONOTONIC_USEC in one datagram: {reloading}"
    );
    let (ready, _) = daemon.expect("READY=1");
    assert!(ready.contains("replicating 4 databases"), "{ready}");
    wait_replica_rows(&rep("d"), &scratch, 5);

    // Remove c: its last writes are synced before it stops.
    insert(app("c"), 7);
    std::fs::remove_file(d.join("dbs.d/c.toml")).unwrap();
    send_signal(&daemon.child, SIGHUP);
    daemon.expect("RELOADING=1");
    daemon.expect("READY=1");
    wait_replica_rows(&rep("c"), &scratch, 12);
    insert(app("c"), 3);
    std::thread::sleep(Duration::from_millis(800));
    wait_replica_rows(&rep("c"), &scratch, 12); // no longer replicated

    // Change b's target: only b restarts; a keeps its worker, generation and position.
    let a_pos = metric(
        &daemon.metrics(),
        "litestreamd_replica_wal_offset_bytes{db=\"a\",replica=\"local\"}",
    );
    std::fs::write(d.join("dbs.d/b.toml"), db_file(d, "b", &rep("b2"))).unwrap();
    send_signal(&daemon.child, SIGHUP);
    daemon.expect("RELOADING=1");
    daemon.expect("READY=1");
    wait_replica_rows(&rep("b2"), &scratch, 5);
    let log = daemon.log();
    let reload_line = log
        .lines()
        .rfind(|l| l.contains("reload done"))
        .unwrap()
        .to_string();
    assert!(
        reload_line.contains("restarted=[\"b\"]")
            && reload_line.contains("added=[]")
            && reload_line.contains("removed=[]"),
        "{reload_line}"
    );
    assert_eq!(generation(d, "a"), gen_a);
    assert_eq!(
        metric(
            &daemon.metrics(),
            "litestreamd_replica_wal_offset_bytes{db=\"a\",replica=\"local\"}"
        ),
        a_pos
    );

    // A broken file: reported with path and line; a keeps running on its last good config.
    std::fs::write(
        d.join("dbs.d/a.toml"),
        format!(
            "{}\nmin_checkpoint_page_count = \"lots\"\n",
            db_file(d, "a", &rep("a"))
        ),
    )
    .unwrap();
    send_signal(&daemon.child, SIGHUP);
    daemon.expect("RELOADING=1");
    let (ready, _) = daemon.expect("READY=1");
    assert!(
        ready.contains("error"),
        "STATUS tells about the failed reload: {ready}"
    );
    let log = daemon.log();
    assert!(
        log.contains("a.toml")
            && log.contains("line 8")
            && log.contains("min_checkpoint_page_count"),
        "error names file, line and key:\n{log}"
    );
    let m = daemon.metrics();
    assert_eq!(
        metric(&m, "litestreamd_config_last_reload_successful"),
        Some(0.0)
    );
    insert(app("a"), 5);
    wait_replica_rows(&rep("a"), &scratch, 30);
    assert_eq!(generation(d, "a"), gen_a);

    // A replica target going down shows in the metrics.
    std::fs::rename(rep("d"), d.join("replica-d-away")).unwrap();
    std::fs::write(rep("d"), b"a file where the replica directory was").unwrap();
    insert(app("d"), 5);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = daemon.metrics();
        let retrying = metric(
            &m,
            "litestreamd_replica_state{db=\"d\",replica=\"local\",state=\"retrying\"}",
        );
        let errors = metric(
            &m,
            "litestreamd_replica_errors_total{db=\"d\",replica=\"local\"}",
        )
        .unwrap_or(0.0);
        let lag = metric(
            &m,
            "litestreamd_replica_lag_bytes{db=\"d\",replica=\"local\"}",
        )
        .unwrap_or(0.0);
        if retrying == Some(1.0) && errors > 0.0 && lag > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "down target not visible in metrics:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, seen) = daemon.expect("WATCHDOG=1");
    let _ = seen;
    std::fs::remove_file(rep("d")).unwrap();
    std::fs::rename(d.join("replica-d-away"), rep("d")).unwrap();
    wait_replica_rows(&rep("d"), &scratch, 10);

    // The series of the removed database disappear (idle timeout 2s, exporter upkeep 5s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.metrics().contains("db=\"c\"") {
        assert!(
            Instant::now() < deadline,
            "series of removed database c are still exported"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Stop: STOPPING=1, exit 0, every committed write in the replicas.
    insert(app("a"), 3);
    insert(app("b"), 3);
    insert(app("d"), 3);
    let (status, msgs, log) = daemon.stop();
    assert!(status.success(), "exit status {status:?}\n{log}");
    assert!(
        msgs.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{msgs:?}"
    );
    for (n, replica) in [("a", rep("a")), ("b", rep("b2")), ("d", rep("d"))] {
        let out = scratch.join(format!("final-{n}.db"));
        let o = Command::new(BIN)
            .args(["restore", "-o"])
            .arg(&out)
            .arg(format!("file://{}", replica.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            dump(&out),
            dump_conn(app(n)),
            "database {n} fully replicated at stop"
        );
    }
}

#[test]
fn restore_on_start_brings_a_deleted_database_back_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = write_main(d, "");
    let replica = d.join("replica-e");
    std::fs::write(
        d.join("dbs.d/e.toml"),
        format!(
            "restore_on_start = \"if-missing\"\n{}",
            db_file(d, "e", &replica)
        ),
    )
    .unwrap();
    let db = d.join("e.db");
    let (expect, first_log) = {
        let app = app_conn(&db);
        insert(&app, 40);
        let daemon = Daemon::start(d, &main, None);
        daemon.expect("READY=1");
        let rows = dump_conn(&app);
        // READY=1 does not wait for each database's first sync (a worker may still wait for
        // its start slot), and a stop before it leaves the replica empty: this test is about
        // the restore, so the backup must exist first.
        let scratch = d.join("probe");
        std::fs::create_dir_all(&scratch).unwrap();
        wait_replica_rows(&replica, &scratch, rows.len());
        std::fs::remove_dir_all(&scratch).unwrap();
        let (st, _, log) = daemon.stop();
        assert!(st.success(), "{log}");
        (rows, log)
    };
    for f in ["e.db", "e.db-wal", "e.db-shm"] {
        let _ = std::fs::remove_file(d.join(f));
    }
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    // Checked right at READY=1: the database is already back.
    if !db.exists() {
        let (_, _, log) = daemon.stop();
        panic!(
            "not restored before READY=1\n--- first daemon ---\n{first_log}\n--- second daemon ---\n{log}"
        );
    }
    assert_eq!(dump(&db), expect);
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
    assert!(log.contains("restored on start"), "{log}");
}

#[test]
fn config_check_lists_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = write_main(d, "");
    std::fs::write(d.join("dbs.d/good.toml"), db_file(d, "good", &d.join("r"))).unwrap();
    let ok = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&main)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(
        d.join("dbs.d/bad1.toml"),
        "path = \"/x.db\"\nretention = \"forever\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("dbs.d/bad2.toml"),
        "path = \"/y.db\"\n[[replicas]]\ntype = \"ftp\"\n",
    )
    .unwrap();
    std::fs::write(d.join("dbs.d/bad3.toml"), "path = [\n").unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&main)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for f in ["bad1.toml", "bad2.toml", "bad3.toml"] {
        assert!(text.contains(f), "{f} listed:\n{text}");
    }
    assert!(text.contains("ftp"), "{text}");
    assert!(text.contains("ok     good"), "{text}");

    // Every error of a file, keys as written; endpoint schemes; links and directories that
    // are not database files; two files for one database or one replica path.
    for f in ["bad1.toml", "bad2.toml", "bad3.toml"] {
        std::fs::remove_file(d.join("dbs.d").join(f)).unwrap();
    }
    std::fs::write(
        d.join("dbs.d/many.toml"),
        "path = \"/m.db\"\nmonitor_interval = \"0s\"\n[[replicas]]\ntype = \"s3\"\nbucket = \"b\"\nendpoint = \"ftp://10.0.0.1\"\nsync_interval = \"forever\"\n[[replicas]]\ntype = \"gcs\"\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(d.join("nowhere.toml"), d.join("dbs.d/dangling.toml")).unwrap();
    std::os::unix::fs::symlink(d.join("dbs.d/loop2.toml"), d.join("dbs.d/loop1.toml")).unwrap();
    std::os::unix::fs::symlink(d.join("dbs.d/loop1.toml"), d.join("dbs.d/loop2.toml")).unwrap();
    std::fs::create_dir(d.join("dbs.d/dir.toml")).unwrap();
    // A copy-pasted file: another database, the same replica path as `good`.
    std::fs::write(d.join("dbs.d/twin.toml"), db_file(d, "twin", &d.join("r"))).unwrap();
    // The same database as `good`, in a second file.
    std::fs::write(
        d.join("dbs.d/zgood.toml"),
        db_file(d, "good", &d.join("r2")),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&main)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = |file: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("error") && l.contains(file))
            .map(str::to_string)
            .collect()
    };
    let many = lines("many.toml");
    assert_eq!(many.len(), 4, "every error of many.toml:\n{text}");
    for want in [
        "monitor_interval must be greater than 0",
        "line 7: replicas[0].sync_interval: invalid value",
        "endpoint \"ftp://10.0.0.1\": must be an http:// or https:// URL",
        "replicas[1]: bucket: required",
    ] {
        assert!(
            many.iter().any(|l| l.contains(want)),
            "{want:?} in {many:?}"
        );
    }
    assert!(!text.contains("default."), "keys as written: {text}");
    assert!(
        lines("dangling.toml")[0].contains("does not exist"),
        "{text}"
    );
    assert!(lines("loop1.toml")[0].contains("loop"), "{text}");
    assert!(lines("dir.toml")[0].contains("directory"), "{text}");
    let twin = lines("twin.toml");
    assert!(
        twin.len() == 1 && twin[0].contains("replica local of database good (good.toml)"),
        "names both files: {text}"
    );
    let zgood = lines("zgood.toml");
    assert!(
        zgood.len() == 1 && zgood[0].contains("configured in good.toml too"),
        "{text}"
    );
    assert!(
        text.contains("ok     good"),
        "the first file keeps running: {text}"
    );

    // A missing dbs_dir is said, not silent.
    std::fs::rename(d.join("dbs.d"), d.join("dbs.d-away")).unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&main)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning") && text.contains("does not exist"),
        "{text}"
    );
}

/// Sends raw lines to the control socket and returns what comes back until `n` final replies
/// (ok or error; pushed progress/status/event lines are returned too but not counted).
fn raw(sock: &Path, input: &[u8], n: usize) -> Vec<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(input).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut out: Vec<serde_json::Value> = Vec::new();
    let mut finals = 0;
    while finals < n {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut r, &mut line).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "ok" || v["type"] == "error" {
            finals += 1;
        }
        out.push(v);
    }
    out
}

#[test]
fn control_socket_protocol() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The socket's directory must be reachable by another user for the refusal check below.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = d.join("control.sock");
    let main = write_main(
        d,
        &format!(
            "control_socket = \"{}\"\ncontrol_mode = \"0666\"\ncontrol_group = \"daemon\"\nrestore_dirs = [\"{}\"]\n",
            sock.display(),
            d.display()
        ),
    );
    let replica = d.join("replica");
    std::fs::write(d.join("dbs.d/app.toml"), db_file(d, "app", &replica)).unwrap();
    let app = app_conn(&d.join("app.db"));
    insert(&app, 50);
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    wait_replica_rows(&replica, d, 50);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);

    // status and detail
    let r = raw(&sock, b"{\"v\":1,\"id\":1,\"cmd\":\"status\"}\n", 1);
    assert_eq!(r[0]["type"], "ok", "{r:?}");
    assert_eq!(r[0]["id"], 1);
    assert_eq!(r[0]["result"][0]["name"], "app");
    assert_eq!(r[0]["result"][0]["state"], "replicating");
    let r = raw(
        &sock,
        b"{\"v\":1,\"id\":2,\"cmd\":\"detail\",\"db\":\"app\"}\n",
        1,
    );
    let g = &r[0]["result"]["replicas"][0]["generations"][0];
    assert!(
        g["generation"].as_str().unwrap().len() == 16
            && !g["snapshots"].as_array().unwrap().is_empty(),
        "{r:?}"
    );

    // snapshot now
    let before = objects(&replica, ".snapshot.lz4").len();
    let r = raw(
        &sock,
        b"{\"v\":1,\"id\":3,\"cmd\":\"snapshot\",\"db\":\"app\"}\n",
        1,
    );
    assert_eq!(r[0]["type"], "ok", "{r:?}");
    let after = objects(&replica, ".snapshot.lz4");
    assert!(
        after.len() > before || !after.is_empty(),
        "a snapshot exists"
    );

    // subscribe: an immediate status, then a push after a write
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"{\"v\":1,\"id\":9,\"cmd\":\"subscribe\"}\n")
        .unwrap();
    let mut rd = std::io::BufReader::new(s.try_clone().unwrap());
    let mut next = || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut rd, &mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let first = next();
    assert_eq!(
        (first["type"].as_str(), first["id"].as_u64()),
        (Some("status"), Some(9)),
        "{first}"
    );
    insert(&app, 1);
    let pushed = next();
    assert_eq!(pushed["type"], "status");
    drop(s);

    // restore over the socket: progress pushes, then the result; never over the live database
    let out = d.join("restored.db");
    let req = format!(
        "{{\"v\":1,\"id\":4,\"cmd\":\"restore\",\"db\":\"app\",\"output\":\"{}\"}}\n",
        out.display()
    );
    let r = raw(&sock, req.as_bytes(), 1);
    let last = r.last().unwrap();
    assert_eq!(last["type"], "ok", "{r:?}");
    assert_eq!(last["result"]["integrity_checked"], true);
    assert!(r.iter().any(|m| m["type"] == "progress"), "{r:?}");
    assert_eq!(dump(&out).len(), 51);
    let live = format!(
        "{{\"v\":1,\"id\":5,\"cmd\":\"restore\",\"db\":\"app\",\"output\":\"{}\"}}\n",
        d.join("app.db").display()
    );
    let r = raw(&sock, live.as_bytes(), 1);
    assert_eq!(r[0]["type"], "error", "{r:?}");

    // bad input: garbage, unknown command, wrong version, missing database — the connection
    // stays usable; an oversized line gets an error and the connection is closed.
    let r = raw(
        &sock,
        b"this is not json\n{\"v\":1,\"id\":6,\"cmd\":\"explode\"}\n{\"v\":2,\"id\":7,\"cmd\":\"status\"}\n{\"v\":1,\"id\":8,\"cmd\":\"sync\",\"db\":\"nope\"}\n{\"v\":1,\"id\":10,\"cmd\":\"sync\",\"db\":\"app\"}\n",
        5,
    );
    // Requests run concurrently, so replies are matched by id (the garbage line has id 0).
    let by_id: std::collections::BTreeMap<u64, String> = r
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["code"].as_str().unwrap_or("ok").to_string(),
            )
        })
        .collect();
    let want: std::collections::BTreeMap<u64, String> = [
        (0, "bad_request"),
        (6, "unknown_command"),
        (7, "unsupported_version"),
        (8, "not_found"),
        (10, "ok"),
    ]
    .into_iter()
    .map(|(i, c)| (i, c.to_string()))
    .collect();
    assert_eq!(by_id, want, "{r:?}");
    let mut big = vec![b'x'; 70 * 1024];
    big.push(b'\n');
    let r = raw(&sock, &big, 2);
    assert_eq!(r.len(), 1, "closed after the error: {r:?}");
    assert_eq!(r[0]["code"], "too_large");
    // Half-closed input: the reply still arrives.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"v\":1,\"id\":11,\"cmd\":\"status\"}\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("\"id\":11") && text.contains("\"ok\""),
        "{text}"
    );

    // `litestreamd status` for scripts: 0 when healthy, non-zero past --max-lag.
    let st = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(String::from_utf8_lossy(&st.stdout).contains("app"));
    std::fs::rename(&replica, d.join("replica-away")).unwrap();
    std::fs::write(&replica, b"not a directory").unwrap();
    insert(&app, 5);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = Command::new(BIN)
            .args(["status", "--max-lag", "0.5", "--socket"])
            .arg(&sock)
            .output()
            .unwrap();
        if !st.status.success() {
            assert!(
                String::from_utf8_lossy(&st.stderr).contains("app/local"),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never reported the failing replica"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::remove_file(&replica).unwrap();
    std::fs::rename(d.join("replica-away"), &replica).unwrap();

    // A peer that is neither root, the daemon's user, nor in control_group is refused.
    let out = Command::new("/usr/bin/perl")
        .args([
            "-MIO::Socket::UNIX",
            "-e",
            "$SIG{PIPE} = q(IGNORE); my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die qq(connect: $!\\n); print $s qq({\"v\":1,\"id\":1,\"cmd\":\"status\"}\\n); print scalar <$s>;",
        ])
        .arg(&sock)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("access_denied"),
        "refused peer got: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        daemon.log().contains("control connection refused"),
        "refusal logged"
    );

    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
    assert!(!sock.exists(), "socket removed at exit");
}

/// An unprivileged user and its own group, created for one test and removed when dropped.
struct TestUser {
    name: String,
    group: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create(tag: &str) -> TestUser {
        let name = format!("ltd{tag}{}", std::process::id() % 100_000);
        let group = format!("{name}g");
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("userdel").arg(&name).output();
        let _ = Command::new("groupdel").arg(&group).output();
        run(&["groupadd", &group]);
        run(&[
            "useradd",
            "-M",
            "-N",
            "-g",
            &group,
            "-s",
            "/usr/sbin/nologin",
            &name,
        ]);
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        TestUser {
            uid: id("-u"),
            gid: id("-g"),
            name,
            group,
        }
    }

    /// A command run as this user (with the groups of the group database).
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={}", self.uid),
            &format!("--regid={}", self.gid),
            "--init-groups",
            "--",
            program,
        ]);
        c
    }

    /// One request over the control socket as this user: every line until the final reply.
    fn request(&self, sock: &Path, req: &str) -> Vec<serde_json::Value> {
        let out = self
            .cmd("/usr/bin/perl")
            .args([
                "-MIO::Socket::UNIX",
                "-e",
                r#"$SIG{PIPE} = q(IGNORE); my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die qq(connect: $!\n); print $s $ARGV[1] . qq(\n); while (my $l = <$s>) { print $l; last if $l =~ /"type":"(ok|error)"/; }"#,
            ])
            .arg(sock)
            .arg(req)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client as {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

fn restore_req(db: &str, output: &str) -> String {
    serde_json::json!({"v": 1, "id": 1, "cmd": "restore", "db": db, "output": output}).to_string()
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The threat model of `docs/operations.md`, tried by a control-group member against a daemon
/// running as root: no write outside the restore directories, nothing through a planted
/// symlink, no copy of a database they cannot read, and every refusal a clear error.
#[test]
fn control_group_members_cannot_write_or_read_files_as_the_daemon() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chmod(d, 0o755);
    let user = TestUser::create("r");
    let restores = d.join("restores");
    let read_only = d.join("restores-ro");
    std::fs::create_dir(&restores).unwrap();
    std::fs::create_dir(&read_only).unwrap();
    // As the daemon creates its default restore directory: sticky, writable by the group.
    nix::unistd::chown(&restores, None, Some(nix::unistd::Gid::from_raw(user.gid))).unwrap();
    chmod(&restores, 0o1770);
    chmod(&read_only, 0o755);
    let private = d.join("private");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let root_only = d.join("root-only");
    std::fs::write(&root_only, b"precious").unwrap();
    chmod(&root_only, 0o600);

    let sock = d.join("control.sock");
    let settings = |restore: &str| {
        format!(
            "control_socket = \"{}\"\ncontrol_group = \"{}\"\ncontrol_restore = \"{restore}\"\nrestore_dirs = [\"{}\", \"{}\"]\n",
            sock.display(),
            user.group,
            restores.display(),
            read_only.display()
        )
    };
    let main = write_main(d, &settings("readers"));
    // Three databases: world-readable, readable by the user's group, root only.
    for (name, mode, group) in [
        ("open", 0o644, None),
        ("shared", 0o640, Some(user.gid)),
        ("secret", 0o600, None),
    ] {
        let db = d.join(format!("{name}.db"));
        let app = app_conn(&db);
        insert(&app, 20);
        drop(app);
        chmod(&db, mode);
        if let Some(g) = group {
            nix::unistd::chown(&db, None, Some(nix::unistd::Gid::from_raw(g))).unwrap();
        }
        std::fs::write(
            d.join(format!("dbs.d/{name}.toml")),
            db_file(d, name, &d.join(format!("replica-{name}"))),
        )
        .unwrap();
    }
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    for name in ["open", "shared", "secret"] {
        wait_replica_rows(&d.join(format!("replica-{name}")), d, 20);
    }
    let last = |r: &[serde_json::Value]| r.last().cloned().unwrap();
    let refused = |req: String, code: &str, words: &str| {
        let r = last(&user.request(&sock, &req));
        assert_eq!(r["type"], "error", "{req} was accepted: {r}");
        assert_eq!(r["code"], code, "{r}");
        let m = r["message"].as_str().unwrap();
        assert!(m.contains(words), "unclear refusal for {req}: {m}");
    };

    // A database the user can read: restored, owned by them, never broader than the source.
    // Symlinks planted at the names older versions used for scratch files change nothing.
    for n in [
        "open-copy.db.tmp",
        "open-copy.db.tmp-pages-wal",
        "open-copy.db-journal",
    ] {
        let st = user
            .cmd("ln")
            .arg("-s")
            .arg(&root_only)
            .arg(restores.join(n))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let out = restores.join("open-copy.db");
    let r = last(&user.request(&sock, &restore_req("open", &out.to_string_lossy())));
    assert_eq!(r["type"], "ok", "{r}");
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (user.uid, 0o644));
    assert_eq!(dump(&out), dump(&d.join("open.db")));
    assert_eq!(std::fs::read(&root_only).unwrap(), b"precious");
    let st = user
        .cmd("cat")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "the user reads their restore");
    // Group-readable source: the copy keeps the group and its bits.
    let out = restores.join("shared-copy.db");
    let r = last(&user.request(&sock, &restore_req("shared", &out.to_string_lossy())));
    assert_eq!(r["type"], "ok", "{r}");
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (user.uid, user.gid, 0o640)
    );
    // A relative output goes into the first restore directory.
    let r = last(&user.request(&sock, &restore_req("open", "rel.db")));
    assert_eq!(r["type"], "ok", "{r}");
    assert!(restores.join("rel.db").exists());

    // A database the user cannot read: no copy, readable or not.
    refused(
        restore_req("secret", &restores.join("secret-copy.db").to_string_lossy()),
        "access_denied",
        "may not read",
    );
    assert!(!restores.join("secret-copy.db").exists());
    // Outside the restore directories, however it is spelled.
    for (out, never) in [
        (
            "/etc/ltd-test-x.db".to_string(),
            PathBuf::from("/etc/ltd-test-x.db"),
        ),
        (
            "/etc/../etc/ltd-test-y.db".into(),
            PathBuf::from("/etc/ltd-test-y.db"),
        ),
        (
            format!("{}/../escape.db", restores.display()),
            d.join("escape.db"),
        ),
        (
            private.join("p.db").to_string_lossy().into(),
            private.join("p.db"),
        ),
    ] {
        refused(
            restore_req("open", &out),
            "access_denied",
            "not a restore directory",
        );
        assert!(!never.exists(), "{} appeared", never.display());
    }
    // A directory link planted inside the restore directory leads outside it.
    let st = user
        .cmd("ln")
        .arg("-s")
        .arg(&private)
        .arg(restores.join("evil"))
        .status()
        .unwrap();
    assert!(st.success());
    refused(
        restore_req("open", &restores.join("evil/z.db").to_string_lossy()),
        "access_denied",
        "not a restore directory",
    );
    assert!(!private.join("z.db").exists());
    // An allowed directory the user cannot write themselves.
    refused(
        restore_req("open", &read_only.join("x.db").to_string_lossy()),
        "access_denied",
        "may not create files",
    );
    assert!(!read_only.join("x.db").exists());
    // Links planted at the output itself and at its lock: refused, never followed.
    for (name, planted, words) in [
        ("v.db", "v.db", "exists"),
        ("w.db", ".w.db.restore-lock", "symbolic link"),
    ] {
        let st = user
            .cmd("ln")
            .arg("-s")
            .arg(&root_only)
            .arg(restores.join(planted))
            .status()
            .unwrap();
        assert!(st.success());
        let r = last(&user.request(
            &sock,
            &restore_req("open", &restores.join(name).to_string_lossy()),
        ));
        assert_eq!(r["type"], "error", "{r}");
        assert!(r["message"].as_str().unwrap().contains(words), "{r}");
    }
    assert_eq!(std::fs::read(&root_only).unwrap(), b"precious");
    assert_eq!(std::fs::metadata(&root_only).unwrap().mode() & 0o777, 0o600);
    // Bad requests get a reply: an empty output, a line that is not UTF-8.
    refused(restore_req("open", ""), "bad_request", "no path");
    let r = raw(
        &sock,
        b"\xff\xfe{\n{\"v\":1,\"id\":3,\"cmd\":\"status\"}\n",
        2,
    );
    assert_eq!(r[0]["code"], "bad_request", "{r:?}");
    assert!(r[0]["message"].as_str().unwrap().contains("UTF-8"), "{r:?}");
    assert_eq!(r[1]["type"], "ok", "the connection goes on: {r:?}");

    // The default: members may not restore at all (the policy follows a reload).
    std::fs::write(
        &main,
        std::fs::read_to_string(&main)
            .unwrap()
            .replace("\"readers\"", "\"privileged\""),
    )
    .unwrap();
    send_signal(&daemon.child, SIGHUP);
    daemon.expect("READY=1");
    refused(
        restore_req("open", &restores.join("later.db").to_string_lossy()),
        "access_denied",
        "control_restore",
    );
    assert!(!restores.join("later.db").exists());
    assert!(
        daemon
            .log()
            .contains("restore over the control socket refused")
    );
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

/// Two restores to one output at once, one from the CLI and one over the socket (and two over
/// the socket): never both succeed, and a success always holds the source's content.
#[test]
fn restores_to_one_output_are_exclusive_and_never_replay_a_stale_wal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("control.sock");
    let restores = d.join("restores");
    std::fs::create_dir(&restores).unwrap();
    let main = write_main(
        d,
        &format!(
            "control_socket = \"{}\"\nrestore_dirs = [\"{}\"]\n",
            sock.display(),
            restores.display()
        ),
    );
    let replica = d.join("replica");
    std::fs::write(d.join("dbs.d/app.toml"), db_file(d, "app", &replica)).unwrap();
    let app = app_conn(&d.join("app.db"));
    for _ in 0..40 {
        app.execute("INSERT INTO t (v) VALUES (randomblob(50000))", [])
            .unwrap();
    }
    let expect = dump_conn(&app);
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    wait_replica_rows(&replica, d, expect.len());

    let out = restores.join("c.db");
    let (mut busy, mut late) = (0, 0);
    for trial in 0..50 {
        // The previous trial's check opened the output with SQLite: its -wal/-shm go too.
        for s in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{s}", out.display()));
        }
        let cli = {
            let out = out.clone();
            let main = main.clone();
            std::thread::spawn(move || {
                Command::new(BIN)
                    .args(["restore", "--config"])
                    .arg(&main)
                    .arg("-o")
                    .arg(&out)
                    .arg("app")
                    .output()
                    .unwrap()
            })
        };
        let sockets: Vec<_> = (0..2)
            .map(|_| {
                let (sock, req) = (sock.clone(), restore_req("app", &out.to_string_lossy()));
                std::thread::spawn(move || raw(&sock, format!("{req}\n").as_bytes(), 1))
            })
            .collect();
        let cli = cli.join().unwrap();
        let mut wins = usize::from(cli.status.success());
        let cli_err = String::from_utf8_lossy(&cli.stderr).into_owned();
        if !cli.status.success() {
            if cli_err.contains("another restore is writing") {
                busy += 1;
            } else {
                assert!(
                    cli_err.contains("already exists"),
                    "trial {trial}: {cli_err}"
                );
                late += 1;
            }
        }
        for s in sockets {
            let r = s.join().unwrap();
            let r = r.last().unwrap();
            if r["type"] == "ok" {
                wins += 1;
            } else {
                let m = r["message"].as_str().unwrap();
                if m.contains("another restore is writing") {
                    busy += 1;
                } else {
                    assert!(m.contains("already exists"), "trial {trial}: {r}");
                    late += 1;
                }
            }
        }
        assert_eq!(wins, 1, "trial {trial}: exactly one restore wins");
        assert_eq!(dump(&out), expect, "trial {trial}");
    }
    eprintln!("50 trials: {busy} refused while another restore ran, {late} after it finished");
    assert!(
        busy > 0,
        "restores overlapped ({late} came after the winner)"
    );
    let leftovers: Vec<String> = names(&restores)
        .into_iter()
        .filter(|n| !n.starts_with("c.db"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A stale -wal (and -shm) beside the output: moved aside by every entry point, never
    // replayed over the restored database.
    let stale = {
        let old = d.join("old.db");
        let r = Command::new(BIN)
            .args(["restore", "--config"])
            .arg(&main)
            .arg("-o")
            .arg(&old)
            .arg("app")
            .output()
            .unwrap();
        assert!(r.status.success());
        let c = rusqlite::Connection::open(&old).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute("DELETE FROM t", []).unwrap();
        std::fs::read(d.join("old.db-wal")).unwrap()
    };
    for (how, out) in [("cli", d.join("s1.db")), ("socket", restores.join("s2.db"))] {
        let mut side = out.as_os_str().to_owned();
        side.push("-wal");
        std::fs::write(&side, &stale).unwrap();
        if how == "cli" {
            let r = Command::new(BIN)
                .args(["restore", "--config"])
                .arg(&main)
                .arg("-o")
                .arg(&out)
                .arg("app")
                .output()
                .unwrap();
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
            assert!(String::from_utf8_lossy(&r.stdout).contains("moved aside"));
        } else {
            let r = raw(
                &sock,
                format!("{}\n", restore_req("app", &out.to_string_lossy())).as_bytes(),
                1,
            );
            let r = r.last().unwrap();
            assert_eq!(r["type"], "ok", "{r}");
            assert_eq!(
                r["result"]["moved_aside"].as_array().unwrap().len(),
                1,
                "{r}"
            );
        }
        assert!(!Path::new(&side).exists(), "{how}: the stale WAL was moved");
        assert_eq!(dump(&out), expect, "{how}: the stale WAL was not replayed");
    }
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

/// Every datagram until `deadline` (or until one holds `line`).
fn datagrams_until(daemon: &Daemon, deadline: Duration, line: &str) -> Vec<String> {
    datagrams(daemon, deadline, |m| m.lines().any(|l| l == line))
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

/// restore_on_start on a fresh host whose replica cannot be read: no READY=1 (the start is
/// extended) until the replica is back, then the real data; with a give-up, the start fails
/// loudly. And a new, empty database never silently becomes the latest backup.
#[test]
fn restore_on_start_waits_for_an_unreadable_replica_and_new_lineages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = write_main(d, "");
    let replica = d.join("replica-e");
    let db = d.join("e.db");
    let conf = |extra: &str| {
        std::fs::write(
            d.join("dbs.d/e.toml"),
            format!(
                "restore_on_start = \"if-missing\"\n{extra}{}",
                db_file(d, "e", &replica)
            ),
        )
        .unwrap()
    };
    conf("");
    let expect = {
        let app = app_conn(&db);
        insert(&app, 40);
        let daemon = Daemon::start(d, &main, None);
        daemon.expect("READY=1");
        wait_replica_rows(&replica, d, 40);
        let rows = dump_conn(&app);
        let (st, _, log) = daemon.stop();
        assert!(st.success(), "{log}");
        rows
    };
    let wipe = || {
        for f in ["e.db", "e.db-wal", "e.db-shm"] {
            let _ = std::fs::remove_file(d.join(f));
        }
        let _ = std::fs::remove_dir_all(d.join(".e.db-litestream"));
    };
    // A fresh host: no database, no local state; the replica is unreadable.
    wipe();
    let away = d.join("replica-away");
    std::fs::rename(&replica, &away).unwrap();
    std::fs::write(&replica, b"not a directory").unwrap();
    let daemon = Daemon::start(d, &main, None);
    let seen = datagrams_until(&daemon, Duration::from_secs(4), "READY=1");
    assert!(
        !seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 while the replica could not be read: {seen:?}\n{}",
        daemon.log()
    );
    assert!(
        seen.iter().any(|m| m.contains("EXTEND_TIMEOUT_USEC=")),
        "the start is extended while waiting: {seen:?}"
    );
    assert!(!db.exists());
    std::fs::remove_file(&replica).unwrap();
    std::fs::rename(&away, &replica).unwrap();
    daemon.expect("READY=1");
    assert_eq!(dump(&db), expect, "the real data, restored before READY=1");
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
    assert!(log.contains("could not be read"), "{log}");

    // With a give-up, the start fails loudly instead of waiting forever.
    wipe();
    std::fs::rename(&replica, &away).unwrap();
    std::fs::write(&replica, b"not a directory").unwrap();
    conf("restore_on_start_timeout = \"2s\"\n");
    let daemon = Daemon::start(d, &main, None);
    let (st, msgs, log) = {
        let started = Instant::now();
        let mut daemon = daemon;
        let st = loop {
            if let Some(st) = daemon.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the daemon did not give up"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let msgs = datagrams_until(&daemon, Duration::from_millis(200), "READY=1");
        (st, msgs, daemon.log())
    };
    assert!(!st.success(), "the start failed: {log}");
    assert!(log.contains("restore_on_start"), "{log}");
    assert!(!msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    std::fs::remove_file(&replica).unwrap();
    std::fs::rename(&away, &replica).unwrap();

    // Without restore_on_start, the application creates a new, empty database on the fresh
    // host: it must not become the latest backup over the replica's real data.
    wipe();
    std::fs::write(d.join("dbs.d/e.toml"), db_file(d, "e", &replica)).unwrap();
    let app = app_conn(&db);
    insert(&app, 3);
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = Command::new(BIN)
            .args(["status", "--json", "--socket"])
            .arg(d.join("control.sock"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        if v[0]["replicas"][0]["state"] == "conflict" {
            let e = v[0]["replicas"][0]["error"].as_str().unwrap_or_default();
            assert!(e.contains("lineage"), "{e}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lineage conflict: {v}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = d.join("latest.db");
    let r = Command::new(BIN)
        .args(["restore", "--config"])
        .arg(&main)
        .arg("-o")
        .arg(&out)
        .arg("e")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(dump(&out), expect, "latest is still the real data");
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("lineage"),
        "restore says which lineage: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    // The operator decides the new file is the database now.
    let a = Command::new(BIN)
        .args(["adopt", "--config"])
        .arg(&main)
        .arg("e")
        .output()
        .unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let mut n = 0;
    loop {
        n += 1;
        let probe = d.join(format!("adopted-{n}.db"));
        let r = Command::new(BIN)
            .args(["restore", "--no-integrity-check", "--config"])
            .arg(&main)
            .arg("-o")
            .arg(&probe)
            .arg("e")
            .output()
            .unwrap();
        if r.status.success() && dump(&probe).len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(20),
            "adoption never took effect\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

fn socket_replica(sock: &Path) -> (String, f64, u64) {
    let r = raw(sock, b"{\"v\":1,\"id\":1,\"cmd\":\"status\"}\n", 1);
    let rep = &r[0]["result"][0]["replicas"][0];
    (
        rep["state"].as_str().unwrap_or_default().to_string(),
        rep["lag_seconds"].as_f64().unwrap_or(-1.0),
        rep["lag_bytes"].as_u64().unwrap_or(u64::MAX),
    )
}

/// After a catch-up (from an outage, and after a single write), `/metrics` says what the
/// control socket says within one tick.
#[test]
fn metrics_agree_with_the_socket_within_a_tick() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = write_main(d, "");
    let sock = d.join("control.sock");
    let replica = d.join("replica");
    std::fs::write(d.join("dbs.d/app.toml"), db_file(d, "app", &replica)).unwrap();
    let app = app_conn(&d.join("app.db"));
    insert(&app, 10);
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    wait_replica_rows(&replica, d, 10);
    let lag_metrics = || {
        let m = daemon.metrics();
        let l = "{db=\"app\",replica=\"local\"}";
        (
            metric(&m, &format!("litestreamd_replica_lag_seconds{l}")),
            metric(&m, &format!("litestreamd_replica_lag_bytes{l}")),
            metric(
                &m,
                "litestreamd_replica_state{db=\"app\",replica=\"local\",state=\"healthy\"}",
            ),
        )
    };
    let caught_up_then_compare = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (state, lag, bytes) = socket_replica(&sock);
            if state == "healthy" && lag == 0.0 && bytes == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: never caught up");
            std::thread::sleep(Duration::from_millis(10));
        }
        // One tick is 100 ms here; a little more for scheduling.
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            lag_metrics(),
            (Some(0.0), Some(0.0), Some(1.0)),
            "{what}: /metrics still shows the old lag or state"
        );
    };
    // An outage: the replica directory is replaced by a file, rows are written, it comes back.
    std::fs::rename(&replica, d.join("replica-away")).unwrap();
    std::fs::write(&replica, b"not a directory").unwrap();
    for _ in 0..5 {
        insert(&app, 1);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (state, lag, _) = socket_replica(&sock);
    assert!(state != "healthy" && lag > 0.0, "{state} {lag}");
    std::fs::remove_file(&replica).unwrap();
    std::fs::rename(d.join("replica-away"), &replica).unwrap();
    caught_up_then_compare("after an outage");
    // A single write.
    insert(&app, 1);
    std::thread::sleep(Duration::from_millis(30));
    caught_up_then_compare("after a single write");
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

/// 2,000 idle control connections against a daemon limited to 256 open files: the connection
/// cap keeps them from taking the databases' descriptors (they keep replicating), refusals are
/// logged once a minute rather than once per attempt, and idle connections are closed.
#[test]
fn idle_control_connections_cannot_starve_the_databases() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 4096,
        "the test needs 2,000+ descriptors of its own (hard limit {hard})"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("control.sock");
    let main = write_main(
        d,
        &format!(
            "control_socket = \"{}\"\ncontrol_max_connections = 32\ncontrol_idle_timeout = \"3s\"\n",
            sock.display()
        ),
    );
    let apps = databases(d, 8);
    let daemon = Daemon::start_with(d, &main, None, |cmd| limit_files(cmd, 256));
    daemon.expect("READY=1");
    let conns: Vec<std::os::unix::net::UnixStream> = (0..2000)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
        .collect();
    assert!(conns.len() > 1000, "connected {}", conns.len());
    // The databases keep replicating: every one gets its new rows to its replica.
    for app in &apps {
        insert(app, 20);
    }
    for i in 0..8 {
        wait_replica_rows(&d.join(format!("replica-{i}")), d, 25);
    }
    let log = daemon.log();
    assert!(!log.contains("Too many open files"), "{log}");
    let refusals = log.matches("connections refused").count();
    assert!(
        (1..=2).contains(&refusals),
        "refusals logged once a minute, not per attempt: {refusals}"
    );
    // Those over the cap got a reason; the idle ones are closed after control_idle_timeout.
    let mut reasons = 0;
    for c in &conns[conns.len() - 10..] {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(c), &mut line);
        reasons += usize::from(line.contains("too many control connections"));
    }
    assert_eq!(reasons, 10);
    std::thread::sleep(Duration::from_secs(4));
    let r = raw(&sock, b"{\"v\":1,\"id\":1,\"cmd\":\"status\"}\n", 1);
    assert_eq!(
        r[0]["type"], "ok",
        "served again once the idle ones closed: {r:?}"
    );
    drop(conns);
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

/// Every datagram for `dur`, with when it arrived.
fn datagrams_for(daemon: &Daemon, dur: Duration) -> Vec<(Instant, String)> {
    datagrams(daemon, dur, |_| false)
}

/// Every datagram for `dur` or until one satisfies `last`, with when it arrived.
fn datagrams(
    daemon: &Daemon,
    dur: Duration,
    last: impl Fn(&str) -> bool,
) -> Vec<(Instant, String)> {
    let end = Instant::now() + dur;
    let mut out = Vec::new();
    while Instant::now() < end {
        daemon
            .notify
            .set_read_timeout(Some((end - Instant::now()).max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        let Ok(n) = daemon.notify.recv(&mut buf) else {
            continue;
        };
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = last(&m);
        out.push((Instant::now(), m));
        if done {
            break;
        }
    }
    daemon
        .notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    out
}

/// A reload that changes every database while their S3 server is stopped (connections
/// refused) or hangs (accepts connections, never answers), and adds one with restore_on_start
/// whose replica hangs: the final syncs, the new clients and the restore happen in the
/// background, so the watchdog pings never stop for longer than the watchdog interval, and
/// READY=1 follows RELOADING=1.
#[test]
fn a_reload_never_holds_up_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut server = s3_server(&d.join("s3"));
    // A store that accepts connections and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hang.incoming().flatten() {
            held.push(s);
        }
    });
    let main = write_main(d, "shutdown_timeout = \"30s\"\n");
    let db_toml = |name: &str, url: &str, extra: &str| {
        format!(
            "path = \"{}\"\n{extra}\n[[replicas]]\nname = \"s3\"\nurl = \"{url}\"\n",
            d.join(format!("{name}.db")).display()
        )
    };
    let mut apps = Vec::new();
    for i in 0..4 {
        let name = format!("db{i}");
        std::fs::write(
            d.join(format!("dbs.d/{name}.toml")),
            db_toml(&name, &s3_url(server.port, &name), ""),
        )
        .unwrap();
        let app = app_conn(&d.join(format!("{name}.db")));
        insert(&app, 5);
        apps.push(app);
    }
    std::fs::write(
        d.join("dbs.d/stuck.toml"),
        db_toml("stuck", &s3_url(hang_port, "stuck"), ""),
    )
    .unwrap();
    apps.push(app_conn(&d.join("stuck.db")));
    let daemon = Daemon::start_with(d, &main, Some(2_000_000), |cmd| {
        cmd.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET);
    });
    daemon.expect("READY=1");
    // The S3 server goes away; the databases keep being written.
    std::thread::sleep(Duration::from_secs(2));
    server.down();
    for app in &apps {
        insert(app, 3);
    }
    std::thread::sleep(Duration::from_secs(1));
    // Every database changes; a new one, missing, with restore_on_start from the hanging store.
    for i in 0..4 {
        let name = format!("db{i}");
        std::fs::write(
            d.join(format!("dbs.d/{name}.toml")),
            db_toml(
                &name,
                &s3_url(server.port, &name),
                "monitor_interval = \"150ms\"",
            ),
        )
        .unwrap();
    }
    std::fs::write(
        d.join("dbs.d/stuck.toml"),
        db_toml(
            "stuck",
            &s3_url(hang_port, "stuck"),
            "monitor_interval = \"150ms\"",
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dbs.d/fresh.toml"),
        db_toml(
            "fresh",
            &s3_url(hang_port, "fresh"),
            "restore_on_start = \"if-missing\"",
        ),
    )
    .unwrap();
    let before = datagrams_for(&daemon, Duration::from_millis(1500));
    send_signal(&daemon.child, SIGHUP);
    let after = datagrams_for(&daemon, Duration::from_secs(10));
    let all: Vec<&(Instant, String)> = before.iter().chain(&after).collect();
    let pings: Vec<Instant> = all
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    let worst = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} watchdog pings over {:?}; the longest gap {worst:?}",
        pings.len(),
        pings.last().map(|l| *l - pings[0]).unwrap_or_default()
    );
    assert!(pings.len() >= 8, "{} pings: {all:?}", pings.len());
    assert!(
        worst <= Duration::from_secs(2),
        "a gap of {worst:?} between watchdog pings (WATCHDOG_USEC=2s):\n{}",
        daemon.log()
    );
    let reloading = after
        .iter()
        .position(|(_, m)| m.lines().any(|l| l == "RELOADING=1"))
        .expect("RELOADING=1");
    assert!(
        after[reloading..]
            .iter()
            .any(|(_, m)| m.lines().any(|l| l == "READY=1")),
        "READY=1 after RELOADING=1: {after:?}"
    );
    drop(apps);
    let mut daemon = daemon;
    let _ = daemon.child.kill();
}

/// `litestreamd drill NAME`: its output and exit code.
fn drill(sock: &Path, db: &str) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["drill", db, "--socket"])
        .arg(sock)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn status_exit(sock: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(sock)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The WAL segments of a file replica's only generation: (index, offset, path), in order.
fn segments(replica: &Path) -> Vec<(u32, u64, PathBuf)> {
    let mut out = Vec::new();
    for p in objects(replica, ".wal.lz4") {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let (i, o) = name.trim_end_matches(".wal.lz4").split_once('_').unwrap();
        out.push((
            u32::from_str_radix(i, 16).unwrap(),
            u64::from_str_radix(o, 16).unwrap(),
            p,
        ));
    }
    out.sort();
    out
}

/// Restore drills: one passes on a busy database while a writer commits throughout (its longest
/// commit stall is printed); a replica that still restores to a valid database but not to this
/// one (the last segment of a middle index removed) fails, and so does one with a segment
/// replaced by an older one of the same database; `status`, its exit code and the metrics
/// follow; results survive a restart; a scheduled drill runs on its own.
#[test]
fn restore_drills_prove_the_content_and_catch_a_replica_that_restores_other_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let drills = d.join("drills");
    let main = write_main(d, "");
    let main_text = std::fs::read_to_string(&main).unwrap().replace(
        "[defaults]\n",
        &format!("[defaults]\ndrill_dir = \"{}\"\n", drills.display()),
    );
    std::fs::write(&main, main_text).unwrap();
    let sock = d.join("control.sock");
    let replica = d.join("replica");
    std::fs::write(
        d.join("dbs.d/app.toml"),
        format!(
            "checkpoint_interval = \"1s\"\n{}",
            db_file(d, "app", &replica)
        ),
    )
    .unwrap();
    let tiny_replica = d.join("tiny-replica");
    std::fs::write(
        d.join("dbs.d/tiny.toml"),
        format!(
            "drill_interval = \"2s\"\n{}",
            db_file(d, "tiny", &tiny_replica)
        ),
    )
    .unwrap();
    let app = app_conn(&d.join("app.db"));
    insert(&app, 200);
    let tiny = app_conn(&d.join("tiny.db"));
    insert(&tiny, 3);
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");

    // A busy database: a writer commits throughout the drill.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (d.join("app.db"), stop.clone());
        std::thread::spawn(move || {
            let c = app_conn(&path);
            let (mut worst, mut n) = (Duration::ZERO, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                c.execute("INSERT INTO t (v) VALUES (randomblob(3000))", [])
                    .unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (worst, n)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let (code, out) = drill(&sock, "app");
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, commits) = writer.join().unwrap();
    println!(
        "drill on a busy database: {took:?}; the writer committed {commits} times, longest commit {worst:?}"
    );
    assert_eq!(code, 0, "{out}\n{}", daemon.log());
    assert!(out.contains("app/local: passed"), "{out}");
    assert!(
        worst < Duration::from_millis(500),
        "a commit stalled {worst:?} during the drill"
    );

    // Tamper: the last segment of a middle index goes. Here that segment is one UPDATE of a
    // row no later index touches (the index ends after it: the database is idle for the
    // checkpoint_interval of 1 s, and the checkpoint restarts the WAL), so the replica still
    // restores to a valid database, with the row's old value: restore exits 0 and
    // integrity_check passes; only the drill's checksum sees it.
    insert(&app, 20);
    std::thread::sleep(Duration::from_millis(400));
    app.execute("UPDATE t SET v = zeroblob(100) WHERE id = 5", [])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let middle = segments(&replica).iter().map(|s| s.0).max().unwrap() - 1;
    insert(&app, 20);
    std::thread::sleep(Duration::from_millis(600));
    let segs = segments(&replica);
    let in_middle: Vec<_> = segs.iter().filter(|s| s.0 == middle).collect();
    assert!(
        in_middle.len() >= 2,
        "index {middle:08x} should have several segments: {segs:?}"
    );
    let victim = in_middle.last().unwrap().2.clone();
    let kept = d.join("victim");
    std::fs::rename(&victim, &kept).unwrap();
    let plain = d.join("plain-restore.db");
    let out = Command::new(BIN)
        .args(["restore", "-o"])
        .arg(&plain)
        .arg(format!("file://{}", replica.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(integrity(&plain), "ok");
    let v5: Vec<u8> = rusqlite::Connection::open(&plain)
        .unwrap()
        .query_row("SELECT v FROM t WHERE id = 5", [], |r| r.get(0))
        .unwrap();
    assert_ne!(
        v5,
        vec![0u8; 100],
        "the restore should have missed the UPDATE"
    );
    let (code, out) = drill(&sock, "app");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("app/local: failed"), "{out}");
    assert!(out.contains("restores to other content"), "{out}");
    println!("drill with the last segment of index {middle:08x} removed: {out}");
    let (code, out) = status_exit(&sock, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("last drill failed"), "{out}");
    // systemd's STATUS= says so (the summary is re-sent within a second when it changes).
    let seen = datagrams(&daemon, Duration::from_secs(10), |m| {
        m.contains("1 with a failed restore drill")
    });
    assert!(
        seen.iter()
            .any(|(_, m)| m.contains("1 with a failed restore drill")),
        "{seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = daemon.metrics();
        if metric(
            &m,
            "litestreamd_drill_result{db=\"app\",replica=\"local\",result=\"failed\"}",
        ) == Some(1.0)
        {
            assert_eq!(
                metric(
                    &m,
                    "litestreamd_drill_result{db=\"app\",replica=\"local\",result=\"passed\"}"
                ),
                Some(0.0)
            );
            assert!(
                metric(
                    &m,
                    "litestreamd_drill_last_success_timestamp_seconds{db=\"app\",replica=\"local\"}"
                )
                .unwrap()
                    > 0.0,
                "the earlier pass is still the last success"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the failed drill:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::rename(&kept, &victim).unwrap();

    // Tamper: a segment replaced by an older one of the same database.
    let segs = segments(&replica);
    let (older, newer) = (
        &segs[0].2,
        &segs
            .iter()
            .rev()
            .find(|s| s.1 == 0 && s.0 > segs[0].0)
            .unwrap()
            .2,
    );
    let saved = std::fs::read(newer).unwrap();
    std::fs::copy(older, newer).unwrap();
    let (code, out) = drill(&sock, "app");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("app/local: failed"), "{out}");
    println!("drill with a segment replaced by an older one: {out}");
    std::fs::write(newer, saved).unwrap();

    let (code, out) = drill(&sock, "app");
    assert_eq!(code, 0, "{out}");

    // verify through the daemon: graded, in the status and the metrics.
    let r = raw(
        &sock,
        b"{\"v\":1,\"id\":1,\"cmd\":\"verify\",\"db\":\"app\",\"read_data\":\"all\"}\n",
        1,
    );
    assert_eq!(r[0]["result"]["grade"], "ok", "{r:?}");
    let r = raw(
        &sock,
        b"{\"v\":1,\"id\":2,\"cmd\":\"verify\",\"db\":\"app\",\"read_data\":\"lots\"}\n",
        1,
    );
    assert_eq!(r[0]["code"], "bad_request", "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &daemon.metrics(),
        "litestreamd_verify_result{db=\"app\",replica=\"local\",result=\"ok\"}",
    ) != Some(1.0)
    {
        assert!(Instant::now() < deadline, "no verify in the metrics");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The scheduled drill of tiny (every 2 s) has passed by now.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = status_exit(&sock, &["--max-drill-age", "1h"]);
        if code == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled drill passed: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = daemon.metrics();
    assert_eq!(
        metric(&m, "litestreamd_drill_interval_seconds{db=\"tiny\"}"),
        Some(2.0)
    );
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
    assert!(
        std::fs::read_dir(&drills).unwrap().flatten().all(|e| !e
            .file_name()
            .to_string_lossy()
            .ends_with(".litestreamd-drill")),
        "a drill left its database behind"
    );

    // The results survive a restart: status is good at once.
    let daemon = Daemon::start(d, &main, None);
    daemon.expect("READY=1");
    let (code, out) = status_exit(&sock, &["--max-drill-age", "1h"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("passed"), "{out}");
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

/// Out of descriptors, the daemon says so once, naming the limit and what it would take,
/// instead of one line per database per retry (issue 18: 39,784 "Too many open files" lines
/// in three minutes at 10,000 databases). 60 databases under a limit of 200 descriptors; then
/// parking lets all of them replicate.
#[test]
fn out_of_descriptors_is_said_once_not_per_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = write_main(d, "");
    let _apps = databases(d, 60);
    let daemon = Daemon::start_with(d, &main, None, |cmd| limit_files(cmd, 200));
    std::thread::sleep(Duration::from_secs(10));
    let log = daemon.log();
    assert!(
        log.contains("the open files limit is too low for the configured databases"),
        "warned before the databases start: {log}"
    );
    let exhausted = log.matches("out of open files").count();
    assert_eq!(exhausted, 1, "said once: {log}");
    let noisy = log
        .lines()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR "))
                && (l.contains("sync failed") || l.contains("Too many open files"))
        })
        .count();
    // Those that failed before the first count of descriptors, at most.
    assert!(noisy <= 5, "{noisy} per-database failures logged:\n{log}");
    // Those that did open keep replicating.
    let started = (0..60)
        .filter(|i| d.join(format!("replica-{i}/generations")).exists())
        .count();
    assert!(started > 0, "no database replicates:\n{log}");
    // Idle databases park (one descriptor each) once half the limit is in use, and a database
    // that fails for want of descriptors lets go of its own, so every database gets its turn:
    // all 60 replicate under a limit that holds about 22 open.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let started = (0..60)
            .filter(|i| d.join(format!("replica-{i}/generations")).exists())
            .count();
        if started == 60 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{started} of 60 databases replicate:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (st, _, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

/// `status --json` of the daemon at `sock`, first database (Null when it does not answer).
fn status_json(sock: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map(|v| v[0].clone())
        .unwrap_or_default()
}

fn standby_file(dir: &Path, name: &str, replica: &Path) -> String {
    format!(
        "path = \"{}\"\nrole = \"standby\"\npoll_interval = \"100ms\"\n\n[[replicas]]\nname = \"local\"\ntype = \"file\"\npath = \"{}\"\n",
        dir.join(format!("{name}.db")).display(),
        replica.display()
    )
}

/// A reader of the standby throughout: every state it sees keeps the bank's sum, and the
/// primary's transactions arrive in order (the blob count never goes back), bootstraps over
/// the existing file included.
struct StandbyReader {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    join: std::thread::JoinHandle<u64>,
}

impl StandbyReader {
    fn start(sdb: &Path) -> StandbyReader {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, sdb) = (stop.clone(), sdb.to_path_buf());
        let join = std::thread::spawn(move || {
            let (mut reads, mut last) = (0u64, 0i64);
            while !flag.load(Ordering::Relaxed) {
                if !sdb.exists() {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let c = rusqlite::Connection::open_with_flags(
                    &sdb,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                for _ in 0..20 {
                    let (sum, blobs) = accounts(&c);
                    assert_eq!(sum, 10_000, "a torn transaction on the standby");
                    assert!(blobs >= last, "the standby went back: {blobs} < {last}");
                    last = blobs;
                    reads += 1;
                }
            }
            reads
        });
        StandbyReader { stop, join }
    }

    /// Stops it; how many reads it made.
    fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.join.join().unwrap()
    }
}

/// Restores latest from `url` until its blob table is `want`'s (the uploads it waits for land
/// within 30 s), into fresh files under `scratch`.
fn restore_until_same(
    url: &str,
    want: &Path,
    scratch: &Path,
    what: &str,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let out = scratch.join(format!("{}-{n}.db", rand_suffix()));
        let r = Command::new(BIN)
            .args(["restore", "-o"])
            .arg(&out)
            .arg(url)
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .output()
            .unwrap();
        if r.status.success() && dump_rows(&out, "blob") == dump_rows(want, "blob") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}\n{}",
            String::from_utf8_lossy(&r.stderr),
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the standby's blob table is the primary's.
fn wait_same(primary: &Path, standby: &Path, daemon: &Daemon, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if standby.exists() && dump_rows(standby, "blob") == dump_rows(primary, "blob") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the standby did not catch up\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every object under a file replica: (path, size, mtime).
fn object_stamps(replica: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out: Vec<_> = walk(replica)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/generations/"))
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap();
            (p, m.len(), m.modified().unwrap())
        })
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Over a directory replica: a reader on the standby never sees a torn transaction; `kill -9`
/// of the standby resumes without a bootstrap; retention deleting segments it had not applied
/// makes it bootstrap again; `kill -9` of the primary then `promote --force` keeps every
/// uploaded transaction, in under 5 s; the old primary restarted says conflict and writes
/// nothing; a restore of latest is the promoted database.
#[test]
fn a_standby_daemon_follows_survives_kill_9_and_is_promoted_over_a_dead_primary() {
    let root = tempfile::tempdir().unwrap();
    let (p, s, replica) = (
        root.path().join("p"),
        root.path().join("s"),
        root.path().join("replica"),
    );
    for d in [&p, &s, &replica] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (pdb, sdb) = (p.join("bank.db"), s.join("bank.db"));
    let app = app_conn(&pdb);
    bank(&app);
    let mut rng = Lcg(19);
    transfer(&app, &mut rng, 20);
    let pmain = write_main(&p, "");
    std::fs::write(p.join("dbs.d/bank.toml"), db_file(&p, "bank", &replica)).unwrap();
    let smain = write_main(&s, "");
    std::fs::write(
        s.join("dbs.d/bank.toml"),
        standby_file(&s, "bank", &replica),
    )
    .unwrap();
    let check = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&smain)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let primary = Daemon::start(&p, &pmain, None);
    primary.expect("READY=1");
    let mut standby = Daemon::start(&s, &smain, None);
    standby.expect("READY=1");

    let reader = StandbyReader::start(&sdb);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        transfer(&app, &mut rng, 5);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_same(&pdb, &sdb, &standby, "following");
    let st = status_json(&s.join("control.sock"));
    assert_eq!(st["state"], "following", "{st}");
    assert_eq!(st["replicas"][0]["state"], "healthy", "{st}");
    assert_eq!(st["standby"]["bootstraps"], 1, "{st}");
    assert!(
        st["standby"]["commits_applied"].as_u64().unwrap() > 0,
        "{st}"
    );
    let (code, text) = status_exit(&s.join("control.sock"), &["--max-lag", "5"]);
    assert_eq!(code, 0, "{text}");

    // kill -9 of the standby, writes meanwhile, restart: it resumes, no new bootstrap.
    standby.child.kill().unwrap();
    standby.child.wait().unwrap();
    transfer(&app, &mut rng, 50);
    drop(standby);
    let standby = Daemon::start(&s, &smain, None);
    standby.expect("READY=1");
    wait_same(&pdb, &sdb, &standby, "after kill -9");
    let st = status_json(&s.join("control.sock"));
    assert_eq!(
        st["standby"]["bootstraps"], 0,
        "resumed, not bootstrapped: {st}"
    );
    assert!(
        !standby.log().contains("standby bootstrapped"),
        "{}",
        standby.log()
    );

    // Retention deletes segments the stopped standby had not applied (a new snapshot, then
    // every segment of the indexes before it, as retention does): it bootstraps again.
    let (code, _, log) = standby.stop();
    assert!(code.success(), "{log}");
    let index_of = |p: &Path| {
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        u32::from_str_radix(&n[..8], 16).unwrap()
    };
    // Caught up: the standby stands in the newest index.
    let standby_index = segments(&replica).last().unwrap().0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while segments(&replica).last().unwrap().0 <= standby_index {
        transfer(&app, &mut rng, 20);
        assert!(
            Instant::now() < deadline,
            "no new WAL index\n{}",
            primary.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = raw(
        &p.join("control.sock"),
        b"{\"v\":1,\"id\":1,\"cmd\":\"snapshot\",\"db\":\"bank\"}\n",
        1,
    );
    assert_eq!(r.last().unwrap()["type"], "ok", "{r:?}");
    let snap_index = objects(&replica, ".snapshot.lz4")
        .iter()
        .map(|p| index_of(p))
        .max()
        .unwrap();
    assert!(snap_index > standby_index, "{snap_index} {standby_index}");
    let mut deleted = 0;
    for (index, _, path) in segments(&replica) {
        if index < snap_index {
            std::fs::remove_file(path).unwrap();
            deleted += 1;
        }
    }
    assert!(deleted > 0);
    transfer(&app, &mut rng, 5);
    let standby = Daemon::start(&s, &smain, None);
    standby.expect("READY=1");
    wait_same(
        &pdb,
        &sdb,
        &standby,
        "after retention deleted what it had not applied",
    );
    let st = wait_status(
        &s.join("control.sock"),
        &standby,
        "bootstrapped for the gap",
        |st| st["standby"]["last_bootstrap"] == "gap in the replica",
    );
    assert_eq!(st["state"], "following", "{st}");

    // The primary dies (kill -9) with everything uploaded (the standby has it all).
    transfer(&app, &mut rng, 20);
    wait_same(&pdb, &sdb, &standby, "before the failover");
    let uploaded = dump_rows(&pdb, "blob");
    let mut primary = primary;
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    drop(app);
    let promoted_at = std::time::SystemTime::now();
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["promote", "bank", "--force", "--socket"])
        .arg(s.join("control.sock"))
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        standby.log()
    );
    assert!(took < Duration::from_secs(5), "promote took {took:?}");
    datagrams_until_status(&standby, "1 promoted from standby");
    let reads = reader.finish();
    assert!(reads > 100, "only {reads} reads on the standby");
    assert_eq!(
        dump_rows(&sdb, "blob"),
        uploaded,
        "lost uploaded transactions"
    );

    // The promoted database takes writes and replicates them in a new generation.
    let new_app = app_conn(&sdb);
    transfer(&new_app, &mut rng, 30);
    let st = status_json(&s.join("control.sock"));
    assert!(st["standby"]["promoted_at"].is_string(), "{st}");
    let old_objects: Vec<_> = object_stamps(&replica)
        .into_iter()
        .filter(|(_, _, m)| *m <= promoted_at)
        .collect();

    // The old primary comes back: it finds the lease taken, writes nothing, says conflict.
    let old = Daemon::start(&p, &pmain, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status_json(&p.join("control.sock"));
        if st["replicas"][0]["state"] == "conflict" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no conflict: {st}\n{}",
            old.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let old_gen: std::collections::BTreeSet<String> = old_objects
        .iter()
        .filter_map(|(p, _, _)| {
            let s = p.to_string_lossy();
            s.split("/generations/")
                .nth(1)
                .map(|r| r.split('/').next().unwrap().to_string())
        })
        .collect();
    for (path, size, mtime) in object_stamps(&replica) {
        let gen_of = path
            .to_string_lossy()
            .split("/generations/")
            .nth(1)
            .map(|r| r.split('/').next().unwrap().to_string())
            .unwrap();
        if old_gen.contains(&gen_of) {
            assert!(
                old_objects
                    .iter()
                    .any(|o| o.0 == path && o.1 == size && o.2 == mtime),
                "{} written after the promotion into an old generation\n{}",
                path.display(),
                old.log()
            );
        }
    }
    drop(old);

    // A restore of latest is the promoted database.
    restore_until_same(
        &format!("file://{}", replica.display()),
        &sdb,
        root.path(),
        "restore of latest is not the promoted database",
        || standby.log(),
    );
    drop(new_app);
    let (code, _, log) = standby.stop();
    assert!(code.success(), "{log}");
}

fn s3_db_file(dir: &Path, name: &str, port: u16, standby: bool) -> String {
    format!(
        "path = \"{}\"\n{}\n[[replicas]]\nname = \"s3\"\nurl = \"{}\"\naccess_key_id = \"{KEY}\"\nsecret_access_key = \"{SECRET}\"\n",
        dir.join(format!("{name}.db")).display(),
        if standby {
            "role = \"standby\"\npoll_interval = \"100ms\"\n"
        } else {
            ""
        },
        s3_url(port, name)
    )
}

/// Waits for `status --json` of the daemon at `sock` to satisfy `ok`.
fn wait_status(
    sock: &Path,
    daemon: &Daemon,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status_json(sock);
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Over S3 (s3s-fs): a new generation on the primary heals the standby by itself; a corrupt
/// segment is an error in `status`, `/metrics` and STATUS= until it is repaired; a planned
/// `handoff` + `promote` loses nothing; then the old primary, turned into a standby, is
/// promoted with --force while the new primary still writes: the new primary notices within
/// the lease's confirmation interval, stops uploading, and says conflict, and a restore of
/// latest is the database promoted last.
#[test]
fn standby_over_s3_heals_reports_hands_off_and_fences_a_live_primary() {
    use std::sync::Arc;
    let root = tempfile::tempdir().unwrap();
    let server = s3_server(&root.path().join("s3"));
    let bucket = root.path().join("s3/litestream-bucket/bank/generations");
    let (p, s) = (root.path().join("p"), root.path().join("s"));
    for d in [&p, &s] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (pdb, sdb) = (p.join("bank.db"), s.join("bank.db"));
    let (psock, ssock) = (p.join("control.sock"), s.join("control.sock"));
    let app = app_conn(&pdb);
    bank(&app);
    let mut rng = Lcg(23);
    transfer(&app, &mut rng, 10);
    let pmain = write_main(&p, "");
    std::fs::write(
        p.join("dbs.d/bank.toml"),
        s3_db_file(&p, "bank", server.port, false),
    )
    .unwrap();
    let smain = write_main(&s, "");
    std::fs::write(
        s.join("dbs.d/bank.toml"),
        s3_db_file(&s, "bank", server.port, true),
    )
    .unwrap();
    let primary = Daemon::start(&p, &pmain, None);
    primary.expect("READY=1");
    let standby = Daemon::start(&s, &smain, None);
    standby.expect("READY=1");
    let reader = StandbyReader::start(&sdb);
    transfer(&app, &mut rng, 50);
    wait_same(&pdb, &sdb, &standby, "following over S3");
    let st = status_json(&ssock);
    assert!(
        st["replicas"][0]["requests"]["get"].as_u64().unwrap() > 0,
        "{st}"
    );

    // A new generation: the primary stops, the application checkpoints and writes, the primary
    // starts again. The standby notices at its next listing and bootstraps again on its own.
    let (code, _, log) = primary.stop();
    assert!(code.success(), "{log}");
    app.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    transfer(&app, &mut rng, 10);
    let primary = Daemon::start(&p, &pmain, None);
    primary.expect("READY=1");
    transfer(&app, &mut rng, 10);
    wait_same(&pdb, &sdb, &standby, "after a new generation");
    let st = wait_status(&ssock, &standby, "bootstrapped again", |st| {
        st["standby"]["bootstraps"] == 2
    });
    assert_eq!(st["standby"]["last_bootstrap"], "new generation", "{st}");
    assert_eq!(st["state"], "following", "{st}");

    let reads = reader.finish();
    assert!(reads > 20, "only {reads} reads on the standby");

    // A corrupt segment, uploaded while the standby was away: an error, everywhere, at once.
    let (code, _, log) = standby.stop();
    assert!(code.success(), "{log}");
    let before: std::collections::BTreeSet<PathBuf> = walk(&bucket)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".wal.lz4"))
        .collect();
    transfer(&app, &mut rng, 5);
    let deadline = Instant::now() + Duration::from_secs(20);
    let fresh = loop {
        let now: Vec<PathBuf> = walk(&bucket)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".wal.lz4") && !before.contains(p))
            .collect();
        if let Some(f) = now.into_iter().max() {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no new segment\n{}",
            primary.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let good = std::fs::read(&fresh).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&fresh, &bad).unwrap();
    let standby = Daemon::start(&s, &smain, None);
    let st = wait_status(&ssock, &standby, "a corrupt segment reported", |st| {
        st["state"] == "error"
    });
    let key = fresh.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        st["last_error"].as_str().unwrap().contains(&key),
        "names the object: {st}"
    );
    assert_eq!(st["replicas"][0]["state"], "failed", "{st}");
    let (code, text) = status_exit(&ssock, &[]);
    assert_ne!(code, 0, "{text}");
    let m = standby.metrics();
    assert_eq!(
        metric(
            &m,
            "litestreamd_replica_state{db=\"bank\",replica=\"s3\",state=\"failed\"}"
        ),
        Some(1.0),
        "{m}"
    );
    datagrams_until_status(&standby, "1 in error");
    // Repaired: it follows again by itself.
    std::fs::write(&fresh, &good).unwrap();
    wait_same(&pdb, &sdb, &standby, "after the repair");
    wait_status(&ssock, &standby, "following after the repair", |st| {
        st["state"] == "following"
    });

    // Planned switchover: the application stops, handoff, promote (no --force): nothing lost.
    transfer(&app, &mut rng, 25);
    drop(app);
    let out = Command::new(BIN)
        .args(["handoff", "bank", "--socket"])
        .arg(&psock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        primary.log()
    );
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["promote", "bank", "--socket"])
        .arg(&ssock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        standby.log()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "promote took {:?}",
        t.elapsed()
    );
    assert_eq!(
        dump_rows(&sdb, "blob"),
        dump_rows(&pdb, "blob"),
        "lost in the handoff"
    );
    // And a restore of latest (the promoted lineage) is the source.
    restore_until_same(
        &s3_url(server.port, "bank"),
        &pdb,
        root.path(),
        "restore after the handoff is not the source",
        || standby.log(),
    );
    let st = status_json(&psock);
    assert_eq!(st["state"], "stopped", "{st}");

    // Failback, the hard way: the old primary becomes a standby of the new one...
    let (code, _, log) = primary.stop();
    assert!(code.success(), "{log}");
    std::fs::write(
        p.join("dbs.d/bank.toml"),
        s3_db_file(&p, "bank", server.port, true),
    )
    .unwrap();
    let old = Daemon::start(&p, &pmain, None);
    old.expect("READY=1");
    let new_app = app_conn(&sdb);
    transfer(&new_app, &mut rng, 20);
    wait_same(&sdb, &pdb, &old, "failback standby");
    // ...and is promoted with --force while the new primary is alive and writing.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (writing, sdb) = (writing.clone(), sdb.clone());
        std::thread::spawn(move || {
            let c = app_conn(&sdb);
            let mut rng = Lcg(29);
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                transfer(&c, &mut rng, 1);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let out = Command::new(BIN)
        .args(["promote", "bank", "--force", "--socket"])
        .arg(&psock)
        .output()
        .unwrap();
    let promoted = Instant::now();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        old.log()
    );
    // The fenced primary stops within CONFIRM_EVERY (5 s) of its next upload.
    wait_status(&ssock, &standby, "the fenced primary says conflict", |st| {
        st["replicas"][0]["state"] == "conflict"
    });
    let noticed = promoted.elapsed();
    assert!(noticed < Duration::from_secs(8), "fenced after {noticed:?}");
    let m = old.metrics();
    assert!(
        metric(
            &m,
            "litestreamd_standby_promoted_timestamp_seconds{db=\"bank\"}"
        )
        .is_some_and(|t| t > 0.0),
        "{m}"
    );
    let fenced_gen = status_json(&ssock)["pos"]["generation"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            status_json(&ssock)["pos"]
                .as_str()
                .map(|p| p.split('/').next().unwrap().to_string())
        })
        .unwrap();
    let frozen: Vec<_> = walk(&bucket.join(&fenced_gen))
        .into_iter()
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let later: Vec<_> = walk(&bucket.join(&fenced_gen))
        .into_iter()
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    assert_eq!(frozen, later, "the fenced primary kept uploading");
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // The promoted database takes writes; a restore of latest is it (after the fence window).
    let c = app_conn(&pdb);
    transfer(&c, &mut rng, 5);
    drop(c);
    restore_until_same(
        &s3_url(server.port, "bank"),
        &pdb,
        root.path(),
        "restore of latest is not the database promoted last",
        || old.log(),
    );
    drop(new_app);
    let _ = standby.stop();
    let (code, _, log) = old.stop();
    assert!(code.success(), "{log}");
}

/// Datagrams until one whose STATUS= line contains `text`.
fn datagrams_until_status(daemon: &Daemon, text: &str) -> (String, Vec<String>) {
    let mut seen = Vec::new();
    loop {
        let m = daemon.next();
        if m.lines()
            .any(|l| l.starts_with("STATUS=") && l.contains(text))
        {
            return (m, seen);
        }
        seen.push(m);
    }
}
