//! Dashboard tests without a daemon: reducers on states built from `DbStatus` values, and
//! insta snapshots of the rendered screen at 80x24 and 120x40.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::style::Color;

use super::input::{Action, Mode};
use super::state::*;
use super::view;
use crate::control::protocol::{DbDetail, GenerationDetail, ReplicaDetail};
use crate::layout::Pos;
use crate::replica::SnapshotInfo;
use crate::status::{
    DbState, DbStatus, DrillResult, DrillRun, DrillStatus, ReplicaState, ReplicaStatus,
};

const SIZES: [(u16, u16); 2] = [(80, 24), (120, 40)];
const GEN_APP: &str = "a1b2c3d4e5f60718";
const GEN_OLD: &str = "0f1e2d3c4b5a6978";

/// 2027-01-15T08:00:00Z.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn ago(secs: u64) -> SystemTime {
    now() - Duration::from_secs(secs)
}

fn drill(result: DrillResult, secs_ago: u64, reason: Option<&str>) -> DrillStatus {
    DrillStatus {
        result,
        finished_at: Some(ago(secs_ago)),
        last_success: Some(ago(secs_ago)),
        duration_seconds: 12.5,
        restored_bytes: 12 << 20,
        pos: Some(Pos::new(GEN_APP, 3, 4152)),
        reason: reason.map(str::to_string),
    }
}

fn replica(name: &str, kind: &str, url: &str, state: ReplicaState) -> ReplicaStatus {
    ReplicaStatus {
        state,
        caught_up_at: None,
        ..ReplicaStatus::new(name, kind, url)
    }
}

/// Three databases: one healthy, one with a retrying replica, one failed.
fn dbs() -> Vec<DbStatus> {
    let mut local = replica(
        "local",
        "file",
        "file:///var/backups/app",
        ReplicaState::Healthy,
    );
    local.pos = Some(Pos::new(GEN_APP, 3, 4152));
    local.last_sync = Some(ago(1));
    local.uploaded_bytes = 3 * 1024 * 1024 + 200_000;
    local.lag_seconds = 0.4;
    local.requests = crate::status::RequestCounts {
        put: 1234,
        list: 3,
        head: 2,
        ..Default::default()
    };
    local.requests_per_month = crate::status::RequestCounts {
        put: 1_296_000,
        ..Default::default()
    };
    let mut s3 = replica("s3", "s3", "s3://backups/app", ReplicaState::Healthy);
    s3.pos = Some(Pos::new(GEN_APP, 3, 4152));
    s3.last_sync = Some(ago(2));
    s3.uploaded_bytes = 3 * 1024 * 1024;
    s3.lag_seconds = 1.2;
    s3.lag_bytes = 4120;
    local.drill = Some(drill(DrillResult::Passed, 3 * 3600, None));
    s3.drill = Some(drill(
        DrillResult::Failed,
        600,
        Some("the restored database is not the source at a1b2c3d4e5f60718/00000003:4152"),
    ));
    let app = DbStatus {
        name: "app".into(),
        path: "/srv/app/app.db".into(),
        state: DbState::Replicating,
        pos: Some(Pos::new(GEN_APP, 3, 4152)),
        last_error: None,
        db_size: 12 * 1024 * 1024,
        wal_size: 4152,
        shadow_bytes: 70_000,
        last_sync: Some(ago(1)),
        drill: None,
        drill_interval: Some(Duration::from_secs(86400)),
        parked: false,
        standby: None,
        replicas: vec![local, s3],
    };

    let mut s3b = replica(
        "s3",
        "s3",
        "s3://backups/billing",
        ReplicaState::Retrying {
            attempt: 3,
            error: "connect to 10.0.0.5:9000: connection refused".into(),
        },
    );
    s3b.pos = Some(Pos::new("77aa00bb11cc22dd", 9, 0));
    s3b.last_sync = Some(ago(95));
    s3b.last_error = Some("connect to 10.0.0.5:9000: connection refused".into());
    s3b.retries = 3;
    s3b.lag_seconds = 95.0;
    s3b.lag_bytes = 2 * 1024 * 1024;
    let billing = DbStatus {
        name: "billing".into(),
        path: "/srv/billing/billing.db".into(),
        state: DbState::Replicating,
        pos: Some(Pos::new("77aa00bb11cc22dd", 0x1f, 1_048_608)),
        last_error: None,
        db_size: 300 * 1024 * 1024,
        wal_size: 4 * 1024 * 1024,
        shadow_bytes: 2 * 1024 * 1024,
        last_sync: Some(ago(1)),
        drill: Some(DrillRun {
            replica: Some("s3".into()),
            stage: "wal".into(),
            done: 3,
            total: 12,
        }),
        drill_interval: None,
        parked: false,
        standby: None,
        replicas: vec![s3b],
    };

    let mut gcs = replica(
        "gcs",
        "gcs",
        "gs://archive/analytics",
        ReplicaState::Failed {
            attempt: 10,
            error: "403 Forbidden: service account lacks storage.objects.create".into(),
        },
    );
    gcs.last_sync = Some(ago(7200));
    gcs.retries = 10;
    gcs.lag_seconds = 7200.0;
    gcs.lag_bytes = 40 * 1024 * 1024;
    let analytics = DbStatus {
        name: "analytics".into(),
        path: "/srv/analytics/analytics.db".into(),
        state: DbState::Error,
        pos: None,
        last_error: Some("database disk image is malformed".into()),
        db_size: 0,
        wal_size: 0,
        shadow_bytes: 0,
        last_sync: None,
        drill: None,
        drill_interval: None,
        parked: false,
        standby: None,
        replicas: vec![gcs],
    };
    vec![app, billing, analytics]
}

fn app_detail() -> DbDetail {
    let snap = |index, size, t| SnapshotInfo {
        generation: GEN_APP.into(),
        index,
        size,
        created_at: t,
    };
    let gen_now = GenerationDetail {
        generation: GEN_APP.into(),
        snapshots: vec![snap(0, 1_200_000, ago(3600)), snap(2, 1_250_000, ago(600))],
        segments: 17,
        wal_first: Some((0, 0)),
        wal_last: Some((3, 4152)),
        created: Some(ago(3600)),
        updated: Some(ago(1)),
    };
    let gen_old = GenerationDetail {
        generation: GEN_OLD.into(),
        snapshots: vec![SnapshotInfo {
            generation: GEN_OLD.into(),
            index: 0,
            size: 900_000,
            created_at: ago(86400 * 2),
        }],
        segments: 4,
        wal_first: Some((0, 0)),
        wal_last: Some((1, 8272)),
        created: Some(ago(86400 * 2)),
        updated: Some(ago(86400)),
    };
    DbDetail {
        status: dbs().remove(0),
        replicas: vec![
            ReplicaDetail {
                name: "local".into(),
                url: "file:///var/backups/app".into(),
                error: None,
                generations: vec![gen_now.clone(), gen_old],
            },
            ReplicaDetail {
                name: "s3".into(),
                url: "s3://backups/app".into(),
                error: None,
                generations: vec![gen_now],
            },
        ],
    }
}

fn base() -> State {
    State::new(PathBuf::from("/run/litestreamd/control.sock"), now())
}

/// A connected dashboard with the three databases and a few log lines.
fn connected() -> State {
    let mut s = base();
    s.apply(Msg::Status(dbs()));
    s.apply(Msg::Event {
        level: "warn".into(),
        db: Some("billing".into()),
        message: "replica s3 retrying: connect to 10.0.0.5:9000: connection refused".into(),
    });
    s.apply(Msg::Event {
        level: "error".into(),
        db: Some("analytics".into()),
        message: "replica gcs failed: 403 Forbidden".into(),
    });
    s
}

fn render(state: &State, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| view::draw(f, state)).unwrap();
    t
}

fn screen(state: &State, w: u16, h: u16) -> String {
    render(state, w, h).backend().to_string()
}

fn snap_all(name: &str, state: &State) {
    for (w, h) in SIZES {
        let t = render(state, w, h);
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), t.backend());
    }
}

// ---------------------------------------------------------------------------------------------
// Render snapshots

#[test]
fn main_table() {
    snap_all("main", &connected());
}

#[test]
fn main_table_colours() {
    let t = render(&connected(), 120, 40);
    let buf = t.backend().buffer();
    let find = |needle: &str| -> (u16, u16) {
        for y in 0..buf.area.height {
            let line: String = (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect();
            if let Some(byte) = line.find(needle) {
                let x = line[..byte].chars().count() as u16;
                return (x, y);
            }
        }
        panic!("{needle:?} not on screen:\n{}", t.backend());
    };
    let (x, y) = find("healthy");
    assert_eq!(buf[(x, y)].fg, Color::Green);
    let (x, y) = find("retrying");
    assert_eq!(buf[(x, y)].fg, Color::Yellow);
    let (x, y) = find("failed");
    assert_eq!(buf[(x, y)].fg, Color::Red);
    // The database state takes the worst of its replicas: billing is replicating, but retrying.
    let (x, y) = find("error ");
    assert_eq!(buf[(x, y)].fg, Color::Red);
}

#[test]
fn detail_pane() {
    let mut s = connected();
    let e = s.handle(Action::Enter);
    assert_eq!(e, vec![Effect::FetchDetail("analytics".into())]);
    // Select app (sorted by name: analytics, app, billing) and load its listing.
    s.handle(Action::Down);
    s.apply(Msg::Detail {
        db: "app".into(),
        result: Box::new(Ok(app_detail())),
    });
    assert_eq!(s.selected.as_deref(), Some("app"));
    snap_all("detail", &s);
}

fn restore_state() -> State {
    let mut s = connected();
    s.handle(Action::Down); // app
    s.apply(Msg::Detail {
        db: "app".into(),
        result: Box::new(Ok(app_detail())),
    });
    let e = s.handle(Action::OpenRestore);
    assert_eq!(e, vec![Effect::FetchDetail("app".into())]);
    s
}

#[test]
fn restore_dialog_empty() {
    let s = restore_state();
    snap_all("restore_empty", &s);
}

#[test]
fn restore_dialog_in_progress() {
    let mut s = restore_state();
    let e = s.handle(Action::Enter);
    assert!(matches!(e.as_slice(), [Effect::Restore(_)]), "{e:?}");
    s.apply(Msg::RestoreProgress {
        stage: "wal".into(),
        done: 6,
        total: 17,
    });
    snap_all("restore_running", &s);
}

#[test]
fn restore_dialog_done() {
    let mut s = restore_state();
    s.handle(Action::Enter);
    s.apply(Msg::RestoreDone(Ok(serde_json::json!({
        "replica": "local", "generation": GEN_APP, "snapshot_index": 2, "max_index": 3,
        "segments": 5, "bytes": 1_300_000, "integrity_checked": true
    }))));
    let text = screen(&s, 120, 40);
    assert!(text.contains("restore finished"), "{text}");
    assert!(text.contains("ok (PRAGMA integrity_check ran)"), "{text}");
    snap_all("restore_done", &s);
    s.handle(Action::Enter);
    assert!(s.dialog.is_none());
    assert!(s.log.back().unwrap().message.contains("integrity check ok"));
}

#[test]
fn restore_dialog_error() {
    let mut s = restore_state();
    s.handle(Action::Enter);
    s.apply(Msg::RestoreDone(Err(
        "no snapshot at or before 2020-01-01T00:00:00Z".into(),
    )));
    let text = screen(&s, 80, 24);
    assert!(text.contains("restore failed"), "{text}");
    assert!(text.contains("no snapshot at or before"), "{text}");
}

#[test]
fn socket_missing() {
    let mut s = base();
    s.apply(Msg::ConnFailed(ConnFailure::SocketMissing));
    let text = screen(&s, 80, 24);
    assert!(
        text.contains("no control socket at /run/litestreamd/control.sock"),
        "{text}"
    );
    assert!(text.contains("is litestreamd running?"), "{text}");
    snap_all("socket_missing", &s);
}

#[test]
fn access_denied() {
    let mut s = base();
    s.apply(Msg::ConnFailed(ConnFailure::AccessDenied));
    s.apply(Msg::ConnFailed(ConnFailure::AccessDenied));
    // Repeated failures are logged once.
    assert_eq!(s.log.len(), 1);
    snap_all("access_denied", &s);
}

#[test]
fn disconnected_keeps_stale_data() {
    let mut s = connected();
    s.apply(Msg::ConnFailed(ConnFailure::Other(
        "the daemon closed the connection".into(),
    )));
    s.apply(Msg::ConnFailed(ConnFailure::SocketMissing));
    let text = screen(&s, 120, 40);
    assert!(text.contains("disconnected — retrying"), "{text}");
    assert!(text.contains("stale"), "{text}");
    snap_all("disconnected", &s);
    // Actions are refused while disconnected, with a reason in the log.
    assert!(s.handle(Action::Snapshot).is_empty());
    assert!(s.log.back().unwrap().message.contains("not connected"));
    // Reconnecting: the first status push is enough.
    s.apply(Msg::Status(dbs()));
    assert!(s.connected());
}

#[test]
fn help_overlay() {
    let mut s = connected();
    s.handle(Action::Help);
    assert_eq!(s.mode(), Mode::Help);
    snap_all("help", &s);
    s.handle(Action::Escape);
    assert_eq!(s.mode(), Mode::Normal);
}

#[test]
fn columns_degrade_at_80() {
    let narrow = screen(&connected(), 80, 24);
    let wide = screen(&connected(), 120, 40);
    for col in [
        "DATABASE",
        "STATE",
        "POSITION",
        "REPLICA",
        "LAG",
        "SYNCED",
        "RETRY",
        "LAST ERROR",
    ] {
        assert!(
            narrow.contains(col),
            "{col} missing at 80 columns:\n{narrow}"
        );
    }
    for col in ["GEN", "HEALTH", "LAG BYTES", "DRILL"] {
        assert!(wide.contains(col), "{col} missing at 120 columns:\n{wide}");
    }
    assert!(wide.contains("00000003:4152"), "{wide}");
    assert!(narrow.contains("3:4152"), "{narrow}");
    // Nothing is cut off mid-border at either size.
    for (w, h) in [(80, 24), (100, 30), (120, 40), (200, 50)] {
        let t = screen(&connected(), w, h);
        assert!(t.contains("╰"), "{t}");
    }
}

// ---------------------------------------------------------------------------------------------
// Reducers

fn names(s: &State) -> Vec<&str> {
    s.visible().iter().map(|d| d.name.as_str()).collect()
}

#[test]
fn filter() {
    let mut s = connected();
    assert_eq!(s.selected.as_deref(), Some("analytics"));
    s.handle(Action::StartFilter);
    assert_eq!(s.mode(), Mode::Filter);
    for c in "BIL".chars() {
        s.handle(Action::Char(c));
    }
    assert_eq!(names(&s), ["billing"]);
    // The selection follows what is visible.
    assert_eq!(s.selected.as_deref(), Some("billing"));
    // `q` is text while filtering, not quit.
    s.handle(Action::Char('q'));
    assert!(!s.quit);
    assert!(names(&s).is_empty());
    s.handle(Action::Backspace);
    s.handle(Action::Enter);
    assert_eq!(s.mode(), Mode::Normal);
    assert_eq!(s.filter, "BIL");
    // Filters match states and replica names too.
    s.filter = "retrying".into();
    assert_eq!(names(&s), ["billing"]);
    s.filter = "gcs".into();
    assert_eq!(names(&s), ["analytics"]);
    s.handle(Action::Escape);
    assert_eq!(s.filter, "");
    assert_eq!(names(&s).len(), 3);
    // Esc while typing also clears.
    s.handle(Action::StartFilter);
    s.handle(Action::Char('x'));
    s.handle(Action::Escape);
    assert_eq!((s.filter.as_str(), s.mode()), ("", Mode::Normal));
}

#[test]
fn sort_cycles() {
    let mut s = connected();
    assert_eq!(s.sort, SortKey::Name);
    assert_eq!(names(&s), ["analytics", "app", "billing"]);
    s.handle(Action::CycleSort);
    assert_eq!(s.sort, SortKey::State);
    // Worst first: failed/error, then retrying, then healthy.
    assert_eq!(names(&s), ["analytics", "billing", "app"]);
    s.handle(Action::CycleSort);
    assert_eq!(s.sort, SortKey::Lag);
    assert_eq!(names(&s), ["analytics", "billing", "app"]);
    s.dbs[2].replicas[0].lag_seconds = 0.0; // analytics caught up
    assert_eq!(names(&s), ["billing", "app", "analytics"]);
    s.handle(Action::CycleSort);
    assert_eq!(s.sort, SortKey::Name);
}

#[test]
fn selection_moves_and_survives_updates() {
    let mut s = connected();
    assert_eq!(s.selected.as_deref(), Some("analytics"));
    s.handle(Action::Up);
    assert_eq!(s.selected.as_deref(), Some("analytics"));
    s.handle(Action::Down);
    s.handle(Action::Down);
    s.handle(Action::Down);
    assert_eq!(s.selected.as_deref(), Some("billing"));
    s.handle(Action::Top);
    assert_eq!(s.selected_index(), Some(0));
    s.handle(Action::Bottom);
    assert_eq!(s.selected_index(), Some(2));
    // The selection is by name: a new status order keeps it.
    let mut d = dbs();
    d.reverse();
    s.apply(Msg::Status(d));
    assert_eq!(s.selected.as_deref(), Some("billing"));
    // A removed database moves the selection to the first one.
    let d: Vec<DbStatus> = dbs().into_iter().filter(|x| x.name != "billing").collect();
    s.apply(Msg::Status(d));
    assert_eq!(s.selected.as_deref(), Some("analytics"));
    // Sorting keeps the selected database, not the row number.
    s.handle(Action::Down);
    assert_eq!(s.selected.as_deref(), Some("app"));
    s.handle(Action::CycleSort);
    assert_eq!(s.selected.as_deref(), Some("app"));
}

#[test]
fn detail_follows_selection_and_refreshes() {
    let mut s = connected();
    assert_eq!(
        s.handle(Action::ToggleDetail),
        vec![Effect::FetchDetail("analytics".into())]
    );
    // Already loading: no second request.
    assert!(s.tick(now()).is_empty());
    assert_eq!(
        s.handle(Action::Down),
        vec![Effect::FetchDetail("app".into())]
    );
    s.apply(Msg::Detail {
        db: "app".into(),
        result: Box::new(Ok(app_detail())),
    });
    assert!(s.tick(now() + Duration::from_secs(1)).is_empty());
    assert_eq!(
        s.tick(now() + DETAIL_REFRESH + Duration::from_secs(1)),
        vec![Effect::FetchDetail("app".into())]
    );
    assert!(s.handle(Action::ToggleDetail).is_empty());
    assert!(!s.show_detail);
}

#[test]
fn snapshot_and_sync_results_are_logged() {
    let mut s = connected();
    s.handle(Action::Down); // app
    assert_eq!(
        s.handle(Action::Snapshot),
        vec![Effect::Snapshot("app".into())]
    );
    assert_eq!(s.handle(Action::Sync), vec![Effect::Sync("app".into())]);
    assert_eq!(s.handle(Action::Drill), vec![Effect::Drill("app".into())]);
    s.apply(Msg::ActionDone {
        action: ActionKind::Drill,
        db: "app".into(),
        result: Ok(serde_json::to_value(vec![
            drill(DrillResult::Passed, 0, None),
            drill(DrillResult::Failed, 0, Some("restore failed: boom")),
        ])
        .unwrap()),
    });
    assert_eq!(
        s.log.back().unwrap().message,
        "drill: #1 passed in 12.5s; #2 failed in 12.5s: restore failed: boom"
    );
    s.apply(Msg::ActionDone {
        action: ActionKind::Snapshot,
        db: "app".into(),
        result: Ok(serde_json::json!("snapshot written")),
    });
    assert_eq!(s.log.back().unwrap().message, "snapshot: snapshot written");
    s.apply(Msg::ActionDone {
        action: ActionKind::Sync,
        db: "app".into(),
        result: Ok(serde_json::to_value(Pos::new(GEN_APP, 3, 4152)).unwrap()),
    });
    assert_eq!(
        s.log.back().unwrap().message,
        format!("sync: done, position {GEN_APP}/00000003:4152")
    );
    s.apply(Msg::ActionDone {
        action: ActionKind::Sync,
        db: "app".into(),
        result: Err("worker stopped".into()),
    });
    let last = s.log.back().unwrap();
    assert_eq!(
        (last.level, last.message.as_str()),
        (Level::Error, "sync failed: worker stopped")
    );
}

#[test]
fn restore_defaults_never_target_the_live_database() {
    let mut s = connected();
    for db in dbs() {
        s.selected = Some(db.name.clone());
        s.dialog = None;
        s.handle(Action::OpenRestore);
        let d = s.dialog.as_ref().unwrap();
        assert_eq!(d.live_path, db.path);
        let req = d.request().unwrap();
        assert_ne!(req.output, db.path);
        // A plain file name: the daemon puts it in its restore directory.
        assert_eq!(
            req.output,
            PathBuf::from(format!(
                "{}.restored-20270115T080000Z.db",
                db.path.file_name().unwrap().to_string_lossy()
            ))
        );
        // Defaults: any replica, latest generation, latest position, integrity check on.
        assert_eq!(req.db, db.name);
        assert_eq!(
            (req.replica, req.generation, req.index, req.timestamp),
            (None, None, None, None)
        );
        assert!(req.integrity_check);
    }
}

#[test]
fn restore_refuses_live_paths() {
    let mut s = restore_state();
    let live = "/srv/app/app.db";
    for bad in [
        live.to_string(),
        "/srv/app/./app.db".into(),
        "/srv/app/sub/../app.db".into(),
        format!("{live}-wal"),
        format!("{live}-shm"),
    ] {
        let d = s.dialog.as_mut().unwrap();
        d.phase = Phase::Editing { error: None };
        d.output = bad.clone();
        assert!(s.handle(Action::Enter).is_empty(), "{bad} accepted");
        let Phase::Editing { error: Some(e) } = &s.dialog.as_ref().unwrap().phase else {
            panic!("no error for {bad}");
        };
        assert!(e.contains("live database"), "{e}");
    }
    // A relative output stays relative (the daemon's restore directory); `..` is refused.
    s.dialog.as_mut().unwrap().output = "../app.db".into();
    assert!(s.handle(Action::Enter).is_empty());
    s.dialog.as_mut().unwrap().phase = Phase::Editing { error: None };
    s.dialog.as_mut().unwrap().output = "copy.db".into();
    match s.handle(Action::Enter).as_slice() {
        [Effect::Restore(r)] => assert_eq!(r.output, PathBuf::from("copy.db")),
        other => panic!("{other:?}"),
    }
    assert!(check_not_live(Path::new("/srv/app/app.db.restored.db"), Path::new(live)).is_ok());
}

#[test]
fn restore_dialog_choices() {
    let mut s = restore_state();
    let d = s.dialog.as_ref().unwrap();
    assert_eq!(d.replicas, ["local", "s3"]);
    // Every generation any replica has, newest first.
    assert_eq!(d.generations, [GEN_APP, GEN_OLD]);
    assert_eq!(d.focus, Field::Replica);
    s.handle(Action::Right); // replica: local
    s.handle(Action::Right); // replica: s3
    assert_eq!(s.dialog.as_ref().unwrap().replica_label(), "s3");
    // s3 has only the current generation.
    assert_eq!(s.dialog.as_ref().unwrap().generations, [GEN_APP]);
    s.handle(Action::Right); // back to any
    assert_eq!(s.dialog.as_ref().unwrap().replica_label(), "any");
    s.handle(Action::Left); // s3
    s.handle(Action::Left); // local
    s.handle(Action::NextField);
    s.handle(Action::Right); // newest generation of local
    s.handle(Action::Right); // older
    assert_eq!(s.dialog.as_ref().unwrap().generation_label(), GEN_OLD);
    s.handle(Action::NextField);
    s.handle(Action::Right); // point in time
    s.handle(Action::NextField);
    assert_eq!(s.dialog.as_ref().unwrap().focus, Field::Value);
    s.handle(Action::ClearField);
    for c in "yesterday".chars() {
        s.handle(Action::Char(c));
    }
    assert!(s.handle(Action::Enter).is_empty());
    let Phase::Editing { error: Some(e) } = &s.dialog.as_ref().unwrap().phase else {
        panic!()
    };
    assert!(e.contains("RFC 3339"), "{e}");
    s.handle(Action::ClearField);
    for c in "2027-01-14T12:00:00Z".chars() {
        s.handle(Action::Char(c));
    }
    match s.handle(Action::Enter).as_slice() {
        [Effect::Restore(r)] => {
            assert_eq!(r.replica.as_deref(), Some("local"));
            assert_eq!(r.generation.as_deref(), Some(GEN_OLD));
            assert_eq!(r.timestamp.as_deref(), Some("2027-01-14T12:00:00Z"));
            assert_eq!(r.index, None);
        }
        other => panic!("{other:?}"),
    }
    assert!(s.dialog.as_ref().unwrap().is_running());
    // Esc while running closes the dialog; the result is still logged.
    s.handle(Action::Escape);
    assert!(s.dialog.is_none());
}

#[test]
fn restore_to_an_index() {
    let mut s = restore_state();
    s.handle(Action::NextField);
    s.handle(Action::NextField); // target
    s.handle(Action::Left); // WAL index
    s.handle(Action::NextField);
    for c in "1f".chars() {
        s.handle(Action::Char(c));
    }
    match s.handle(Action::Enter).as_slice() {
        [Effect::Restore(r)] => assert_eq!((r.index, r.timestamp.as_deref()), (Some(0x1f), None)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn restore_needs_a_connection() {
    let mut s = restore_state();
    s.apply(Msg::ConnFailed(ConnFailure::SocketMissing));
    assert!(s.handle(Action::Enter).is_empty());
    assert!(matches!(
        &s.dialog.as_ref().unwrap().phase,
        Phase::Editing { error: Some(e) } if e.contains("not connected")
    ));
}

#[test]
fn quit_keys() {
    let mut s = connected();
    assert_eq!(s.handle(Action::Quit), vec![Effect::Quit]);
    assert!(s.quit);
}

#[test]
fn log_is_bounded() {
    let mut s = base();
    for i in 0..LOG_CAPACITY + 10 {
        s.log(Level::Info, None, format!("line {i}"));
    }
    assert_eq!(s.log.len(), LOG_CAPACITY);
    assert_eq!(s.log.front().unwrap().message, "line 10");
}

#[test]
fn formats() {
    assert_eq!(view::fmt_bytes(0), "0B");
    assert_eq!(view::fmt_bytes(4120), "4.0K");
    assert_eq!(view::fmt_bytes(2 * 1024 * 1024), "2.0M");
    assert_eq!(view::fmt_bytes(300 * 1024 * 1024), "300M");
    assert_eq!(view::fmt_lag(0.44), "0.4s");
    assert_eq!(view::fmt_lag(95.0), "1m");
    assert_eq!(view::fmt_age(now(), None), "never");
    assert_eq!(view::fmt_age(now(), Some(ago(7200))), "2h");
    assert_eq!(view::truncate("abcdef", 4), "abc…");
    assert_eq!(file_stamp(now()), "20270115T080000Z");
}

/// A standby: shown as following, its detail pane says what it follows and its apply lag, and
/// `P` promotes it only when pressed twice within the window (never on a primary).
#[test]
fn standby_detail_and_promote_asks_twice() {
    let mut r = replica("s3", "s3", "s3://backups/app", ReplicaState::Healthy);
    r.pos = Some(Pos::new(GEN_APP, 7, 4152));
    r.last_sync = Some(ago(1));
    let standby = DbStatus {
        name: "replica-app".into(),
        path: "/srv/app/app.db".into(),
        state: DbState::Following,
        pos: Some(Pos::new(GEN_APP, 7, 4152)),
        last_error: None,
        db_size: 12 * 1024 * 1024,
        wal_size: 0,
        shadow_bytes: 0,
        last_sync: Some(ago(1)),
        drill: None,
        drill_interval: None,
        parked: false,
        standby: Some(crate::status::StandbyStatus {
            replica: "s3".into(),
            poll_interval: Duration::from_secs(1),
            apply_lag_seconds: Some(0.42),
            last_applied: Some(ago(1)),
            commits_applied: 1234,
            bootstraps: 2,
            last_bootstrap: Some("new generation".into()),
            promoted_at: None,
        }),
        replicas: vec![r],
    };
    let mut all = dbs();
    all.push(standby);
    let mut s = base();
    s.apply(Msg::Status(all));
    s.selected = Some("replica-app".into());
    s.show_detail = true;
    let text = screen(&s, 120, 40);
    assert!(text.contains("following"), "{text}");
    assert!(text.contains("standby of s3"), "{text}");
    assert!(text.contains("apply lag 0.42s"), "{text}");
    assert!(
        text.contains("bootstraps 2 (last: new generation)"),
        "{text}"
    );

    // Once: armed, nothing sent. Twice: sent.
    assert!(s.handle(Action::Promote).is_empty());
    assert!(s.log.back().unwrap().message.contains("press P again"));
    assert_eq!(
        s.handle(Action::Promote),
        vec![Effect::Promote("replica-app".into())]
    );
    // Twice, but too far apart: armed again, not sent.
    assert!(s.handle(Action::Promote).is_empty());
    s.now += CONFIRM_WINDOW + Duration::from_secs(1);
    assert!(s.handle(Action::Promote).is_empty());
    // A primary is never promoted.
    s.selected = Some("app".into());
    assert!(s.handle(Action::Promote).is_empty());
    assert!(s.handle(Action::Promote).is_empty());
    assert_eq!(s.log.back().unwrap().message, "promote: not a standby");
}
