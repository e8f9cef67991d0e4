//! `litestreamd tui`: a dashboard attached to the daemon's control socket.
//!
//! * [`state`]: the model and its reducers (no I/O);
//! * [`view`]: renders the model into a frame;
//! * [`input`]: keys to actions;
//! * this module: terminal setup and teardown (also on panic), and the event loop. One task
//!   holds the subscription and reconnects every second; snapshot, sync, detail and restore
//!   requests each use their own short connection, so a long restore never delays the live
//!   status; keys come from a thread polling crossterm; a one-second tick refreshes ages.

pub mod input;
pub mod state;
pub mod view;

use std::io::{self, IsTerminal, Stdout};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use thiserror::Error;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::control::client::{Client, ClientError};
use crate::control::protocol::{Body, Command, ErrorCode, RestoreRequest};
use state::{ActionKind, ConnFailure, Effect, Msg, State};

/// How long to wait between connection attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum TuiError {
    #[error("the dashboard needs a terminal: run `litestreamd tui` interactively")]
    NotATerminal,
    #[error("terminal: {0}")]
    Terminal(#[from] io::Error),
    #[error("the dashboard panicked (the message is printed above)")]
    Panicked,
}

/// Set while the terminal is in raw mode on the alternate screen.
static TERMINAL_ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set by the panic hook, so the event loop stops instead of drawing on a restored terminal.
static PANICKED: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

/// Leaves the alternate screen and raw mode, if they are on. Safe to call more than once.
fn restore_terminal() {
    if TERMINAL_ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(
            io::stdout(),
            LeaveAlternateScreen,
            ratatui::crossterm::cursor::Show
        );
    }
}

/// A panic anywhere (the event loop, the connection task, the input thread) first gives the
/// terminal back, then prints the panic as usual.
fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Restores the terminal when dropped: on return, on error, and while unwinding.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn setup_terminal() -> Result<(Terminal<CrosstermBackend<Stdout>>, TerminalGuard), TuiError> {
    install_panic_hook();
    enable_raw_mode()?;
    TERMINAL_ACTIVE.store(true, Ordering::SeqCst);
    let guard = TerminalGuard;
    execute!(io::stdout(), EnterAlternateScreen)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.hide_cursor()?;
    terminal.clear()?;
    Ok((terminal, guard))
}

/// Runs the dashboard against the daemon at `socket` until the user quits.
pub async fn run(socket: PathBuf) -> Result<(), TuiError> {
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        return Err(TuiError::NotATerminal);
    }
    let (mut terminal, _guard) = setup_terminal()?;

    let (msg_tx, mut msg_rx) = unbounded_channel::<Msg>();
    let conn = tokio::spawn(subscription(socket.clone(), msg_tx.clone()));

    let stop = Arc::new(AtomicBool::new(false));
    let (key_tx, mut key_rx) = unbounded_channel::<io::Result<Event>>();
    let input_thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tui-input".into())
            .spawn(move || read_input(key_tx, stop))?
    };

    let mut state = State::new(socket.clone(), SystemTime::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    let result = loop {
        if PANICKED.load(Ordering::SeqCst) {
            break Err(TuiError::Panicked);
        }
        if dirty {
            if let Err(e) = terminal.draw(|f| view::draw(f, &state)) {
                break Err(e.into());
            }
            dirty = false;
        }
        let effects = tokio::select! {
            biased;
            ev = key_rx.recv() => match ev {
                Some(Ok(Event::Key(key))) => {
                    state.now = SystemTime::now();
                    dirty = true;
                    match input::map_key(key, state.mode()) {
                        Some(a) => state.handle(a),
                        None => Vec::new(),
                    }
                }
                Some(Ok(Event::Resize(..))) => {
                    dirty = true;
                    Vec::new()
                }
                Some(Ok(_)) => Vec::new(),
                Some(Err(e)) => break Err(e.into()),
                None => break Err(TuiError::Panicked),
            },
            msg = msg_rx.recv() => {
                state.now = SystemTime::now();
                dirty = true;
                let mut effects = Vec::new();
                let mut next = msg;
                // Drain what is queued, then draw once.
                while let Some(m) = next {
                    effects.extend(state.apply(m));
                    next = msg_rx.try_recv().ok();
                }
                effects
            }
            _ = tick.tick() => {
                dirty = true;
                state.tick(SystemTime::now())
            }
        };
        for e in effects {
            match e {
                Effect::Quit => {}
                Effect::FetchDetail(db) => spawn_detail(&socket, db, &msg_tx),
                Effect::Snapshot(db) => spawn_action(&socket, ActionKind::Snapshot, db, &msg_tx),
                Effect::Sync(db) => spawn_action(&socket, ActionKind::Sync, db, &msg_tx),
                Effect::Drill(db) => spawn_action(&socket, ActionKind::Drill, db, &msg_tx),
                Effect::Verify(db) => spawn_action(&socket, ActionKind::Verify, db, &msg_tx),
                Effect::Promote(db) => spawn_action(&socket, ActionKind::Promote, db, &msg_tx),
                Effect::Restore(req) => spawn_restore(&socket, req, &msg_tx),
            }
        }
        if state.quit {
            break Ok(());
        }
    };
    stop.store(true, Ordering::SeqCst);
    conn.abort();
    drop(terminal);
    restore_terminal();
    let _ = input_thread.join();
    result
}

/// Reads terminal events on a plain thread (crossterm's async stream needs a feature this
/// build does not enable) and hands them to the event loop.
fn read_input(tx: UnboundedSender<io::Result<Event>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match event::poll(Duration::from_millis(100)) {
            Ok(false) => {}
            Ok(true) => {
                let ev = event::read();
                let failed = ev.is_err();
                if tx.send(ev).is_err() || failed {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

pub fn classify(e: &ClientError) -> ConnFailure {
    match e {
        ClientError::SocketMissing(_) => ConnFailure::SocketMissing,
        ClientError::AccessDenied(_) => ConnFailure::AccessDenied,
        ClientError::Remote {
            code: ErrorCode::AccessDenied,
            ..
        } => ConnFailure::AccessDenied,
        ClientError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            ConnFailure::AccessDenied
        }
        other => ConnFailure::Other(other.to_string()),
    }
}

/// The subscription: connect, subscribe, forward pushes; on any failure report it and retry
/// every second. Ends when the event loop is gone.
async fn subscription(socket: PathBuf, tx: UnboundedSender<Msg>) {
    loop {
        let failure = match subscribe_once(&socket, &tx).await {
            Ok(()) => return, // the receiver is gone
            Err(f) => f,
        };
        if tx.send(Msg::ConnFailed(failure)).is_err() {
            return;
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

async fn subscribe_once(socket: &Path, tx: &UnboundedSender<Msg>) -> Result<(), ConnFailure> {
    let mut client = Client::connect(socket).await.map_err(|e| classify(&e))?;
    let id = client
        .send(Command::Subscribe)
        .await
        .map_err(|e| classify(&e))?;
    loop {
        let resp = client.next().await.map_err(|e| classify(&e))?;
        let msg = match resp.body {
            Body::Status { databases } => Msg::Status(databases),
            Body::Event { level, db, message } => Msg::Event { level, db, message },
            Body::Error { code, message } if resp.id == id || resp.id == 0 => {
                return Err(match code {
                    ErrorCode::AccessDenied => ConnFailure::AccessDenied,
                    _ => ConnFailure::Other(format!("subscribe refused: {message}")),
                });
            }
            _ => continue,
        };
        if tx.send(msg).is_err() {
            return Ok(());
        }
    }
}

fn remote_error(e: ClientError) -> String {
    match e {
        ClientError::Remote { message, .. } => message,
        other => other.to_string(),
    }
}

async fn one_call(socket: &Path, cmd: Command) -> Result<serde_json::Value, String> {
    let mut c = Client::connect(socket).await.map_err(remote_error)?;
    c.call(cmd, |_| {}).await.map_err(remote_error)
}

fn spawn_detail(socket: &Path, db: String, tx: &UnboundedSender<Msg>) {
    let (socket, tx) = (socket.to_path_buf(), tx.clone());
    tokio::spawn(async move {
        let result = one_call(&socket, Command::Detail { db: db.clone() })
            .await
            .and_then(|v| serde_json::from_value(v).map_err(|e| format!("bad detail reply: {e}")));
        let _ = tx.send(Msg::Detail {
            db,
            result: Box::new(result),
        });
    });
}

fn spawn_action(socket: &Path, action: ActionKind, db: String, tx: &UnboundedSender<Msg>) {
    let (socket, tx) = (socket.to_path_buf(), tx.clone());
    tokio::spawn(async move {
        let cmd = match action {
            ActionKind::Snapshot => Command::Snapshot { db: db.clone() },
            ActionKind::Sync => Command::Sync { db: db.clone() },
            ActionKind::Drill => Command::Drill { db: db.clone() },
            ActionKind::Promote => Command::Promote {
                db: db.clone(),
                force: false,
            },
            ActionKind::Verify => Command::Verify(crate::control::protocol::VerifyRequest {
                db: db.clone(),
                replica: None,
                generation: None,
                read_data: None,
            }),
        };
        let result = one_call(&socket, cmd).await;
        let _ = tx.send(Msg::ActionDone { action, db, result });
    });
}

fn spawn_restore(socket: &Path, req: RestoreRequest, tx: &UnboundedSender<Msg>) {
    let (socket, tx) = (socket.to_path_buf(), tx.clone());
    tokio::spawn(async move {
        // The daemon refuses an existing output too; checking here says so before any work.
        if std::fs::symlink_metadata(&req.output).is_ok() {
            let _ = tx.send(Msg::RestoreDone(Err(format!(
                "{} already exists; choose a new file",
                req.output.display()
            ))));
            return;
        }
        let result = async {
            let mut c = Client::connect(&socket).await.map_err(remote_error)?;
            let progress = tx.clone();
            c.restore(req, move |b| {
                if let Body::Progress { stage, done, total } = b {
                    let _ = progress.send(Msg::RestoreProgress {
                        stage: stage.clone(),
                        done: *done,
                        total: *total,
                    });
                }
            })
            .await
            .map_err(remote_error)
        }
        .await;
        let _ = tx.send(Msg::RestoreDone(result));
    });
}

#[cfg(test)]
mod tests;
