//! The Debian package: `packaging/build-deb.sh` builds it once (release binary, man page and
//! completions, cargo-deb), then this test checks it the way an installation would see it:
//!
//! * `dpkg-deb -I`: package name, version, Depends, maintainer scripts, conffiles;
//! * `dpkg-deb -c`: every file of the layout, with owner and mode, and nothing unexpected;
//! * `dpkg-deb -x` into a scratch root: the files are those of the repository, the binary
//!   runs, `systemd-analyze verify` accepts both unit files, systemd-sysusers accepts the
//!   sysusers.d line, and the man page and completions match the binary's subcommands and
//!   are exactly what `litestreamd generate-docs` writes;
//! * `dpkg-deb -e`: the maintainer scripts parse, and with stub commands on PATH the postinst
//!   creates the user (systemd-sysusers, or adduser without it) and enables the service
//!   without starting it.
//!
//! The build takes a few minutes on a cold target directory. dpkg-deb, systemd-analyze,
//! systemd-sysusers and gzip are required: the test fails, it does not skip, without them
//! (Debian: `apt-get install dpkg systemd gzip`). Nothing is installed on this machine.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const INSTALLED_BIN: &str = "/usr/bin/litestreamd";
const UNITS: [&str; 2] = ["litestreamd.service", "litestreamd-notify-reload.service"];
const SYSUSERS_LINE: &str =
    r#"u litestreamd - "litestreamd replication daemon" /var/lib/litestreamd"#;
/// The files `litestreamd generate-docs DIR` writes, and where the package installs them.
const GENERATED: [(&str, &str); 4] = [
    ("litestreamd.1", "/usr/share/man/man1/litestreamd.1.gz"),
    (
        "litestreamd.bash",
        "/usr/share/bash-completion/completions/litestreamd",
    ),
    (
        "_litestreamd",
        "/usr/share/zsh/vendor-completions/_litestreamd",
    ),
    (
        "litestreamd.fish",
        "/usr/share/fish/vendor_completions.d/litestreamd.fish",
    ),
];

/// Runs a command to completion; panics (naming `hint`) if it cannot be started at all.
fn output(cmd: &mut Command, hint: &str) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} ({e}); it is required for this test ({hint})",
            cmd.get_program()
        )
    })
}

/// Runs a command that must succeed and returns its stdout.
fn stdout_of(cmd: &mut Command, hint: &str) -> String {
    let out = output(cmd, hint);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{cmd:?}: output is not UTF-8: {e}"))
}

const DPKG_HINT: &str = "Debian/Ubuntu: apt-get install dpkg";
const SYSTEMD_HINT: &str = "Debian/Ubuntu: apt-get install systemd";

fn dpkg_deb(args: &[&str]) -> String {
    stdout_of(Command::new("dpkg-deb").args(args), DPKG_HINT)
}

fn systemd_analyze(args: &[&str]) -> Output {
    output(
        Command::new("systemd-analyze")
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", ""),
        SYSTEMD_HINT,
    )
}

/// The major version of systemd ("systemd 252 (252.38-1~deb12u1)").
fn systemd_version() -> u32 {
    let text = stdout_of(
        Command::new("systemd-analyze").arg("--version"),
        SYSTEMD_HINT,
    );
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the systemd version from {text:?}"))
}

/// Fails early, before the long build, when a required tool is missing.
fn require_tools() {
    stdout_of(Command::new("dpkg-deb").arg("--version"), DPKG_HINT);
    systemd_version();
    stdout_of(
        Command::new("systemd-sysusers").arg("--version"),
        SYSTEMD_HINT,
    );
    stdout_of(
        Command::new("gzip").arg("--version"),
        "Debian/Ubuntu: apt-get install gzip",
    );
}

/// Runs packaging/build-deb.sh (its progress goes to this test's stderr) and returns the .deb.
fn build_deb() -> PathBuf {
    let script = Path::new(ROOT).join("packaging/build-deb.sh");
    let out = Command::new(&script)
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "packaging/build-deb.sh failed ({}); stdout:\n{stdout}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let deb = PathBuf::from(last);
    assert!(
        last.ends_with(".deb") && deb.is_file(),
        "build-deb.sh must print the path of the .deb as its last line, got {stdout:?}"
    );
    deb
}

/// One line of `dpkg-deb -c`: "-rw-r--r-- 0/0  1470 2026-11-24 00:00 ./etc/litestreamd/x".
#[derive(Debug)]
struct Entry {
    mode: String,
    owner: String,
    /// Absolute, without the leading "." and without a trailing "/".
    path: String,
}

fn listing(deb: &Path) -> Vec<Entry> {
    dpkg_deb(&["-c", deb.to_str().unwrap()])
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert!(cols.len() >= 6, "unexpected dpkg-deb -c line {line:?}");
            let path = cols[5..].join(" ");
            let path = path.strip_prefix('.').unwrap_or(&path);
            Entry {
                mode: cols[0].to_owned(),
                owner: cols[1].to_owned(),
                path: path.trim_end_matches('/').to_owned(),
            }
        })
        .collect()
}

/// The package's files (not directories) that must be there, with their modes. Examples come
/// from the repository, so a new example is packaged without editing this list.
fn expected_files() -> Vec<(String, &'static str)> {
    let mut files: Vec<(String, &str)> = vec![
        (INSTALLED_BIN.into(), "-rwxr-xr-x"),
        ("/etc/litestreamd/litestreamd.toml".into(), "-rw-r--r--"),
        (
            "/etc/litestreamd/dbs.d/example.toml.disabled".into(),
            "-rw-r--r--",
        ),
        ("/usr/lib/sysusers.d/litestreamd.conf".into(), "-rw-r--r--"),
        ("/usr/share/doc/litestreamd/copyright".into(), "-rw-r--r--"),
        (
            "/usr/share/doc/litestreamd/operations.md".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/share/doc/litestreamd/examples/alerts.yml".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/share/doc/litestreamd/examples/grafana-dashboard.json".into(),
            "-rw-r--r--",
        ),
    ];
    for unit in UNITS {
        files.push((format!("/usr/lib/systemd/system/{unit}"), "-rw-r--r--"));
    }
    for (_, dest) in GENERATED {
        files.push((dest.into(), "-rw-r--r--"));
    }
    for example in repo_examples() {
        files.push((
            format!("/usr/share/doc/litestreamd/examples/{example}"),
            "-rw-r--r--",
        ));
    }
    files
}

/// config/examples/*.toml, by file name.
fn repo_examples() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("config/examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "config/examples has no *.toml");
    names
}

fn check_control(deb: &Path, entries: &[Entry]) {
    let deb = deb.to_str().unwrap();
    let info = dpkg_deb(&["-I", deb]);
    let control = dpkg_deb(&["-I", deb, "control"]);
    let field = |name: &str| -> String {
        control
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("control has no {name} field:\n{control}"))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "litestreamd");
    let version = field("Version");
    assert!(
        version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))),
        "Version {version:?} is not the crate version {} plus a revision",
        env!("CARGO_PKG_VERSION")
    );
    assert!(!field("Architecture").is_empty());
    let maintainer = field("Maintainer");
    assert!(
        maintainer.contains('<') && maintainer.contains('@') && maintainer.ends_with('>'),
        "Maintainer {maintainer:?} is not \"name <email>\""
    );

    // Depends: libc from $auto, a way to create the user, nothing unresolved, not itself.
    let depends = field("Depends");
    let deps: Vec<&str> = depends.split(',').map(str::trim).collect();
    assert!(
        deps.iter().any(|d| d.starts_with("libc6 (>= ")),
        "Depends {depends:?} lacks the libc6 (>= …) that $auto finds"
    );
    assert!(
        deps.iter()
            .any(|d| d.split('|').map(str::trim).any(|a| a == "adduser")
                && d.split('|').map(str::trim).any(|a| a == "systemd")),
        "Depends {depends:?} lacks \"adduser | systemd\" for creating the user"
    );
    assert!(
        !depends.contains('$') && !deps.iter().any(|d| d.starts_with("litestreamd")),
        "Depends {depends:?} is not resolved"
    );

    // Maintainer scripts, hand-written in packaging/debian/.
    // "    3142 bytes,    71 lines   *  postinst   #!/bin/sh": the "*" marks it executable.
    for script in ["postinst", "prerm", "postrm"] {
        assert!(
            info.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.windows(2).any(|w| w == ["*", script])
            }),
            "no executable {script} in the control archive:\n{info}"
        );
    }
    let postinst = dpkg_deb(&["-I", deb, "postinst"]);
    for want in [
        "systemd-sysusers",
        "litestreamd.conf",
        "adduser --system",
        "deb-systemd-helper enable \"$UNIT\"",
    ] {
        assert!(postinst.contains(want), "postinst lacks {want:?}");
    }

    // Every file under /etc is a conffile, and every conffile is in the package.
    let conffiles: BTreeSet<String> = dpkg_deb(&["-I", deb, "conffiles"])
        .lines()
        .map(str::to_owned)
        .collect();
    let etc_files: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.path.starts_with("/etc/") && !e.mode.starts_with('d'))
        .map(|e| e.path.clone())
        .collect();
    assert_eq!(
        conffiles, etc_files,
        "conffiles differ from the files in /etc"
    );
    for want in [
        "/etc/litestreamd/litestreamd.toml",
        "/etc/litestreamd/dbs.d/example.toml.disabled",
    ] {
        assert!(conffiles.contains(want), "{want} is not a conffile");
    }
}

fn check_listing(entries: &[Entry]) {
    for e in entries {
        assert_eq!(e.owner, "0/0", "{} is not owned by root", e.path);
        // Created at run time by systemd (StateDirectory=, RuntimeDirectory=), never shipped.
        assert!(
            !e.path.starts_with("/var") && !e.path.starts_with("/run"),
            "{} should not be in the package",
            e.path
        );
    }
    for (path, mode) in expected_files() {
        let e = entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} is not in the package"));
        assert_eq!(e.mode, mode, "mode of {path}");
    }
    // dbs.d holds no active database file: the daemon reads only *.toml there.
    let dbs: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.path.strip_prefix("/etc/litestreamd/dbs.d/"))
        .collect();
    assert_eq!(dbs, ["example.toml.disabled"], "files in dbs.d");
    // The old /lib/systemd/system spelling, or a stray copy of the units elsewhere.
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.path.ends_with(".service"))
            .count(),
        UNITS.len()
    );
}

/// The unpacked tree has the repository's files, unchanged.
fn check_unpacked_sources(root: &Path) {
    let same = |repo: &str, installed: &str| {
        let a = std::fs::read(Path::new(ROOT).join(repo)).unwrap();
        let b = std::fs::read(root.join(installed.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{installed} in the unpacked package: {e}"));
        assert!(a == b, "{installed} differs from {repo}");
    };
    same(
        "config/litestreamd.toml",
        "/etc/litestreamd/litestreamd.toml",
    );
    for unit in UNITS {
        same(
            &format!("systemd/{unit}"),
            &format!("/usr/lib/systemd/system/{unit}"),
        );
    }
    for example in repo_examples() {
        same(
            &format!("config/examples/{example}"),
            &format!("/usr/share/doc/litestreamd/examples/{example}"),
        );
    }
    let bin = root.join("usr/bin/litestreamd");
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "mode of the unpacked binary");
}

/// The commented example in dbs.d becomes a valid database file once its settings (the lines
/// "#key = …" and "#[[…]]", a "#" without a space) are uncommented.
fn check_dbs_example(root: &Path, bin: &Path, scratch: &Path) {
    let text =
        std::fs::read_to_string(root.join("etc/litestreamd/dbs.d/example.toml.disabled")).unwrap();
    assert!(
        text.lines()
            .all(|l| l.trim().is_empty() || l.starts_with('#')),
        "example.toml.disabled has an uncommented line"
    );
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => "",
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = scratch.join("example-config");
    std::fs::create_dir_all(dir.join("dbs.d")).unwrap();
    std::fs::write(dir.join("dbs.d/app.toml"), uncommented).unwrap();
    // The packaged main file with dbs_dir pointed at the scratch directory.
    let main = std::fs::read_to_string(root.join("etc/litestreamd/litestreamd.toml")).unwrap();
    let main = main.replace("\"/etc/litestreamd/dbs.d\"", "\"dbs.d\"");
    assert!(
        main.contains("dbs_dir = \"dbs.d\""),
        "dbs_dir not found in litestreamd.toml"
    );
    std::fs::write(dir.join("litestreamd.toml"), main).unwrap();
    let out = stdout_of(
        Command::new(bin)
            .args(["config", "check", "--config"])
            .arg(dir.join("litestreamd.toml")),
        "the unpacked binary",
    );
    assert!(
        out.contains("ok     app:") && out.contains("(2 replica(s))"),
        "the uncommented example is not one database with two replicas:\n{out}"
    );
}

/// systemd-sysusers (the version on this machine) accepts the sysusers.d line.
fn check_sysusers(root: &Path, scratch: &Path) {
    let text = std::fs::read_to_string(root.join("usr/lib/sysusers.d/litestreamd.conf")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines, [SYSUSERS_LINE]);
    let empty_root = scratch.join("sysusers-root");
    std::fs::create_dir_all(&empty_root).unwrap();
    let out = output(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", empty_root.display()))
            .args(["--dry-run", "--inline", SYSUSERS_LINE]),
        SYSTEMD_HINT,
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && all.contains("Creating user 'litestreamd'"),
        "systemd-sysusers rejects {SYSUSERS_LINE:?} ({}):\n{all}",
        out.status
    );
}

/// `systemd-analyze verify` on the unpacked units, pointed at the unpacked binary.
fn check_units(root: &Path, bin: &Path, scratch: &Path) {
    let bin = bin.to_str().unwrap();
    assert!(
        !bin.contains(char::is_whitespace),
        "the scratch path {bin:?} contains whitespace, which unit files cannot take unquoted"
    );
    let dir = scratch.join("units");
    std::fs::create_dir_all(&dir).unwrap();
    let old_systemd = systemd_version() < 253;
    for unit in UNITS {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit)).unwrap();
        assert!(
            text.contains(INSTALLED_BIN),
            "{unit} does not run {INSTALLED_BIN}"
        );
        let path = dir.join(unit);
        std::fs::write(&path, text.replace(INSTALLED_BIN, bin)).unwrap();
        let out = systemd_analyze(&["verify", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "systemd-analyze verify {unit} failed ({}):\n{stderr}",
            out.status
        );
        // systemd < 253 does not know Type=notify-reload and says so for the variant; any
        // other line about either unit is a failure.
        let unexpected: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(unit))
            .filter(|l| {
                !(old_systemd
                    && unit == "litestreamd-notify-reload.service"
                    && l.ends_with(": Failed to parse service type, ignoring: notify-reload"))
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "systemd-analyze verify complained about the packaged {unit}:\n{}",
            unexpected.join("\n")
        );
    }
}

/// The subcommands in `litestreamd --help` ("Commands:" up to the next blank line).
fn subcommands(help: &str) -> Vec<String> {
    let subs: Vec<String> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(
        subs.iter().any(|s| s == "run") && subs.iter().any(|s| s == "restore"),
        "cannot find the subcommands in --help:\n{help}"
    );
    subs
}

fn gunzip(path: &Path) -> Vec<u8> {
    let out = output(
        Command::new("gzip").arg("-dc").arg(path),
        "Debian/Ubuntu: apt-get install gzip",
    );
    assert!(out.status.success(), "gzip -dc {} failed", path.display());
    out.stdout
}

/// The man page and completions list every subcommand and are what the binary generates.
fn check_docs(root: &Path, bin: &Path, scratch: &Path) {
    let help = stdout_of(Command::new(bin).arg("--help"), "the unpacked binary");
    assert!(help.contains("Usage: litestreamd"), "--help:\n{help}");
    let subs = subcommands(&help);

    let man_bytes = gunzip(&root.join("usr/share/man/man1/litestreamd.1.gz"));
    let man = String::from_utf8(man_bytes.clone()).expect("the man page is UTF-8");
    assert!(
        man.contains(".TH litestreamd 1"),
        "not a litestreamd(1) page"
    );
    // roff escapes '-' as '\-'; subcommands are listed as "litestreamd-NAME(1)".
    let man_subs: String = man
        .split(".SH SUBCOMMANDS")
        .nth(1)
        .and_then(|rest| rest.split("\n.SH ").next())
        .expect("the man page has no SUBCOMMANDS section")
        .replace("\\-", "-");
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/litestreamd"))
            .unwrap();
    // The top-level completion list: the `opts="…"` line of the "litestreamd)" case.
    let bash_top: Vec<&str> = bash
        .lines()
        .skip_while(|l| l.trim() != "litestreamd)")
        .find_map(|l| l.trim().strip_prefix("opts=\""))
        .expect("no top-level opts in the bash completion")
        .trim_end_matches('"')
        .split_whitespace()
        .collect();
    for sub in &subs {
        assert!(
            man_subs
                .lines()
                .any(|l| l.trim() == format!("litestreamd-{sub}(1)")),
            "the man page does not list subcommand {sub}:\n{man_subs}"
        );
        assert!(
            bash_top.contains(&sub.as_str()) && bash.contains(&format!("litestreamd,{sub})")),
            "the bash completion does not complete subcommand {sub}"
        );
    }

    // Regenerated by the packaged binary: byte for byte what the package holds.
    let fresh = scratch.join("generated");
    let status = Command::new(bin)
        .arg("generate-docs")
        .arg(&fresh)
        .status()
        .unwrap();
    assert!(status.success(), "generate-docs failed");
    for (name, dest) in GENERATED {
        let packaged = if dest.ends_with(".gz") {
            man_bytes.clone()
        } else {
            std::fs::read(root.join(dest.trim_start_matches('/'))).unwrap()
        };
        let generated = std::fs::read(fresh.join(name)).unwrap();
        assert!(
            packaged == generated,
            "{dest} in the package differs from a fresh `litestreamd generate-docs` ({name})"
        );
    }
}

/// Runs each maintainer script with stub commands on PATH that only log their arguments.
fn check_maintainer_scripts(deb: &Path, scratch: &Path) {
    let control = scratch.join("control");
    dpkg_deb(&["-e", deb.to_str().unwrap(), control.to_str().unwrap()]);
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "mode of {script}");
        let out = output(Command::new("/bin/sh").arg("-n").arg(&path), "/bin/sh");
        assert!(
            out.status.success(),
            "{script} does not parse:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // deb-systemd-helper answers as on a fresh system: was-enabled yes (its default for a
    // unit it has never seen), debian-installed no. getent finds no user or group.
    let stubs = |with_sysusers: bool| -> PathBuf {
        let dir = scratch.join(format!("stubs-{with_sysusers}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut names = vec![
            "adduser",
            "getent",
            "deb-systemd-helper",
            "deb-systemd-invoke",
            "systemctl",
        ];
        if with_sysusers {
            names.push("systemd-sysusers");
        }
        for name in names {
            let exit = match name {
                "getent" => "exit 2",
                "deb-systemd-helper" => "case \"$*\" in *debian-installed*) exit 1;; esac; exit 0",
                _ => "exit 0",
            };
            let path = dir.join(name);
            std::fs::write(
                &path,
                format!("#!/bin/sh\necho \"{name} $*\" >> \"$STUB_LOG\"\n{exit}\n"),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    };
    let run = |script: &str, args: &[&str], with_sysusers: bool| -> String {
        let log = scratch.join("stub.log");
        let _ = std::fs::remove_file(&log);
        let out = Command::new("/bin/sh")
            .arg(control.join(script))
            .args(args)
            .env_clear()
            .env("PATH", stubs(with_sysusers))
            .env("STUB_LOG", &log)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script} {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    let never_started = |log: &str, what: &str| {
        assert!(
            !log.lines().any(|l| {
                (l.starts_with("deb-systemd-invoke ") || l.starts_with("systemctl "))
                    && l.split_whitespace().nth(1) == Some("start")
            }),
            "{what} starts the service:\n{log}"
        );
    };

    let fresh = run("postinst", &["configure"], true);
    assert!(
        fresh.contains("systemd-sysusers litestreamd.conf\n"),
        "postinst does not run systemd-sysusers litestreamd.conf:\n{fresh}"
    );
    assert!(
        !fresh.contains("adduser"),
        "postinst ran adduser although systemd-sysusers exists"
    );
    assert!(
        fresh.contains("deb-systemd-helper enable litestreamd.service\n"),
        "postinst does not enable litestreamd.service:\n{fresh}"
    );
    assert!(
        !fresh.contains("enable litestreamd-notify-reload.service"),
        "postinst enables the notify-reload variant next to litestreamd.service:\n{fresh}"
    );
    never_started(&fresh, "postinst configure (fresh install)");

    let fallback = run("postinst", &["configure"], false);
    assert!(
        fallback.lines().any(|l| l.starts_with("adduser --system ")
            && l.contains("--home /var/lib/litestreamd")
            && l.ends_with(" litestreamd")),
        "without systemd-sysusers, postinst does not fall back to adduser:\n{fallback}"
    );

    let upgrade = run("postinst", &["configure", "0.0.1-1"], true);
    never_started(&upgrade, "postinst configure (upgrade)");
    for (script, arg) in [
        ("prerm", "remove"),
        ("postrm", "remove"),
        ("postrm", "purge"),
    ] {
        run(script, &[arg], true);
    }
}

#[test]
fn debian_package() {
    require_tools();
    let deb = build_deb();
    eprintln!("checking {}", deb.display());

    let entries = listing(&deb);
    check_listing(&entries);
    check_control(&deb, &entries);

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("root");
    dpkg_deb(&["-x", deb.to_str().unwrap(), root.to_str().unwrap()]);
    for (path, _) in expected_files() {
        assert!(
            root.join(path.trim_start_matches('/')).is_file(),
            "{path} is missing from the unpacked package"
        );
    }
    let bin = root.join("usr/bin/litestreamd");
    check_unpacked_sources(&root);
    check_dbs_example(&root, &bin, scratch.path());
    check_sysusers(&root, scratch.path());
    check_units(&root, &bin, scratch.path());
    check_docs(&root, &bin, scratch.path());
    check_maintainer_scripts(&deb, scratch.path());
}

/// Every `litestreamd_*` series named in `text` (a metric name followed by anything but a
/// name character).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("litestreamd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The shipped Grafana dashboard and alert rules are well-formed and use only series the
/// daemon exports (no grafana or promtool installs from a registry here, so this is the
/// structural check: the JSON model's required fields, unique panel ids and refIds, a query in
/// every panel, the rules' required fields).
#[test]
fn monitoring_files_are_well_formed_and_name_only_exported_series() {
    let telemetry = std::fs::read_to_string(Path::new(ROOT).join("src/telemetry.rs")).unwrap();
    let exported: BTreeSet<String> = metric_names(&telemetry)
        .into_iter()
        .filter(|n| telemetry.contains(&format!("\"{n}\"")))
        .collect();
    assert!(
        exported.contains("litestreamd_drill_result"),
        "{exported:?}"
    );

    let path = Path::new(ROOT).join("config/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in [
        "uid",
        "title",
        "schemaVersion",
        "panels",
        "templating",
        "time",
    ] {
        assert!(dash.get(key).is_some(), "dashboard lacks {key}");
    }
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut ids = BTreeSet::new();
    let mut drill_panels = 0;
    for p in dash["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "panel {id}: gridPos.{k}");
        }
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel {id} is wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap().to_string()));
            let expr = t["expr"].as_str().unwrap();
            assert!(!metric_names(expr).is_empty(), "panel {id}: {expr}");
            drill_panels += expr.contains("litestreamd_drill_") as usize;
        }
    }
    assert!(drill_panels >= 3, "the dashboard shows drills");
    let used = metric_names(&text);
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard names series the daemon does not export: {unknown:?}"
    );

    let path = Path::new(ROOT).join("config/alerts.yml");
    use figment::providers::Format;
    let rules: serde_json::Value = figment::Figment::from(figment::providers::Yaml::file(&path))
        .extract()
        .unwrap();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().expect("alert name");
            assert!(alerts.insert(name.to_string()), "duplicate alert {name}");
            assert!(r["expr"].is_string(), "{name}: expr");
            assert!(r["labels"]["severity"].is_string(), "{name}: severity");
            assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
        }
    }
    for want in ["LitestreamdDrillFailed", "LitestreamdNoRecentDrill"] {
        assert!(alerts.contains(want), "alerts.yml lacks {want}");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let unknown: Vec<_> = metric_names(&text).difference(&exported).cloned().collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml names series the daemon does not export: {unknown:?}"
    );
}
