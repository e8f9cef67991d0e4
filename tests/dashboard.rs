//! End to end: the real daemon, the real dashboard inside tmux (a real terminal emulator, which
//! crossterm needs), keys sent with `tmux send-keys` and the screen read with `capture-pane`.
//! The test restores the database from the dashboard and checks the restored file with SQLite.
//!
//! tmux is required: the test fails (it does not skip) when it is missing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use litestreamd::control::client::Client;
use rusqlite::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_litestreamd");

/// A private tmux server (`-L`), so the test never touches the user's sessions.
struct Tmux {
    server: String,
    session: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.server]);
        c
    }

    fn run(&self, args: &[&str]) {
        let out = self.cmd().args(args).output().expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-t", &self.session, "-l", text]);
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", &self.session])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Polls the screen until `pred` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; the screen was:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
    }
}

/// The daemon; SIGTERMed (then killed, if it hangs) when dropped.
struct Daemon(Child);

impl Daemon {
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                panic!("the daemon did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn rows(c: &Connection) -> Vec<(i64, String)> {
    let mut st = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Waits until the daemon reports the database replicating and every replica at the
/// database's position with nothing left to upload.
fn wait_caught_up(socket: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Ok(mut c) = Client::connect(socket).await
                && let Ok(dbs) = c.status().await
            {
                let ok = dbs.iter().any(|d| {
                    d.name == "app"
                        && d.state.as_str() == "replicating"
                        && d.pos.is_some()
                        && !d.replicas.is_empty()
                        && d.replicas
                            .iter()
                            .all(|r| r.pos == d.pos && r.lag_bytes == 0)
                });
                if ok {
                    return;
                }
                last = Some(dbs);
            }
            if Instant::now() > deadline {
                panic!("the replica did not catch up within 30s: {last:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn dashboard_shows_status_and_restores() {
    let tmux_ok = Command::new("tmux")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        tmux_ok,
        "tmux is required for the dashboard test (apt-get install -y tmux); not skipping"
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("control.sock");
    let db = dir.join("app.db");
    let main_cfg = dir.join("litestreamd.toml");
    write(
        &main_cfg,
        &format!(
            "dbs_dir = \"dbs.d\"\nmetrics_addr = \"\"\ncontrol_socket = \"{}\"\nrestore_dirs = [\"{}\"]\n\n[defaults]\nmonitor_interval = \"100ms\"\nsync_interval = \"100ms\"\n",
            socket.display(),
            dir.display()
        ),
    );
    write(
        &dir.join("dbs.d/app.toml"),
        &format!(
            "path = \"{}\"\n\n[[replicas]]\nname = \"local\"\ntype = \"file\"\npath = \"{}\"\n",
            db.display(),
            dir.join("replica").display()
        ),
    );

    // The application's database, in WAL mode, with rows before the daemon starts.
    let app = Connection::open(&db).unwrap();
    app.busy_timeout(Duration::from_secs(10)).unwrap();
    let mode: String = app
        .query_row("PRAGMA journal_mode = wal", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .unwrap();
    for i in 0..50 {
        app.execute("INSERT INTO t (v) VALUES (?1)", [format!("before-{i}")])
            .unwrap();
    }

    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut daemon = Daemon(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&main_cfg)
            .env("LITESTREAMD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if let Some(st) = daemon.0.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}):\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no control socket after 30s:\n{}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // More rows while it runs: these travel as WAL segments.
    for i in 0..50 {
        app.execute("INSERT INTO t (v) VALUES (?1)", [format!("after-{i}")])
            .unwrap();
    }
    let expected = rows(&app);
    assert_eq!(expected.len(), 100);

    let tui_err = dir.join("tui.stderr");
    let name = format!("ltd-dash-{}", std::process::id());
    let tmux = Tmux {
        server: name.clone(),
        session: name,
    };
    let command = format!(
        "LITESTREAMD_LOG=error '{BIN}' tui --socket '{}' 2>'{}'",
        socket.display(),
        tui_err.display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        &tmux.session,
        "-x",
        "120",
        "-y",
        "40",
        &command,
    ]);

    // The main table: app, replicating, its replica.
    let screen = tmux.wait_for("app replicating", Duration::from_secs(20), |s| {
        s.lines()
            .any(|l| l.contains(" app ") && l.contains("replicating") && l.contains("local"))
    });
    assert!(screen.contains("● connected"), "{screen}");

    // Sync now, from the dashboard; the result lands in the event log.
    tmux.keys(&["y"]);
    tmux.wait_for("the sync result", Duration::from_secs(20), |s| {
        s.contains("sync: done")
    });
    wait_caught_up(&socket);

    // The detail pane lists the replica's generation.
    tmux.keys(&["Enter"]);
    tmux.wait_for("the detail pane", Duration::from_secs(20), |s| {
        s.contains("app — detail") && s.contains("snapshot ")
    });
    tmux.keys(&["Enter"]);

    // Restore dialog: the default output is a new file in the daemon's restore directory.
    tmux.keys(&["r"]);
    let screen = tmux.wait_for("the restore dialog", Duration::from_secs(10), |s| {
        s.contains("restore app")
    });
    assert!(screen.contains("app.db.restored-"), "{screen}");
    // replica → generation → restore to → output
    tmux.keys(&["Tab", "Tab", "Tab"]);
    tmux.wait_for("the output field focused", Duration::from_secs(10), |s| {
        s.contains("› output")
    });
    let out = dir.join("restored.db");
    tmux.keys(&["C-u"]);
    tmux.type_text(&out.display().to_string());
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the restore result", Duration::from_secs(60), |s| {
        s.contains("restore finished") || s.contains("restore failed")
    });
    assert!(screen.contains("restore finished"), "{screen}");
    assert!(
        screen.contains("ok (PRAGMA integrity_check ran)"),
        "{screen}"
    );

    // The restored file has every row and is intact.
    let restored = Connection::open(&out).unwrap();
    assert_eq!(rows(&restored), expected);
    let check: String = restored
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(restored);
    // The live database was not touched.
    assert_eq!(rows(&app), expected);

    // Close the dialog, quit; the dashboard exits by itself.
    tmux.keys(&["Enter"]);
    tmux.wait_for("the dialog closed", Duration::from_secs(10), |s| {
        !s.contains("restore finished")
    });
    tmux.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(
            Instant::now() < deadline,
            "the dashboard did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = std::fs::read_to_string(&tui_err).unwrap_or_default();
    assert!(
        !err.contains("panicked") && !err.contains("error"),
        "dashboard stderr: {err}"
    );
    drop(tmux);

    let st = daemon.stop();
    assert!(
        st.success(),
        "daemon exit {st}:\n{}",
        std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
}
