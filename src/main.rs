//! The `litestreamd` command line. This is the edge of the program: errors become `anyhow`
//! here, with context, and are printed once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use litestreamd::config::{self, Config};
use litestreamd::control;
use litestreamd::db::DbOptions;
use litestreamd::notify;
use litestreamd::replica::{self, ReplicaClient};
use litestreamd::replicator::ReplicaOptions;
use litestreamd::restore::{self, NamedReplica, RestoreOptions, RestoreOutcome};
use litestreamd::shadow::Shadow;
use litestreamd::status::{DbState, DrillResult, DrillStatus, ReplicaStateName};
use litestreamd::supervisor::Supervisor;
use litestreamd::telemetry;
use litestreamd::worker::DbSpec;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "litestreamd",
    version,
    about = "Streams SQLite databases to object storage (Litestream v0.3 layout) and restores them"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "LITESTREAMD_LOG")]
    log_level: Option<String>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: replicate every configured database; SIGHUP reloads, SIGTERM stops.
    Run {
        #[arg(long, short, env = "LITESTREAMD_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Live dashboard of the running daemon: databases, lag, errors, snapshot/sync now, restores.
    Tui {
        /// The daemon's control socket.
        #[arg(
            long,
            env = "LITESTREAMD_SOCKET",
            default_value = "/run/litestreamd/control.sock"
        )]
        socket: PathBuf,
    },
    /// Convert a Litestream 0.3 litestream.yml into one litestreamd file per database.
    ImportLitestreamConfig {
        /// The Litestream configuration file.
        file: PathBuf,
        /// Where to write NAME.toml files (default: dbs_dir of --config).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Replace existing files.
        #[arg(long)]
        overwrite: bool,
        /// Keep $VAR references; litestreamd expands them when it loads the files.
        #[arg(long)]
        no_expand_env: bool,
        #[arg(long, short, env = "LITESTREAMD_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Write the man page (litestreamd.1) and shell completions (bash, zsh, fish) into DIR.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Status of every database from the running daemon; exits non-zero when a replica is
    /// failing or retrying, or lags more than --max-lag.
    Status {
        /// The daemon's control socket.
        #[arg(
            long,
            env = "LITESTREAMD_SOCKET",
            default_value = "/run/litestreamd/control.sock"
        )]
        socket: PathBuf,
        /// Fail when any replica lags more than this many seconds.
        #[arg(long)]
        max_lag: Option<f64>,
        /// Fail when a replica's last restore drill failed, or none passed within this long
        /// (e.g. `2d`; drills run every `drill_interval`).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_drill_age: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Run a restore drill of a database now (through the daemon): each replica is restored
    /// into the drill directory at a position the daemon knows the database's content at,
    /// checked with `PRAGMA integrity_check` and compared page by page (a checksum) with the
    /// database. Exits 1 when a drill failed, 2 when one could not run.
    Drill {
        /// The database's name (its file in dbs.d without `.toml`).
        db: String,
        #[arg(
            long,
            env = "LITESTREAMD_SOCKET",
            default_value = "/run/litestreamd/control.sock"
        )]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Promote a standby database (`role = "standby"`) to the primary, through the daemon:
    /// apply everything its replica has, take the replica's lease (waiting up to one lease TTL
    /// for the old primary to release it or let it expire), and replicate it in a new
    /// generation. The old primary, if it comes back, finds the lease taken and stops writing
    /// (`conflict`). Update the database's file to `role = "primary"` afterwards.
    Promote {
        /// The database's name (its file in dbs.d without `.toml`).
        db: String,
        /// Take the lease at once, even from a holder that has not let it expire: only when
        /// the old primary is known to be dead or fenced (it stops within 5 s of its next write).
        #[arg(long)]
        force: bool,
        #[arg(
            long,
            env = "LITESTREAMD_SOCKET",
            default_value = "/run/litestreamd/control.sock"
        )]
        socket: PathBuf,
    },
    /// Hand a primary database over to a standby, for a planned move: stop the application
    /// first; then a final sync, every replica uploads everything, the leases are released,
    /// and this daemon stops replicating the database (until a restart or a reload). Then run
    /// `litestreamd promote DB` on the standby: nothing is lost.
    Handoff {
        db: String,
        #[arg(
            long,
            env = "LITESTREAMD_SOCKET",
            default_value = "/run/litestreamd/control.sock"
        )]
        socket: PathBuf,
    },
    /// Replicate one database in the foreground to one or more replica URLs.
    Replicate {
        /// The SQLite database file.
        db: PathBuf,
        /// Replica URLs: file:///dir, s3://bucket/path?endpoint=..&region=..&force-path-style=true, gs://bucket/path.
        #[arg(required = true)]
        urls: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        sync_interval: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        monitor_interval: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        snapshot_interval: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        retention: Duration,
        /// How often retention runs while the database changes (an idle one: only when a
        /// snapshot leaves the window).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        retention_check_interval: Duration,
        /// Lease on each replica path so no second replicator writes there; 0s disables it.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        lease_ttl: Duration,
        /// Never delete or replace an object on the replicas (credentials without delete
        /// permission, S3 Object Lock): retention is the bucket's lifecycle rules', and a
        /// keep-alive snapshot is written every --snapshot-keepalive. --retention is ignored.
        #[arg(long)]
        append_only: bool,
        /// With --append-only: the newest snapshot's greatest age; keep it below the
        /// lifecycle's expiry minus the longest outage you tolerate.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "7d", requires = "append_only")]
        snapshot_keepalive: Duration,
        /// Upper bound for the final sync on SIGTERM/SIGINT.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        shutdown_timeout: Duration,
        #[command(flatten)]
        age: AgeArgs,
    },
    /// Restore a database from a replica, optionally to a point in time.
    Restore(RestoreArgs),
    /// Check that a replica would restore, without writing a database: every generation graded
    /// OK (exit 0), WARNING (1) or FAILURE (2), naming each object at fault; 3 when the replica
    /// could not be read (never graded as damage).
    Verify(VerifyArgs),
    /// Make the database file as it is now the one its replica paths belong to: a new lineage,
    /// its backups the latest from now on (after the application replaced the database with a
    /// new one on purpose). The older backups stay until retention removes them.
    Adopt {
        /// The database's name (or path) in the configuration.
        db: String,
        /// Only this replica (by name).
        #[arg(long)]
        replica: Option<String>,
        #[arg(long, short, env = "LITESTREAMD_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// List the generations of a database's replicas.
    Generations(ListArgs),
    /// List the snapshots of a database's replicas.
    Snapshots(ListArgs),
    /// List the WAL segments of a database's replicas.
    Wal(ListArgs),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the main file and every database file; exits non-zero listing every error.
    Check {
        #[arg(long, short, env = "LITESTREAMD_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct Target {
    /// A database name or path from the configuration, or a replica URL.
    target: String,
    /// Only this replica (by name).
    #[arg(long)]
    replica: Option<String>,
    #[arg(long, short, env = "LITESTREAMD_CONFIG", default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// With a replica URL: an age identity file (`age-keygen` output) to decrypt an encrypted
    /// replica. A configured database uses its replica's `[replicas.age]` instead.
    #[arg(long = "age-identity-file", value_name = "FILE")]
    age_identity_files: Vec<PathBuf>,
}

/// age encryption for `replicate` (X25519 keys, as Litestream 0.3).
#[derive(Args)]
struct AgeArgs {
    /// Encrypt to the recipients in this file (one `age1...` per line); needs an identity too.
    #[arg(long = "age-recipient-file", value_name = "FILE")]
    recipient_files: Vec<PathBuf>,
    /// Decrypt with the identities in this file (`age-keygen` output).
    #[arg(long = "age-identity-file", value_name = "FILE")]
    identity_files: Vec<PathBuf>,
}

impl AgeArgs {
    fn keys(&self) -> Result<Option<litestreamd::crypt::AgeKeys>> {
        config::AgeConfig {
            recipient_files: self.recipient_files.clone(),
            identity_files: self.identity_files.clone(),
            ..Default::default()
        }
        .keys(Path::new("command line"))
        .map_err(anyhow::Error::msg)
    }
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Only this generation (wal, snapshots).
    #[arg(long)]
    generation: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RestoreArgs {
    #[command(flatten)]
    target: Target,
    /// Output path (required with a URL; defaults to the database path).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    #[arg(long)]
    generation: Option<String>,
    /// Restore up to and including this WAL index (hex).
    #[arg(long, value_parser = parse_hex_index, conflicts_with = "timestamp")]
    index: Option<u32>,
    /// Restore to this point in time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    timestamp: Option<SystemTime>,
    /// Exit successfully without restoring if the output exists.
    #[arg(long)]
    if_db_not_exists: bool,
    /// Exit successfully if there is no backup.
    #[arg(long)]
    if_replica_exists: bool,
    /// Concurrent downloads: WAL segments, and ranged GETs of a big object in a bucket (at
    /// most 8, 2 MiB each). Lower it on a small instance: 2 holds ~15 MiB less than 8. 1 reads
    /// every object with one plain GET (for a store whose ranged GETs are slow).
    #[arg(long, default_value_t = 8)]
    parallelism: usize,
    /// Skip `PRAGMA integrity_check` of the result.
    #[arg(long)]
    no_integrity_check: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    target: Target,
    /// Only this generation.
    #[arg(long)]
    generation: Option<String>,
    /// Download and decode objects too: `none` (listings only), `all`, or a percentage
    /// (`10%`: each snapshot and each WAL index drawn with that chance).
    #[arg(long, default_value = "none", value_name = "none|all|N%")]
    read_data: litestreamd::verify::ReadData,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_hex_index(s: &str) -> Result<u32, String> {
    let v = u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|e| format!("invalid hex index {s:?}: {e}"))?;
    if v > litestreamd::layout::MAX_INDEX {
        return Err(format!("index {s} is above the 31-bit maximum"));
    }
    Ok(v)
}

/// glibc gives every thread that allocates its own arena (up to 8 per core), and each keeps its
/// own free memory: the blocking pool's threads took an arena each and RSS grew to ~55 MiB on a
/// load whose working set is a few MiB. Two arenas at most: 25.6 MiB instead of 28.7 (glibc's
/// defaults) at 600 tx/s to a directory, CPU unchanged within the run's noise (`bench/run.sh
/// --only cpu-file --tps 600`, docs/benchmarks.md). The daemon keeps glibc's dynamic mmap
/// threshold: it used to raise the mmap and trim thresholds (8/16 MiB) so that the 4 MiB LZ4
/// buffers of every upload were not faulted in again each second, which kept ~55 MiB resident;
/// uploads now size their LZ4 blocks to the data (`compress::block_for`, at most 1 MiB for a
/// segment) and reuse them from a pool that empties when uploads stop (`compress::encode`). A restore (`restore`) mmaps anything from 32 KiB: what it
/// allocates and frees are the HTTP client's read buffers (tens of KiB each), which in the heap
/// left fragments the kernel never got back (512 MiB shapes from a directory: 65-73 MiB with
/// the old daemon settings, 32-42 with these). Must run before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc(restore: bool) {
    use nix::libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, mallopt};
    // SAFETY: mallopt only sets allocator parameters; no other thread exists yet.
    unsafe {
        if restore {
            mallopt(M_MMAP_THRESHOLD, 32 << 10);
        }
        mallopt(M_ARENA_MAX, 2);
    }
}
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc(_restore: bool) {}

fn main() {
    // Parsing the arguments starts no thread.
    let cli = Cli::parse();
    tune_malloc(matches!(cli.cmd, Command::Restore(_)));
    // The daemon's log settings come from its config file; the CLI flag wins.
    let (level, json) = match &cli.cmd {
        Command::Run { config } => match config::load_main(config) {
            Ok(m) => (
                cli.log_level.clone().unwrap_or(m.log.level),
                m.log.format == "json",
            ),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        // Anything written to stderr would corrupt the dashboard's screen.
        Command::Tui { .. } => (cli.log_level.clone().unwrap_or_else(|| "off".into()), false),
        _ => (
            cli.log_level.clone().unwrap_or_else(|| "info".into()),
            false,
        ),
    };
    init_logging(&level, json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(litestreamd::compress::BLOCKING_THREADS)
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(dispatch(cli.cmd)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run { config } => run(&config).await,
        Command::Config(ConfigCmd::Check { config }) => config_check(&config).await,
        Command::GenerateDocs { dir } => generate_docs(&dir),
        Command::Tui { socket } => Ok(litestreamd::tui::run(socket).await?),
        Command::ImportLitestreamConfig {
            file,
            out_dir,
            overwrite,
            no_expand_env,
            config,
        } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let items = litestreamd::import::convert(&yaml, &file, !no_expand_env)?;
            let out = match out_dir {
                Some(d) => d,
                None => config::load_main(&config)?.dbs_dir,
            };
            for p in litestreamd::import::write_all(&items, &out, overwrite)? {
                println!("wrote {}", p.display());
            }
            println!(
                "next: `litestreamd config check`, make the databases' directories writable for the daemon (ReadWritePaths=), chgrp litestreamd files holding keys, then reload"
            );
            Ok(())
        }
        Command::Status {
            socket,
            max_lag,
            max_drill_age,
            json,
        } => status_cmd(&socket, max_lag, max_drill_age, json).await,
        Command::Drill { db, socket, json } => drill_cmd(&socket, &db, json).await,
        Command::Handoff { db, socket } => {
            let mut client = control::client::Client::connect(&socket).await?;
            println!("{db}: {}", client.handoff(&db).await?);
            Ok(())
        }
        Command::Promote { db, force, socket } => {
            let mut client = control::client::Client::connect(&socket).await?;
            let started = std::time::Instant::now();
            let msg = client.promote(&db, force).await?;
            println!("{db}: {msg} ({:.1}s)", started.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Replicate {
            db,
            urls,
            sync_interval,
            monitor_interval,
            snapshot_interval,
            retention,
            retention_check_interval,
            lease_ttl,
            append_only,
            snapshot_keepalive,
            shutdown_timeout,
            age,
        } => {
            let keys = age.keys()?;
            let mut replicas = Vec::new();
            for url in &urls {
                let mut client =
                    ReplicaClient::new(replica::store_from_url(url).await?).with_age(keys.clone());
                if append_only {
                    client = client.append_only();
                }
                let mut name = client.kind().to_string();
                if replicas
                    .iter()
                    .any(|(o, _): &(ReplicaOptions, ReplicaClient)| o.name == name)
                {
                    name = format!("{name}{}", replicas.len() + 1);
                }
                let opts = ReplicaOptions {
                    name,
                    sync_interval,
                    snapshot_interval,
                    retention,
                    retention_check_interval,
                    lease_ttl,
                    append_only,
                    snapshot_keepalive,
                    ..Default::default()
                };
                replicas.push((opts, client));
            }
            let path = std::path::absolute(&db)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let opts = DbOptions {
                monitor_interval,
                ..Default::default()
            };
            run_specs(
                vec![DbSpec {
                    name,
                    path,
                    opts,
                    replicas,
                    restore_on_start: false,
                    drill: None,
                    standby: None,
                }],
                shutdown_timeout,
            )
            .await
        }
        Command::Restore(a) => restore_cmd(a).await,
        Command::Verify(a) => verify_cmd(a).await,
        Command::Adopt {
            db,
            replica,
            config,
        } => adopt_cmd(&db, replica, &config).await,
        Command::Generations(a) => list_cmd(ListKind::Generations, a).await,
        Command::Snapshots(a) => list_cmd(ListKind::Snapshots, a).await,
        Command::Wal(a) => list_cmd(ListKind::Wal, a).await,
    }
}

/// Raises the soft limit on open files to the hard limit, as Go programs (Litestream among
/// them) do at start: every database holds a few descriptors. The limits are logged.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

/// The daemon: supervisor, signals, systemd notifications, metrics.
async fn run(config_path: &Path) -> Result<()> {
    raise_nofile_limit();
    let main = config::load_main(config_path)?;
    if !main.metrics_addr.is_empty() {
        let addr = telemetry::install(&main.metrics_addr, main.metrics_idle_timeout)?;
        info!(%addr, "serving Prometheus metrics");
    }
    // Handlers before READY=1: SIGHUP's default action would kill the process.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let shutdown = CancellationToken::new();
    let (mut sup, report) = Supervisor::start(config_path, shutdown.clone())?;
    let (reload_tx, mut reload_rx) =
        tokio::sync::mpsc::channel::<control::server::ReloadRequest>(4);
    let policy: control::server::SharedPolicy = std::sync::Arc::new(std::sync::RwLock::new(
        control::server::RestorePolicy::from_config(sup.main_config()),
    ));
    // The control socket serves status and the dashboard; replication does not depend on it, so
    // a socket that cannot be created is reported and the daemon goes on without it.
    let control_task = if main.control_socket.as_os_str().is_empty() {
        None
    } else {
        let mode = u32::from_str_radix(main.control_mode.trim_start_matches("0o"), 8)
            .with_context(|| {
                format!("control_mode {:?} is not an octal mode", main.control_mode)
            })?;
        if let Some(dir) = main
            .control_socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            let _ = std::fs::create_dir_all(dir);
        }
        if main.restore_dirs.is_empty() {
            control::server::ensure_restore_dir(
                &main.default_restore_dir(),
                main.control_group.as_deref(),
            );
        }
        match control::server::serve(
            control::server::Settings {
                path: main.control_socket.clone(),
                mode,
                group: main.control_group.clone(),
                max_connections: main.control_max_connections,
                idle_timeout: main.control_idle_timeout,
            },
            sup.registry(),
            policy.clone(),
            reload_tx,
            shutdown.clone(),
        ) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "control socket unavailable; `litestreamd status` and `litestreamd tui` will not work");
                None
            }
        }
    };
    info!(
        databases = report.added.len(),
        errors = report.errors.len(),
        "configuration loaded"
    );
    match wait_for_restores(&mut sup, &mut term, &mut int).await {
        Ok(true) => {}
        Ok(false) => {
            notify::stopping();
            sup.shutdown(|| notify::extend_timeout(Duration::from_secs(5)))
                .await;
            return Ok(());
        }
        Err(e) => {
            notify::stopping();
            sup.shutdown(|| notify::extend_timeout(Duration::from_secs(5)))
                .await;
            return Err(e);
        }
    }
    let mut status = sup.summary();
    notify::ready(&status);

    let watchdog = notify::watchdog_interval().map(|d| d / 2);
    let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Every branch returns quickly (the supervisor never waits on a worker here), so the
    // watchdog ping below is never held up, whatever a reload or a dead store does.
    loop {
        tokio::select! {
            Some(reply) = reload_rx.recv() => {
                info!("reload requested over the control socket");
                let r = reload(&mut sup, &policy);
                status = sup.summary();
                let _ = reply.send(r);
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading configuration");
                reload(&mut sup, &policy);
                status = sup.summary();
            }
            p = sup.next_prepared() => sup.start_prepared(p),
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = tick.tick() => {
                sup.check_workers();
                let s = sup.summary();
                if s != status {
                    notify::status(&s);
                    status = s;
                }
            }
            // The ping comes from this loop, so a stuck supervisor stops pinging.
            _ = ping.tick(), if watchdog.is_some() => notify::watchdog(),
        }
    }
    notify::stopping();
    let stopped = sup
        .shutdown(|| notify::extend_timeout(Duration::from_secs(5)))
        .await;
    if let Some(t) = control_task {
        let _ = t.await;
    }
    if !stopped {
        bail!("the final sync did not finish within shutdown_timeout");
    }
    info!("stopped; every database had its final sync");
    Ok(())
}

/// A reload (SIGHUP or the control socket, the same path): RELOADING=1 with MONOTONIC_USEC,
/// the supervisor's diff applied (quick: stops and starts go on in the background), the
/// restore policy refreshed, READY=1 with the new status.
fn reload(
    sup: &mut Supervisor,
    policy: &control::server::SharedPolicy,
) -> litestreamd::supervisor::ReloadReport {
    notify::reloading();
    let r = sup.reload();
    *policy.write().expect("policy") =
        control::server::RestorePolicy::from_config(sup.main_config());
    info!(added = ?r.added, removed = ?r.removed, restarted = ?r.restarted, unchanged = r.unchanged.len(), errors = r.errors.len(), "reload done");
    notify::ready(&sup.summary());
    r
}

/// `restore_on_start`: READY=1 waits until every database that needed a restore has it, or
/// every replica answered that there is no backup, and every database is prepared; meanwhile
/// (and when preparing takes over 5 s) systemd's start timeout is extended and STATUS= says
/// what is awaited. A database whose `restore_on_start_timeout`
/// passes fails the start (an error, exit status 1). Returns false on SIGTERM/SIGINT.
async fn wait_for_restores(
    sup: &mut Supervisor,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Result<bool> {
    let mut last_extend: Option<std::time::Instant> = None;
    let begun = std::time::Instant::now();
    loop {
        let restoring = sup.restoring();
        if restoring.is_empty() && sup.starting() == 0 {
            return Ok(true);
        }
        if let Some(r) = restoring
            .iter()
            .find(|r| r.timeout.is_some_and(|t| r.elapsed >= t))
        {
            tracing::error!(db = %r.name, "restore_on_start gave up; failing the start");
            bail!(
                "restore_on_start of {} gave up after {} (restore_on_start_timeout): {}",
                r.name,
                humantime::format_duration(Duration::from_secs(r.elapsed.as_secs())),
                r.last_error.as_deref().unwrap_or("no restore finished")
            );
        }
        // A long start (restores, or thousands of databases to prepare) keeps extending
        // systemd's start timeout while it makes progress.
        let long = !restoring.is_empty() || begun.elapsed() >= Duration::from_secs(5);
        if long && last_extend.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            notify::extend_timeout(Duration::from_secs(15));
            if restoring.is_empty() {
                notify::status(&format!(
                    "starting: {} databases to prepare",
                    sup.starting()
                ));
            } else {
                let names: Vec<String> = restoring
                    .iter()
                    .map(|r| match &r.last_error {
                        Some(e) => format!("{} ({e})", r.name),
                        None => r.name.clone(),
                    })
                    .collect();
                notify::status(&format!("restoring before start: {}", names.join("; ")));
            }
            last_extend = Some(std::time::Instant::now());
        }
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM while starting: stopping"); return Ok(false); }
            _ = int.recv() => { info!("SIGINT while starting: stopping"); return Ok(false); }
            p = sup.next_prepared() => {
                // Every preparation that is done, at once: the checks above walk all workers.
                sup.start_prepared(p);
                while let Some(p) = sup.try_next_prepared() {
                    sup.start_prepared(p);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        sup.check_workers();
    }
}

async fn drill_cmd(socket: &Path, db: &str, json: bool) -> Result<()> {
    let mut client = control::client::Client::connect(socket).await?;
    let st = client
        .status()
        .await?
        .into_iter()
        .find(|d| d.name == db)
        .ok_or_else(|| anyhow::anyhow!("no database named {db:?}"))?;
    let results = client.drill(db).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    let mut worst = DrillResult::Passed;
    for (r, d) in st.replicas.iter().zip(&results) {
        if !json {
            println!(
                "{db}/{}: {} in {:.1}s at {}{}",
                r.name,
                d.result.as_str(),
                d.duration_seconds,
                d.pos.as_ref().map_or("-".to_string(), |p| p.to_string()),
                d.reason
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
        }
        worst = match (worst, d.result) {
            (DrillResult::Failed, _) | (_, DrillResult::Failed) => DrillResult::Failed,
            (DrillResult::Error, _) | (_, DrillResult::Error) => DrillResult::Error,
            _ => DrillResult::Passed,
        };
    }
    match worst {
        DrillResult::Passed => Ok(()),
        DrillResult::Failed => std::process::exit(1),
        DrillResult::Error => std::process::exit(2),
    }
}

async fn status_cmd(
    socket: &Path,
    max_lag: Option<f64>,
    max_drill_age: Option<std::time::Duration>,
    json: bool,
) -> Result<()> {
    let mut client = control::client::Client::connect(socket).await?;
    let dbs = client.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dbs)?);
    } else {
        println!(
            "{:<20} {:<12} {:<28} {:<10} {:<10} {:>9} {:>12}  {:<12} error",
            "database", "state", "position", "replica", "state", "lag (s)", "lag (bytes)", "drill"
        );
        for d in &dbs {
            let pos = d
                .pos
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into());
            for (i, r) in d.replicas.iter().enumerate() {
                let (name, state, pos) = if i == 0 {
                    (d.name.as_str(), d.shown_state(), pos.as_str())
                } else {
                    ("", "", "")
                };
                let err = r
                    .last_error
                    .as_deref()
                    .filter(|_| r.state.name() != ReplicaStateName::Healthy)
                    .or(r.retention_error.as_deref())
                    .unwrap_or("");
                let drill = match (&d.drill, &r.drill) {
                    (Some(run), _) if run.replica.as_deref().is_none_or(|n| n == r.name) => {
                        format!("{}…", run.stage)
                    }
                    (_, Some(dr)) => format!(
                        "{} {}",
                        dr.result.as_str(),
                        litestreamd::tui::view::fmt_age(
                            std::time::SystemTime::now(),
                            dr.finished_at
                        )
                    ),
                    _ => "-".into(),
                };
                let err = match r.drill.as_ref().filter(|d| d.result != DrillResult::Passed) {
                    Some(dr) if err.is_empty() => dr.reason.as_deref().unwrap_or(""),
                    _ => err,
                };
                println!(
                    "{name:<20} {state:<12} {pos:<28} {:<10} {:<10} {:>9.1} {:>12}  {drill:<12} {err}",
                    r.name,
                    r.state_name(),
                    r.lag_seconds,
                    r.lag_bytes
                );
            }
        }
    }
    let mut problems = Vec::new();
    for d in &dbs {
        if matches!(d.state, DbState::Error | DbState::Restoring) {
            problems.push(format!(
                "{}: {}{}",
                d.name,
                d.state,
                d.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        for r in &d.replicas {
            if r.state.name().is_problem() {
                problems.push(format!("{}/{}: {}", d.name, r.name, r.state_name()));
            }
            if max_lag.is_some_and(|m| r.lag_seconds > m) {
                problems.push(format!("{}/{}: lag {:.1}s", d.name, r.name, r.lag_seconds));
            }
            if let Some(p) = DrillStatus::problem(r.drill.as_ref(), max_drill_age) {
                problems.push(format!("{}/{}: {p}", d.name, r.name));
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// Man page and completions straight from the clap definitions, so they always match.
fn generate_docs(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(dir.join("litestreamd.1"), page)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "litestreamd.bash"),
        (clap_complete::Shell::Zsh, "_litestreamd"),
        (clap_complete::Shell::Fish, "litestreamd.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "litestreamd", &mut out);
        std::fs::write(dir.join(file), out)?;
    }
    Ok(())
}

async fn config_check(path: &Path) -> Result<()> {
    let cfg = Config::load(path).with_context(|| format!("loading {}", path.display()))?;
    for w in &cfg.warnings {
        println!("warning {w}");
    }
    for (name, db) in &cfg.dbs {
        println!(
            "ok     {name}: {} ({} replica(s))",
            db.path.display(),
            db.replicas.len()
        );
    }
    let mut count = 0;
    for errs in cfg.errors.values() {
        for e in errs {
            println!("error  {e}");
            count += 1;
        }
    }
    if !cfg.errors.is_empty() {
        bail!(
            "{count} error(s) in {} database file(s) in {}",
            cfg.errors.len(),
            cfg.main.dbs_dir.display()
        );
    }
    println!("configuration ok: {} database(s)", cfg.dbs.len());
    Ok(())
}

/// `replicate`: the workers under a supervisor (the daemon's bounded, parallel final sync)
/// until SIGINT/SIGTERM. A worker that dies ends the command with an error (nothing restarts
/// it here: whatever runs the command, systemd or a container, does).
async fn run_specs(specs: Vec<DbSpec>, shutdown_timeout: Duration) -> Result<()> {
    let shutdown = CancellationToken::new();
    for spec in &specs {
        info!(db = %spec.name, path = %spec.path.display(), replicas = spec.replicas.len(), "starting worker");
    }
    let mut sup = Supervisor::for_specs(specs, shutdown_timeout, shutdown.clone());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let died = loop {
        tokio::select! {
            _ = int.recv() => { info!("SIGINT received; final sync"); break None; }
            _ = term.recv() => { info!("SIGTERM received; final sync"); break None; }
            _ = tick.tick() => {
                let dead = sup.check_workers();
                if !dead.is_empty() {
                    break Some(dead);
                }
            }
        }
    };
    let stopped = sup.shutdown(|| {}).await;
    if let Some(dead) = died {
        bail!(
            "a database worker stopped unexpectedly: {}",
            dead.join(", ")
        );
    }
    if !stopped {
        bail!(
            "the final sync did not finish within {}",
            humantime::format_duration(shutdown_timeout)
        );
    }
    Ok(())
}

/// The replicas a command works on: from a URL, or from the configured database.
async fn resolve_target(t: &Target) -> Result<(Vec<NamedReplica>, Option<DbSpec>)> {
    if replica::is_url(&t.target) {
        let keys = AgeArgs {
            recipient_files: Vec::new(),
            identity_files: t.age_identity_files.clone(),
        }
        .keys()?;
        let client = ReplicaClient::new(replica::store_from_url(&t.target).await?).with_age(keys);
        return Ok((vec![(client.kind().to_string(), client)], None));
    }
    let cfg = Config::load(&t.config).with_context(|| format!("loading {}", t.config.display()))?;
    let (name, db) = cfg.find(&t.target).with_context(|| {
        format!(
            "database {:?} is not in the configuration {}",
            t.target,
            t.config.display()
        )
    })?;
    let spec = cfg.resolve(&name, db).await?;
    let replicas: Vec<NamedReplica> = spec
        .replicas
        .iter()
        .filter(|(o, _)| t.replica.as_ref().is_none_or(|r| *r == o.name))
        .map(|(o, c)| (o.name.clone(), c.clone()))
        .collect();
    if replicas.is_empty() {
        bail!(
            "database {name} has no replica named {:?}",
            t.replica.as_deref().unwrap_or("")
        );
    }
    Ok((replicas, Some(spec)))
}

/// Exits with the worst grade of all replicas (0, 1, 2), or 3 when one could not be read.
async fn verify_cmd(a: VerifyArgs) -> Result<()> {
    use litestreamd::verify::{self, Grade, VerifyOptions};
    let (replicas, _) = resolve_target(&a.target).await?;
    let opts = VerifyOptions {
        generation: a.generation.clone(),
        read_data: a.read_data,
        ..Default::default()
    };
    let (mut reports, mut errors) = (Vec::new(), Vec::new());
    for (name, client) in &replicas {
        match verify::verify(name, client, &opts).await {
            Ok(r) => reports.push(r),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let worst = reports.iter().map(|r| r.grade).max().unwrap_or(Grade::Ok);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "grade": worst, "replicas": reports, "errors": errors,
            }))?
        );
    } else {
        for r in &reports {
            println!("replica {} ({}): {}", r.replica, r.url, r.grade.as_str());
            for g in &r.generations {
                let span = match (g.newest_snapshot, g.newest_index) {
                    (Some(s), Some(i)) => format!("snapshot {s:08x} .. index {i:08x}"),
                    (Some(s), None) => format!("snapshot {s:08x}"),
                    _ => "no snapshot".into(),
                };
                println!(
                    "  generation {}  {:<7}  {span}; {} snapshot(s), {} segment(s); read {} object(s), {} bytes",
                    g.generation,
                    g.grade.as_str(),
                    g.snapshots,
                    g.segments,
                    g.objects_read,
                    g.bytes_read
                );
                for f in &g.findings {
                    match &f.object {
                        Some(o) => println!("    {}: {o}: {}", f.grade.as_str(), f.message),
                        None => println!("    {}: {}", f.grade.as_str(), f.message),
                    }
                }
            }
        }
        for e in &errors {
            eprintln!("error: {e}");
        }
    }
    // A proven failure outranks a replica that could not be read.
    let code = if worst == Grade::Failure || errors.is_empty() {
        worst.exit_code()
    } else {
        3
    };
    std::process::exit(code);
}

async fn restore_cmd(a: RestoreArgs) -> Result<()> {
    let (replicas, spec) = resolve_target(&a.target).await?;
    let output = match (a.output, &spec) {
        (Some(o), _) => o,
        (None, Some(s)) => s.path.clone(),
        (None, None) => bail!("-o/--output is required when restoring from a URL"),
    };
    let mut opts = RestoreOptions::new(&output);
    if let Some(spec) = &spec {
        // A configured database: never another database's backups, and a restore to its own
        // path continues the lineage it restored.
        let shadow = Shadow::for_db(&spec.path, spec.opts.meta_path.as_deref());
        opts.expect_lineage = litestreamd::db::Db::new(&spec.path, spec.opts.clone())
            .lineage()
            .ok()
            .flatten();
        if std::path::absolute(&output).ok() == Some(spec.path.clone()) {
            opts.record_lineage = Some(shadow);
        }
    }
    opts.generation = a.generation;
    opts.index = a.index;
    opts.timestamp = a.timestamp;
    opts.parallelism = a.parallelism.max(1);
    opts.integrity_check = !a.no_integrity_check;
    opts.if_db_not_exists = a.if_db_not_exists;
    opts.if_replica_exists = a.if_replica_exists;
    let outcome = restore::restore(&replicas, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if let RestoreOutcome::Restored(s) = &outcome {
        match &s.lineage {
            Some(o) => println!("replica path {}", o.describe()),
            None => println!(
                "replica path without an owner record (lineage unknown: written by Litestream or an older litestreamd)"
            ),
        }
        for m in &s.moved_aside {
            println!(
                "moved aside {} (a stale file beside the output)",
                m.display()
            );
        }
        println!(
            "restored {} from {} generation {} (snapshot {:08x}, WAL up to {:08x}, {} segments, {} bytes{})",
            s.output.display(),
            s.replica,
            s.generation,
            s.snapshot_index,
            s.max_index,
            s.segments,
            s.bytes,
            if s.integrity_checked {
                ", integrity ok"
            } else {
                ""
            }
        );
    }
    Ok(())
}

async fn adopt_cmd(db: &str, replica: Option<String>, config: &Path) -> Result<()> {
    use litestreamd::lineage;
    let (replicas, spec) = resolve_target(&Target {
        target: db.to_string(),
        replica,
        config: config.to_path_buf(),
        age_identity_files: Vec::new(),
    })
    .await?;
    let spec = spec.with_context(|| format!("{db}: adopt needs a configured database"))?;
    // A new lineage for the file as it is now; the running daemon reads it at its next attempt.
    let l = lineage::new_lineage();
    Shadow::for_db(&spec.path, spec.opts.meta_path.as_deref()).set_lineage(&l)?;
    let owner = lineage::Owner::new(&l, &spec.path.display().to_string());
    for (name, client) in &replicas {
        let cond = match lineage::read(client.store()).await? {
            Some((old, version)) => {
                println!("{name}: was {}", old.describe());
                litestreamd::replica::Precondition::Version(version)
            }
            None => litestreamd::replica::Precondition::Absent,
        };
        if !lineage::claim(client.store(), &owner, &cond).await? {
            bail!("{name}: the owner record changed while it was replaced; run adopt again");
        }
        println!(
            "{name}: {} now belongs to {}",
            client.url(),
            owner.describe()
        );
    }
    Ok(())
}

enum ListKind {
    Generations,
    Snapshots,
    Wal,
}

fn ts(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn list_cmd(kind: ListKind, a: ListArgs) -> Result<()> {
    let (replicas, _) = resolve_target(&a.target).await?;
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for (name, client) in &replicas {
        let gens = client.generations().await?;
        for g in gens {
            if a.generation.as_ref().is_some_and(|w| *w != g) {
                continue;
            }
            let snaps = client.snapshots(&g).await?;
            let segs = client.wal_segments(&g).await?;
            match kind {
                ListKind::Generations => {
                    let times = snaps
                        .iter()
                        .map(|s| s.created_at)
                        .chain(segs.iter().map(|s| s.created_at));
                    let (Some(start), Some(end)) = (times.clone().min(), times.max()) else {
                        continue;
                    };
                    let lag = SystemTime::now().duration_since(end).unwrap_or_default();
                    rows.push(serde_json::json!({
                        "name": name, "generation": g,
                        "lag": humantime::format_duration(Duration::from_secs(lag.as_secs())).to_string(),
                        "start": ts(start), "end": ts(end),
                    }));
                }
                ListKind::Snapshots => {
                    for s in snaps {
                        rows.push(serde_json::json!({
                            "replica": name, "generation": g, "index": s.index,
                            "size": s.size, "created": ts(s.created_at),
                        }));
                    }
                }
                ListKind::Wal => {
                    for s in segs {
                        rows.push(serde_json::json!({
                            "replica": name, "generation": g, "index": s.index, "offset": s.offset,
                            "size": s.size, "created": ts(s.created_at),
                        }));
                    }
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cols: &[&str] = match kind {
        ListKind::Generations => &["name", "generation", "lag", "start", "end"],
        ListKind::Snapshots => &["replica", "generation", "index", "size", "created"],
        ListKind::Wal => &[
            "replica",
            "generation",
            "index",
            "offset",
            "size",
            "created",
        ],
    };
    let cell = |r: &serde_json::Value, c: &str| match (&r[c], c) {
        (serde_json::Value::Number(n), "index") => format!("{:08x}", n.as_u64().unwrap_or(0)),
        (serde_json::Value::Number(n), "offset") => format!("{:08x}", n.as_u64().unwrap_or(0)),
        (serde_json::Value::String(s), _) => s.clone(),
        (v, _) => v.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(cols.iter().map(|c| c.to_string()).collect()));
    for r in &rows {
        println!("{}", line(cols.iter().map(|c| cell(r, c)).collect()));
    }
    let _ = Arc::new(());
    Ok(())
}
