//! The shipped systemd units: `systemd-analyze verify` accepts both, and the main unit's
//! sandbox scores at most 3.0 in `systemd-analyze security --offline=yes`.
//!
//! `verify` fails when an Exec*= binary does not exist, so each unit is copied into a
//! temporary directory with `/usr/bin/litestreamd` replaced by the binary this test run
//! built. systemd-analyze is required: the test fails, it does not skip, if it is missing
//! (on Debian: `apt-get install systemd`). It does not need systemd as PID 1, so it runs in
//! containers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
const INSTALLED_BIN: &str = "/usr/bin/litestreamd";
const MAX_EXPOSURE: f64 = 3.0;

fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        // Plain output: no colours, no pager.
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}); it is required for this test \
                 (Debian/Ubuntu: apt-get install systemd)"
            )
        })
}

/// The major version of the installed systemd, from `systemd-analyze --version`
/// ("systemd 252 (252.38-1~deb12u1)").
fn systemd_version() -> u32 {
    let out = systemd_analyze(&["--version"]);
    assert!(out.status.success(), "systemd-analyze --version failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the systemd version from {text:?}"))
}

/// Copies `systemd/<name>` into `dir`, pointing every `/usr/bin/litestreamd` at the
/// binary built for this test run.
fn install_for_test(name: &str, dir: &Path) -> PathBuf {
    let bin = env!("CARGO_BIN_EXE_litestreamd");
    assert!(
        !bin.contains(char::is_whitespace),
        "the test binary path {bin:?} contains whitespace, which unit files cannot take unquoted"
    );
    let text = std::fs::read_to_string(Path::new(UNITS).join(name))
        .unwrap_or_else(|e| panic!("read systemd/{name}: {e}"));
    assert!(
        text.contains(INSTALLED_BIN),
        "systemd/{name} does not run {INSTALLED_BIN}"
    );
    let path = dir.join(name);
    std::fs::write(&path, text.replace(INSTALLED_BIN, bin)).unwrap();
    path
}

/// Runs `systemd-analyze verify` and returns the stderr lines that mention the unit file.
fn verify(unit: &Path) -> Vec<String> {
    let out = systemd_analyze(&["verify", unit.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify {} failed ({}):\n{stderr}",
        unit.display(),
        out.status
    );
    let name = unit.file_name().unwrap().to_str().unwrap();
    stderr
        .lines()
        .filter(|l| l.contains(name))
        .map(str::to_owned)
        .collect()
}

#[test]
fn main_unit_verifies_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let unit = install_for_test("litestreamd.service", dir.path());
    let lines = verify(&unit);
    assert!(
        lines.is_empty(),
        "systemd-analyze verify complained about litestreamd.service:\n{}",
        lines.join("\n")
    );
}

#[test]
fn notify_reload_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = install_for_test("litestreamd-notify-reload.service", dir.path());
    let lines = verify(&unit);
    // Type=notify-reload is new in systemd 253. Older versions (Debian 12 has 252) print
    // "<file>:<line>: Failed to parse service type, ignoring: notify-reload" and still
    // exit 0. That line is expected there: this unit is for systemd >= 253 only, and its
    // header says to install litestreamd.service on older systems. Every other line is a
    // failure, and on 253 or later no line at all is allowed.
    let old_systemd = systemd_version() < 253;
    let unexpected: Vec<&String> = lines
        .iter()
        .filter(|l| {
            !(old_systemd && l.ends_with(": Failed to parse service type, ignoring: notify-reload"))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "systemd-analyze verify complained about litestreamd-notify-reload.service:\n{}",
        unexpected
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn main_unit_is_sandboxed() {
    let dir = tempfile::tempdir().unwrap();
    let unit = install_for_test("litestreamd.service", dir.path());
    let out = systemd_analyze(&["security", "--offline=yes", unit.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze security failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // "→ Overall exposure level for litestreamd.service: 1.2 OK 🙂"
    let line = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in the output:\n{stdout}\n{stderr}"));
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure level from {line:?}"));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} is above {MAX_EXPOSURE}; the unit lost some sandboxing:\n{stdout}"
    );
}

/// The directives that matter, as the non-comment lines of a unit file.
fn directives(name: &str) -> Vec<String> {
    std::fs::read_to_string(Path::new(UNITS).join(name))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn units_differ_only_in_reload_handling() {
    let main = directives("litestreamd.service");
    let variant = directives("litestreamd-notify-reload.service");
    for want in [
        "Type=notify",
        "ExecStart=/usr/bin/litestreamd run --config /etc/litestreamd/litestreamd.toml",
        "ExecStartPre=-/usr/bin/litestreamd config check --config /etc/litestreamd/litestreamd.toml",
        "ExecReload=-/usr/bin/litestreamd config check --config /etc/litestreamd/litestreamd.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "TimeoutStopSec=120s",
        "User=litestreamd",
        "Group=litestreamd",
        "RuntimeDirectory=litestreamd",
        "RuntimeDirectoryMode=0750",
        "ProtectSystem=strict",
        "LimitNOFILE=65536",
    ] {
        assert!(
            main.iter().any(|l| l == want),
            "litestreamd.service lacks {want:?}"
        );
    }
    // The variant: Type=notify-reload and no kill ExecReload; every other line the same,
    // so that a change to one file is not forgotten in the other.
    let expected: Vec<String> = main
        .iter()
        .filter(|l| l.as_str() != "ExecReload=/bin/kill -HUP $MAINPID")
        .map(|l| {
            if l == "Type=notify" {
                "Type=notify-reload".to_owned()
            } else {
                l.clone()
            }
        })
        .collect();
    assert_eq!(
        variant, expected,
        "litestreamd-notify-reload.service must match litestreamd.service except for \
         Type=notify-reload and the missing ExecReload=/bin/kill line"
    );
}
