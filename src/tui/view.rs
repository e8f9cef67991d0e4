//! Rendering: a pure function of [`State`] into a [`Frame`]. Layout, top to bottom: header,
//! connection banner (only when not connected), database table, detail pane (toggled), event
//! log, key hints; the restore dialog and the help are drawn over it.

use std::time::{Duration, SystemTime};

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Block, BorderType, Borders, Cell, Clear, Gauge, HighlightSpacing, Paragraph, Row, Table,
    TableState, Wrap,
};

use super::input::{BINDINGS, DIALOG_BINDINGS, Mode};
use super::state::{
    Conn, ConnFailure, Field, Health, Level, Phase, RestoreDialog, State, Target, db_health,
    db_state_health, replica_health,
};
use crate::status::{DbStatus, ReplicaState, ReplicaStatus};

pub fn draw(f: &mut Frame, state: &State) {
    let area = f.area();
    if area.width < 40 || area.height < 12 {
        f.render_widget(
            Paragraph::new("terminal too small for the dashboard (at least 40x12)")
                .wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let banner = banner_text(state);
    let banner_h = banner
        .as_ref()
        .map(|(t, _)| (t.chars().count() as u16).div_ceil(area.width).clamp(1, 3))
        .unwrap_or(0);
    let log_h = if area.height >= 36 { 9 } else { 6 };
    let [header, banner_area, body, log, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(banner_h),
        Constraint::Min(5),
        Constraint::Length(log_h),
        Constraint::Length(1),
    ])
    .areas(area);

    draw_header(f, header, state);
    if let Some((text, style)) = banner {
        f.render_widget(
            Paragraph::new(text).style(style).wrap(Wrap { trim: true }),
            banner_area,
        );
    }
    if state.show_detail {
        let [table, detail] =
            Layout::vertical([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(body);
        draw_table(f, table, state);
        draw_detail(f, detail, state);
    } else {
        draw_table(f, body, state);
    }
    draw_log(f, log, state);
    draw_footer(f, footer, state);
    if let Some(d) = &state.dialog {
        draw_dialog(f, area, state, d);
    }
    if state.help {
        draw_help(f, area, state);
    }
}

// ---------------------------------------------------------------------------------------------
// Formatting

pub fn health_style(h: Health) -> Style {
    match h {
        Health::Ok => Style::new().fg(Color::Green),
        Health::Idle => Style::new().fg(Color::DarkGray),
        Health::Warn => Style::new().fg(Color::Yellow),
        Health::Bad => Style::new().fg(Color::Red),
    }
}

fn level_style(l: Level) -> Style {
    match l {
        Level::Info => Style::new(),
        Level::Warn => Style::new().fg(Color::Yellow),
        Level::Error => Style::new().fg(Color::Red),
    }
}

const DIM: Style = Style::new().fg(Color::DarkGray);
const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);

/// A compact duration: `0s`, `42s`, `5m`, `3h`, `2d`.
pub fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn fmt_age(now: SystemTime, t: Option<SystemTime>) -> String {
    match t {
        None => "never".into(),
        Some(t) => fmt_dur(now.duration_since(t).unwrap_or_default()),
    }
}

pub fn fmt_lag(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        "-".into()
    } else if secs < 10.0 {
        format!("{secs:.1}s")
    } else {
        fmt_dur(Duration::from_secs_f64(secs))
    }
}

pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v < 10.0 {
        format!("{v:.1}{}", UNITS[u])
    } else {
        format!("{v:.0}{}", UNITS[u])
    }
}

/// A count for people: `950`, `12.3k`, `4.1M`.
fn fmt_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

/// The replica's requests since the start and a month at the last hour's rate, by kind.
fn request_line(
    total: &crate::status::RequestCounts,
    month: &crate::status::RequestCounts,
) -> Vec<Span<'static>> {
    use crate::status::RequestKind;
    let by_kind = |c: &crate::status::RequestCounts| {
        RequestKind::ALL
            .iter()
            .filter(|k| c.get(**k) > 0)
            .map(|k| format!("{} {}", fmt_count(c.get(*k)), k.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut l = kv(
        "  requests",
        if total.total() == 0 {
            "none".into()
        } else {
            by_kind(total)
        },
    );
    l.push(Span::raw("  "));
    l.extend(kv(
        "a month at this rate",
        if month.total() == 0 {
            "0".into()
        } else {
            format!("{} ({})", fmt_count(month.total()), by_kind(month))
        },
    ));
    l
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `HH:MM:SS` (UTC) for log lines.
fn fmt_clock(t: SystemTime) -> String {
    let s = fmt_time(t);
    s.get(11..19).unwrap_or(&s).to_string()
}

/// Cuts `s` to `width` characters, ending in `…` when it was longer.
pub fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// The last `width` characters of `s`, starting with `…` when it was longer.
fn tail(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width || width == 0 {
        return s.to_string();
    }
    let mut out = String::from("…");
    out.extend(s.chars().skip(n - (width - 1)));
    out
}

fn short_gen(g: &str) -> String {
    g.chars().take(8).collect()
}

/// The error worth showing for a replica: the current one while it fails, else the last one.
fn replica_error(r: &ReplicaStatus) -> Option<&str> {
    match &r.state {
        ReplicaState::Retrying { error, .. }
        | ReplicaState::Failed { error, .. }
        | ReplicaState::Conflict { error, .. } => Some(error.as_str()),
        _ => r
            .retention_error
            .as_deref()
            .or(r.last_error.as_deref())
            .or_else(|| {
                r.drill
                    .as_ref()
                    .filter(|d| d.result != crate::status::DrillResult::Passed)
                    .and_then(|d| d.reason.as_deref())
            }),
    }
}

/// A replica's drill: the stage of the one running, else the last result (with its age when
/// it passed: `ok 3h`).
fn drill_cell(db: &DbStatus, r: &ReplicaStatus, state: &State, w: usize) -> Span<'static> {
    use crate::status::DrillResult;
    if let Some(run) = &db.drill
        && run.replica.as_deref().is_none_or(|n| n == r.name)
    {
        return Span::styled(
            truncate(&format!("{}…", run.stage), w),
            Style::new().fg(Color::Cyan),
        );
    }
    match &r.drill {
        None => Span::styled("-", DIM),
        Some(d) => {
            let (text, style) = match d.result {
                DrillResult::Passed => (
                    format!("ok {}", fmt_age(state.now, d.finished_at)),
                    Style::new().fg(Color::Green),
                ),
                DrillResult::Failed => (
                    "FAILED".to_string(),
                    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                ),
                DrillResult::Error => ("error".to_string(), Style::new().fg(Color::Yellow)),
            };
            Span::styled(truncate(&text, w), style)
        }
    }
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

// ---------------------------------------------------------------------------------------------
// Header, banner, footer

fn conn_span(state: &State) -> Span<'static> {
    match &state.conn {
        Conn::Connecting => Span::styled("connecting…", Style::new().fg(Color::Yellow)),
        Conn::Connected => Span::styled("● connected", Style::new().fg(Color::Green)),
        Conn::Failed {
            failure: ConnFailure::AccessDenied,
            ..
        } => Span::styled(
            "✖ access denied",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Conn::Failed { .. } if state.ever_connected => Span::styled(
            "disconnected — retrying",
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ),
        Conn::Failed {
            failure: ConnFailure::SocketMissing,
            ..
        } => Span::styled(
            "✖ no control socket",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Conn::Failed { .. } => Span::styled(
            "disconnected — retrying",
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ),
    }
}

/// The full sentence about a failed connection, and its style.
fn banner_text(state: &State) -> Option<(String, Style)> {
    let Conn::Failed { failure, attempts } = &state.conn else {
        return None;
    };
    let what = state.conn_message(failure);
    let style = match failure {
        ConnFailure::Other(_) => Style::new().fg(Color::Black).bg(Color::Yellow),
        _ => Style::new().fg(Color::White).bg(Color::Red),
    };
    let text = if state.ever_connected {
        format!("disconnected — retrying every second (attempt {attempts}): {what}")
    } else {
        format!("{what} (retrying every second, attempt {attempts})")
    };
    Some((text, style))
}

fn draw_header(f: &mut Frame, area: Rect, state: &State) {
    let vis = state.visible().len();
    let mut right = format!(
        "{vis}/{} dbs · sort: {}",
        state.dbs.len(),
        state.sort.name()
    );
    if !state.filter.is_empty() || state.filter_editing {
        right.push_str(&format!(" · /{}", state.filter));
    }
    right.push(' ');
    let right_w = (right.chars().count() as u16).min(area.width / 2);
    let [left_area, right_area] =
        Layout::horizontal([Constraint::Fill(1), Constraint::Length(right_w)]).areas(area);
    let mut left = Line::from(vec![
        Span::styled(
            " litestreamd ",
            Style::new()
                .fg(Color::Black)
                .bg(Color::Cyan)
                .add_modifier(Modifier::BOLD),
        ),
        Span::raw(" "),
        conn_span(state),
    ]);
    // The socket path only when it fits (the banner and the help show it anyway).
    let path = format!("  {}", state.socket.display());
    if left.width() + path.chars().count() < left_area.width as usize {
        left.push_span(Span::styled(path, DIM));
    }
    f.render_widget(Paragraph::new(left), left_area);
    f.render_widget(
        Paragraph::new(Span::styled(right, DIM)).alignment(Alignment::Right),
        right_area,
    );
}

fn draw_footer(f: &mut Frame, area: Rect, state: &State) {
    let hints: &[(&str, &str)] = match state.mode() {
        Mode::Normal => &[
            ("jk", "select"),
            ("⏎", "detail"),
            ("/", "filter"),
            ("s", "sort"),
            ("S", "snapshot"),
            ("y", "sync"),
            ("r", "restore"),
            ("?", "help"),
            ("q", "quit"),
        ],
        Mode::Filter => &[
            ("type", "filter"),
            ("⏎", "keep"),
            ("Esc", "clear"),
            ("↑↓", "select"),
        ],
        Mode::Help => &[("any key", "close help")],
        Mode::Restore => match state.dialog.as_ref().map(|d| &d.phase) {
            Some(Phase::Running { .. }) => &[("Esc", "close (the restore continues)")],
            Some(Phase::Done(_)) => &[("⏎/Esc", "close")],
            _ => &[
                ("Tab", "field"),
                ("←→", "choose"),
                ("type", "edit"),
                ("⏎", "start"),
                ("Esc", "close"),
            ],
        },
    };
    let mut spans = Vec::new();
    for (k, what) in hints {
        spans.push(Span::styled(
            format!(" {k}"),
            Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
        ));
        spans.push(Span::raw(format!(":{what}")));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

// ---------------------------------------------------------------------------------------------
// Database table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Db,
    State,
    Gen,
    Pos,
    Replica,
    Health,
    Lag,
    LagBytes,
    Synced,
    Retries,
    Drill,
    Error,
}

impl Col {
    fn title(self) -> &'static str {
        match self {
            Col::Db => "DATABASE",
            Col::State => "STATE",
            Col::Gen => "GEN",
            Col::Pos => "POSITION",
            Col::Replica => "REPLICA",
            Col::Health => "HEALTH",
            Col::Lag => "LAG",
            Col::LagBytes => "LAG BYTES",
            Col::Synced => "SYNCED",
            Col::Retries => "RETRY",
            Col::Drill => "DRILL",
            Col::Error => "LAST ERROR",
        }
    }
}

const DISPLAY_ORDER: [Col; 12] = [
    Col::Db,
    Col::State,
    Col::Gen,
    Col::Pos,
    Col::Replica,
    Col::Health,
    Col::Lag,
    Col::LagBytes,
    Col::Synced,
    Col::Retries,
    Col::Drill,
    Col::Error,
];

const MIN_ERROR: u16 = 12;
const WIDE_POS: u16 = 17;

/// The columns that fit `width`, most important first, and their widths. The error column
/// takes what is left; the position shows a padded index only when there is room.
fn columns(width: u16, state: &State) -> Vec<(Col, u16)> {
    let longest = |it: &mut dyn Iterator<Item = usize>| it.max().unwrap_or(0) as u16;
    let db_w = longest(&mut state.dbs.iter().map(|d| d.name.chars().count())).clamp(8, 16);
    let rep_w = longest(
        &mut state
            .dbs
            .iter()
            .flat_map(|d| d.replicas.iter().map(|r| r.name.chars().count())),
    )
    .clamp(7, 12);
    let priority: [(Col, u16); 12] = [
        (Col::Db, db_w),
        (Col::State, 11),
        (Col::Replica, rep_w),
        (Col::Lag, 6),
        (Col::Synced, 6),
        (Col::Error, MIN_ERROR),
        (Col::Pos, 11),
        (Col::Retries, 5),
        (Col::Health, 8),
        (Col::Gen, 8),
        (Col::LagBytes, 9),
        (Col::Drill, 7),
    ];
    let mut chosen: Vec<(Col, u16)> = Vec::new();
    let mut used: u16 = 0;
    for (c, w) in priority {
        let need = w + if chosen.is_empty() { 0 } else { 1 };
        if used + need <= width {
            chosen.push((c, w));
            used += need;
        }
    }
    if let Some(p) = chosen.iter_mut().find(|(c, _)| *c == Col::Pos) {
        let extra = WIDE_POS - p.1;
        if used + extra <= width {
            p.1 = WIDE_POS;
            used += extra;
        }
    }
    if let Some(e) = chosen.iter_mut().find(|(c, _)| *c == Col::Error) {
        e.1 += width.saturating_sub(used);
    }
    DISPLAY_ORDER
        .iter()
        .filter_map(|c| chosen.iter().find(|(x, _)| x == c).copied())
        .collect()
}

fn pos_text(db: &DbStatus, wide: bool) -> String {
    match &db.pos {
        None => "-".into(),
        Some(p) if wide => format!("{:08x}:{}", p.index, p.offset),
        Some(p) => format!("{:x}:{}", p.index, p.offset),
    }
}

fn cell_for(col: Col, width: u16, db: &DbStatus, state: &State) -> Cell<'static> {
    let w = width as usize;
    let per_replica = |f: &dyn Fn(&ReplicaStatus) -> Span<'static>| -> Cell<'static> {
        if db.replicas.is_empty() {
            return Cell::from(Span::styled("-", DIM));
        }
        Cell::from(Text::from(
            db.replicas
                .iter()
                .map(|r| Line::from(f(r)))
                .collect::<Vec<_>>(),
        ))
    };
    match col {
        Col::Db => Cell::from(Span::styled(truncate(&db.name, w), BOLD)),
        Col::State => Cell::from(Span::styled(
            truncate(db.shown_state(), w),
            health_style(db_health(db)),
        )),
        Col::Gen => Cell::from(
            db.pos
                .as_ref()
                .map(|p| short_gen(&p.generation))
                .unwrap_or_else(|| "-".into()),
        ),
        Col::Pos => Cell::from(truncate(&pos_text(db, width >= WIDE_POS), w)),
        Col::Replica => per_replica(&|r| {
            Span::styled(
                truncate(&r.name, w),
                health_style(replica_health(r.state.name())),
            )
        }),
        Col::Health => per_replica(&|r| {
            Span::styled(r.state_name(), health_style(replica_health(r.state.name())))
        }),
        Col::Lag => per_replica(&|r| {
            let style = if r.lag_seconds >= 60.0 {
                Style::new().fg(Color::Yellow)
            } else {
                Style::new()
            };
            Span::styled(fmt_lag(r.lag_seconds), style)
        }),
        Col::LagBytes => per_replica(&|r| Span::raw(fmt_bytes(r.lag_bytes))),
        Col::Drill => per_replica(&|r| drill_cell(db, r, state, w)),
        Col::Synced => per_replica(&|r| Span::raw(fmt_age(state.now, r.last_sync))),
        Col::Retries => per_replica(&|r| {
            let style = if r.retries > 0 {
                Style::new().fg(Color::Yellow)
            } else {
                DIM
            };
            Span::styled(r.retries.to_string(), style)
        }),
        Col::Error => {
            let mut lines: Vec<Line> = Vec::new();
            for r in &db.replicas {
                let h = replica_health(r.state.name());
                let text = replica_error(r).unwrap_or("");
                let style = if h >= Health::Warn {
                    health_style(h)
                } else {
                    DIM
                };
                lines.push(Line::from(Span::styled(truncate(text, w), style)));
            }
            // A database-level error gets a line of its own, below its replicas'.
            if let Some(e) = db_error(db) {
                lines.push(Line::from(Span::styled(
                    truncate(&format!("db: {e}"), w),
                    Style::new().fg(Color::Red),
                )));
            }
            Cell::from(Text::from(lines))
        }
    }
}

/// The database's own error, shown while it is in the error state.
fn db_error(db: &DbStatus) -> Option<&str> {
    db.last_error
        .as_deref()
        .filter(|_| db.state == crate::status::DbState::Error)
}

/// One line per replica, plus one for a database error.
fn row_height(db: &DbStatus) -> u16 {
    let extra = if db_error(db).is_some() && !db.replicas.is_empty() {
        1
    } else {
        0
    };
    (db.replicas.len().max(1) + extra) as u16
}

fn draw_table(f: &mut Frame, area: Rect, state: &State) {
    let vis = state.visible();
    let stale = !state.connected() && state.ever_connected;
    let mut title = format!(" databases {}/{} ", vis.len(), state.dbs.len());
    if stale {
        title.push_str("(stale — last known) ");
    }
    if state.filter_editing {
        title.push_str(&format!("filter: {}▏ ", state.filter));
    } else if !state.filter.is_empty() {
        title.push_str(&format!("filter: {} ", state.filter));
    }
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .title(Span::styled(title, BOLD));
    let inner = block.inner(area);

    if vis.is_empty() {
        let (msg, style) = if state.dbs.is_empty() {
            match &state.conn {
                Conn::Connected => ("no databases configured".to_string(), DIM),
                Conn::Connecting => (format!("connecting to {}…", state.socket.display()), DIM),
                Conn::Failed { failure, .. } => (
                    state.conn_message(failure),
                    match failure {
                        ConnFailure::Other(_) => Style::new().fg(Color::Yellow),
                        _ => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                    },
                ),
            }
        } else {
            (
                format!(
                    "no database matches the filter {:?} (Esc clears it)",
                    state.filter
                ),
                DIM,
            )
        };
        f.render_widget(block, area);
        let h = inner.height.min(3);
        let msg_area = Rect {
            y: inner.y + inner.height.saturating_sub(h) / 2,
            height: h,
            ..inner
        };
        f.render_widget(
            Paragraph::new(msg)
                .style(style)
                .alignment(Alignment::Center)
                .wrap(Wrap { trim: true }),
            msg_area,
        );
        return;
    }

    const SYMBOL: &str = "▶ ";
    let cols = columns(
        inner.width.saturating_sub(SYMBOL.chars().count() as u16),
        state,
    );
    let header = Row::new(
        cols.iter()
            .map(|(c, _)| Cell::from(c.title()))
            .collect::<Vec<_>>(),
    )
    .style(Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = vis
        .iter()
        .map(|db| {
            let height = row_height(db);
            let row = Row::new(
                cols.iter()
                    .map(|(c, w)| cell_for(*c, *w, db, state))
                    .collect::<Vec<_>>(),
            )
            .height(height);
            if stale { row.style(DIM) } else { row }
        })
        .collect();
    let widths: Vec<Constraint> = cols.iter().map(|(_, w)| Constraint::Length(*w)).collect();
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .column_spacing(1)
        .highlight_symbol(SYMBOL)
        .highlight_spacing(HighlightSpacing::Always)
        .row_highlight_style(
            Style::new()
                .bg(Color::DarkGray)
                .add_modifier(Modifier::BOLD),
        );
    let mut ts = TableState::new().with_selected(state.selected_index());
    f.render_stateful_widget(table, area, &mut ts);
}

// ---------------------------------------------------------------------------------------------
// Detail pane

fn kv(k: &str, v: impl Into<String>) -> Vec<Span<'static>> {
    vec![Span::styled(format!("{k} "), DIM), Span::raw(v.into())]
}

fn detail_lines(state: &State, db: &DbStatus) -> Vec<Line<'static>> {
    let mut out: Vec<Line> = Vec::new();
    let mut l1 = kv("path", db.path.display().to_string());
    l1.push(Span::raw("  "));
    l1.push(Span::styled("state ", DIM));
    l1.push(Span::styled(
        db.shown_state(),
        health_style(db_state_health(db.state)),
    ));
    out.push(Line::from(l1));
    let mut l2 = kv(
        "position",
        db.pos
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    l2.push(Span::raw("  "));
    l2.extend(kv(
        "last sync",
        match db.last_sync {
            Some(t) => format!("{} ago", fmt_age(state.now, Some(t))),
            None => "never".into(),
        },
    ));
    out.push(Line::from(l2));
    let mut l3 = kv("db", fmt_bytes(db.db_size));
    l3.push(Span::raw("  "));
    l3.extend(kv("wal", fmt_bytes(db.wal_size)));
    l3.push(Span::raw("  "));
    l3.extend(kv("shadow wal", fmt_bytes(db.shadow_bytes)));
    out.push(Line::from(l3));
    if let Some(sb) = &db.standby {
        let mut l = match sb.promoted_at {
            Some(t) => kv("promoted", format!("{} ago", fmt_age(state.now, Some(t)))),
            None => kv("standby of", sb.replica.clone()),
        };
        l.push(Span::raw("  "));
        l.extend(kv(
            "apply lag",
            sb.apply_lag_seconds
                .map_or("-".into(), |s| format!("{s:.2}s")),
        ));
        l.push(Span::raw("  "));
        l.extend(kv("commits", sb.commits_applied.to_string()));
        l.push(Span::raw("  "));
        l.extend(kv(
            "bootstraps",
            match &sb.last_bootstrap {
                Some(why) => format!("{} (last: {why})", sb.bootstraps),
                None => sb.bootstraps.to_string(),
            },
        ));
        out.push(Line::from(l));
    }
    if let Some(e) = &db.last_error {
        out.push(Line::from(Span::styled(
            format!("last error: {e}"),
            Style::new().fg(Color::Red),
        )));
    }

    let detail = state.detail.as_ref().filter(|d| d.db == db.name);
    let listed = detail.and_then(|d| d.data.as_ref());
    match detail {
        None if !state.connected() => out.push(Line::from(Span::styled(
            "not connected: no replica listing",
            DIM,
        ))),
        None => out.push(Line::from(Span::styled("listing replicas…", DIM))),
        Some(d) => {
            if d.loading && d.data.is_none() {
                out.push(Line::from(Span::styled("listing replicas…", DIM)));
            }
            if let Some(e) = &d.error {
                out.push(Line::from(Span::styled(
                    format!("listing failed: {e}"),
                    Style::new().fg(Color::Red),
                )));
            }
        }
    }

    for r in &db.replicas {
        out.push(Line::raw(""));
        let h = replica_health(r.state.name());
        let mut head = vec![
            Span::styled(format!("▸ {}", r.name), BOLD),
            Span::raw(" "),
            Span::styled(r.state_name(), health_style(h)),
        ];
        if let ReplicaState::Retrying { attempt, .. }
        | ReplicaState::Failed { attempt, .. }
        | ReplicaState::Conflict { attempt, .. } = &r.state
        {
            head.push(Span::styled(
                format!(" (attempt {attempt})"),
                health_style(h),
            ));
        }
        head.push(Span::raw("  "));
        head.push(Span::styled(r.url.clone(), DIM));
        out.push(Line::from(head));
        let mut l = kv(
            "  pos",
            r.pos
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        l.push(Span::raw("  "));
        l.extend(kv(
            "lag",
            format!("{} / {}", fmt_lag(r.lag_seconds), fmt_bytes(r.lag_bytes)),
        ));
        l.push(Span::raw("  "));
        l.extend(kv(
            "synced",
            match r.last_sync {
                Some(t) => format!("{} ago", fmt_age(state.now, Some(t))),
                None => "never".into(),
            },
        ));
        l.push(Span::raw("  "));
        l.extend(kv("uploaded", fmt_bytes(r.uploaded_bytes)));
        l.push(Span::raw("  "));
        l.extend(kv("retries", r.retries.to_string()));
        out.push(Line::from(l));
        out.push(Line::from(request_line(&r.requests, &r.requests_per_month)));
        if let Some(e) = replica_error(r) {
            let style = if h >= Health::Warn {
                health_style(h)
            } else {
                DIM
            };
            out.push(Line::from(Span::styled(format!("  error: {e}"), style)));
        }
        let Some(listing) = listed.and_then(|d| d.replicas.iter().find(|x| x.name == r.name))
        else {
            continue;
        };
        if let Some(e) = &listing.error {
            out.push(Line::from(Span::styled(
                format!("  listing error: {e}"),
                Style::new().fg(Color::Red),
            )));
        }
        if listing.generations.is_empty() && listing.error.is_none() {
            out.push(Line::from(Span::styled("  no generations yet", DIM)));
        }
        for g in &listing.generations {
            let current = db
                .pos
                .as_ref()
                .is_some_and(|p| p.generation == g.generation);
            let mut gl = vec![
                Span::raw("  "),
                Span::styled(
                    format!("{} {}", if current { "●" } else { "○" }, g.generation),
                    if current {
                        Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)
                    } else {
                        Style::new()
                    },
                ),
            ];
            if let Some(t) = g.created {
                gl.push(Span::raw("  "));
                gl.extend(kv("created", fmt_time(t)));
            }
            if let Some(t) = g.updated {
                gl.push(Span::raw("  "));
                gl.extend(kv(
                    "updated",
                    format!("{} ago", fmt_age(state.now, Some(t))),
                ));
            }
            out.push(Line::from(gl));
            for s in &g.snapshots {
                out.push(Line::from(vec![
                    Span::styled("      snapshot ", DIM),
                    Span::raw(format!(
                        "{:08x}  {:>6}  {}",
                        s.index,
                        fmt_bytes(s.size),
                        fmt_time(s.created_at)
                    )),
                ]));
            }
            match (g.wal_first, g.wal_last) {
                (Some((fi, fo)), Some((li, lo))) => out.push(Line::from(vec![
                    Span::styled("      wal      ", DIM),
                    Span::raw(format!(
                        "{fi:08x}:{fo} → {li:08x}:{lo}  ({} segments)",
                        g.segments
                    )),
                ])),
                _ => out.push(Line::from(Span::styled("      wal      none", DIM))),
            }
        }
    }
    out
}

fn draw_detail(f: &mut Frame, area: Rect, state: &State) {
    let Some(db) = state.selected_db() else {
        let block = Block::bordered()
            .border_type(BorderType::Rounded)
            .title(" detail ");
        f.render_widget(
            Paragraph::new(Span::styled("no database selected", DIM)).block(block),
            area,
        );
        return;
    };
    let loading = state
        .detail
        .as_ref()
        .is_some_and(|d| d.db == db.name && d.loading && d.data.is_some());
    let title = format!(
        " {} — detail{} ",
        db.name,
        if loading { " (refreshing)" } else { "" }
    );
    let block = Block::bordered()
        .border_type(BorderType::Rounded)
        .title(Span::styled(title, BOLD));
    let lines = detail_lines(state, db);
    let max_scroll = (lines.len() as u16).saturating_sub(block.inner(area).height);
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .scroll((state.detail_scroll.min(max_scroll), 0)),
        area,
    );
}

// ---------------------------------------------------------------------------------------------
// Event log

fn draw_log(f: &mut Frame, area: Rect, state: &State) {
    let block = Block::bordered()
        .border_type(BorderType::Rounded)
        .title(Span::styled(" events ", BOLD));
    let n = block.inner(area).height as usize;
    let lines: Vec<Line> = state
        .log
        .iter()
        .skip(state.log.len().saturating_sub(n))
        .map(|l| {
            let mut spans = vec![
                Span::styled(format!("{} ", fmt_clock(l.time)), DIM),
                Span::styled(format!("{:<5} ", l.level.name()), level_style(l.level)),
            ];
            if let Some(db) = &l.db {
                spans.push(Span::styled(format!("{db}: "), BOLD));
            }
            spans.push(Span::styled(l.message.clone(), level_style(l.level)));
            Line::from(spans)
        })
        .collect();
    f.render_widget(Paragraph::new(lines).block(block), area);
}

// ---------------------------------------------------------------------------------------------
// Restore dialog

fn choice(label: &str, focused: bool) -> Vec<Span<'static>> {
    let arrow = if focused {
        Style::new().fg(Color::Cyan)
    } else {
        DIM
    };
    vec![
        Span::styled("◂ ", arrow),
        Span::styled(label.to_string(), if focused { BOLD } else { Style::new() }),
        Span::styled(" ▸", arrow),
    ]
}

fn text_field(text: &str, focused: bool, width: usize) -> Vec<Span<'static>> {
    if focused {
        vec![
            Span::styled(tail(text, width.saturating_sub(1)), BOLD),
            Span::styled(" ", Style::new().add_modifier(Modifier::REVERSED)),
        ]
    } else {
        vec![Span::raw(tail(text, width))]
    }
}

fn draw_dialog(f: &mut Frame, area: Rect, state: &State, d: &RestoreDialog) {
    let width = area.width.saturating_sub(4).min(84);
    let inner_w = width.saturating_sub(4) as usize;
    const LABEL: usize = 13;
    let value_w = inner_w.saturating_sub(LABEL);
    let mut lines: Vec<Line> = Vec::new();
    let label = |name: &str, field: Option<Field>| -> Span<'static> {
        let focused =
            field.is_some() && field == Some(d.focus) && matches!(d.phase, Phase::Editing { .. });
        if focused {
            Span::styled(
                format!("› {name:<w$}", w = LABEL - 2),
                Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
            )
        } else {
            Span::styled(format!("  {name:<w$}", w = LABEL - 2), DIM)
        }
    };
    let mut db_line = vec![label("database", None), Span::styled(d.db.clone(), BOLD)];
    db_line.push(Span::styled(
        format!(
            "  live: {}",
            tail(
                &d.live_path.display().to_string(),
                value_w.saturating_sub(d.db.len() + 8)
            )
        ),
        DIM,
    ));
    lines.push(Line::from(db_line));

    match &d.phase {
        Phase::Editing { error } => {
            let focus = |fl: Field| d.focus == fl;
            let mut l = vec![label("replica", Some(Field::Replica))];
            l.extend(choice(d.replica_label(), focus(Field::Replica)));
            lines.push(Line::from(l));
            let mut l = vec![label("generation", Some(Field::Generation))];
            l.extend(choice(
                &truncate(d.generation_label(), value_w.saturating_sub(4)),
                focus(Field::Generation),
            ));
            if d.generations.is_empty() {
                l.push(Span::styled("  (none listed yet)", DIM));
            } else {
                l.push(Span::styled(
                    format!("  ({} known)", d.generations.len()),
                    DIM,
                ));
            }
            lines.push(Line::from(l));
            let mut l = vec![label("restore to", Some(Field::Target))];
            l.extend(choice(d.target.name(), focus(Field::Target)));
            lines.push(Line::from(l));
            match d.target {
                Target::Latest => {}
                Target::Time => {
                    let mut l = vec![label("time", Some(Field::Value))];
                    l.extend(text_field(
                        &d.time_text,
                        focus(Field::Value),
                        value_w.saturating_sub(12),
                    ));
                    l.push(Span::styled("  RFC 3339", DIM));
                    lines.push(Line::from(l));
                }
                Target::Index => {
                    let mut l = vec![label("wal index", Some(Field::Value))];
                    l.extend(text_field(
                        &d.index_text,
                        focus(Field::Value),
                        value_w.saturating_sub(16),
                    ));
                    l.push(Span::styled("  hex, inclusive", DIM));
                    lines.push(Line::from(l));
                }
            }
            let mut l = vec![label("output", Some(Field::Output))];
            l.extend(text_field(&d.output, focus(Field::Output), value_w));
            lines.push(Line::from(l));
            let mut l = vec![label("integrity", Some(Field::Integrity))];
            l.extend(choice(
                if d.integrity_check {
                    "run PRAGMA integrity_check"
                } else {
                    "skip the check"
                },
                focus(Field::Integrity),
            ));
            lines.push(Line::from(l));
            lines.push(Line::raw(""));
            lines.push(Line::from(Span::styled(
                "A NEW file; a relative path is in the daemon's restore directory.",
                DIM,
            )));
            if let Some(e) = error {
                lines.push(Line::from(Span::styled(
                    format!("✖ {e}"),
                    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                )));
            }
        }
        Phase::Running { stage, done, total } => {
            let out = d
                .started_output
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let mut l = vec![label("output", None)];
            l.push(Span::raw(tail(&out, value_w)));
            lines.push(Line::from(l));
            let mut l = vec![label("stage", None)];
            l.push(Span::styled(
                stage.clone(),
                Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            ));
            if *total > 0 {
                l.push(Span::raw(format!("  {done}/{total}")));
            }
            lines.push(Line::from(l));
            lines.push(Line::raw("")); // the gauge goes here
            lines.push(Line::raw(""));
            lines.push(Line::from(Span::styled(
                "Esc closes this dialog; the restore goes on in the daemon and its result is logged.",
                DIM,
            )));
        }
        Phase::Done(Ok(s)) => {
            let out = d
                .started_output
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            lines.push(Line::from(Span::styled(
                "✔ restore finished",
                Style::new().fg(Color::Green).add_modifier(Modifier::BOLD),
            )));
            let mut l = vec![label("output", None)];
            l.push(Span::raw(tail(&out, value_w)));
            lines.push(Line::from(l));
            lines.push(Line::from(
                [label("replica", None), Span::raw(s.replica.clone())].to_vec(),
            ));
            lines.push(Line::from(
                [label("generation", None), Span::raw(s.generation.clone())].to_vec(),
            ));
            lines.push(Line::from(
                [
                    label("applied", None),
                    Span::raw(format!(
                        "snapshot {:08x}, WAL up to {:08x}, {} segments, {}",
                        s.snapshot_index,
                        s.max_index,
                        s.segments,
                        fmt_bytes(s.bytes)
                    )),
                ]
                .to_vec(),
            ));
            let integrity = if s.integrity_checked {
                Span::styled(
                    "ok (PRAGMA integrity_check ran)",
                    Style::new().fg(Color::Green),
                )
            } else {
                Span::styled("not run", Style::new().fg(Color::Yellow))
            };
            lines.push(Line::from([label("integrity", None), integrity].to_vec()));
            lines.push(Line::raw(""));
            lines.push(Line::from(Span::styled(
                "Enter or Esc closes this dialog.",
                DIM,
            )));
        }
        Phase::Done(Err(e)) => {
            lines.push(Line::from(Span::styled(
                "✖ restore failed",
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            )));
            lines.push(Line::from(Span::styled(
                e.clone(),
                Style::new().fg(Color::Red),
            )));
            lines.push(Line::raw(""));
            lines.push(Line::from(Span::styled(
                "Enter or Esc closes this dialog.",
                DIM,
            )));
        }
    }

    // Error text may wrap: leave room for it.
    let wrapped: u16 = lines
        .iter()
        .map(|l| (l.width() as u16).max(1).div_ceil(inner_w.max(1) as u16))
        .sum();
    let height = wrapped + 2;
    let rect = centered(area, width, height);
    f.render_widget(Clear, rect);
    let title = match &d.phase {
        Phase::Editing { .. } => format!(" restore {} ", d.db),
        Phase::Running { .. } => format!(" restoring {}… ", d.db),
        Phase::Done(_) => format!(" restore {} ", d.db),
    };
    let block = Block::bordered()
        .border_type(BorderType::Double)
        .title(Span::styled(title, BOLD))
        .padding(ratatui::widgets::Padding::horizontal(1));
    let inner = block.inner(rect);
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        rect,
    );
    if let Phase::Running { done, total, .. } = &d.phase {
        let ratio = if *total > 0 {
            (*done as f64 / *total as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let gauge_area = Rect {
            y: inner.y + 3,
            height: 1,
            ..inner
        };
        f.render_widget(
            Gauge::default()
                .gauge_style(Style::new().fg(Color::Cyan).bg(Color::Black))
                .ratio(ratio)
                .label(format!("{:.0}%", ratio * 100.0)),
            gauge_area,
        );
    }
    let _ = state;
}

// ---------------------------------------------------------------------------------------------
// Help

fn draw_help(f: &mut Frame, area: Rect, state: &State) {
    let mut lines: Vec<Line> = Vec::new();
    let key = |k: &str| {
        Span::styled(
            format!("  {k:<14}"),
            Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
        )
    };
    for (k, what) in BINDINGS {
        lines.push(Line::from(vec![key(k), Span::raw(*what)]));
    }
    lines.push(Line::raw(""));
    lines.push(Line::from(Span::styled("restore dialog", BOLD)));
    for (k, what) in DIALOG_BINDINGS {
        lines.push(Line::from(vec![key(k), Span::raw(*what)]));
    }
    lines.push(Line::raw(""));
    lines.push(Line::from(vec![
        Span::raw("  colours: "),
        Span::styled("healthy", health_style(Health::Ok)),
        Span::raw("  "),
        Span::styled("retrying / waiting", health_style(Health::Warn)),
        Span::raw("  "),
        Span::styled("failed / error", health_style(Health::Bad)),
    ]));
    lines.push(Line::from(vec![
        Span::styled("  socket ", DIM),
        Span::raw(state.socket.display().to_string()),
    ]));
    let height = lines.len() as u16 + 2;
    let rect = centered(area, area.width.saturating_sub(4).min(72), height);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .border_type(BorderType::Double)
                .title(Span::styled(" help — any key closes ", BOLD)),
        ),
        rect,
    );
}
