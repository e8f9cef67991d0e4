//! Keys to actions. What a key means depends on the [`Mode`]: in the filter and in the restore
//! dialog's text fields letters are text, elsewhere they are commands.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Quit,
    Up,
    Down,
    PageUp,
    PageDown,
    Top,
    Bottom,
    Left,
    Right,
    NextField,
    PrevField,
    Enter,
    Escape,
    Backspace,
    /// Ctrl-U: clear the text being typed.
    ClearField,
    Char(char),
    ToggleDetail,
    StartFilter,
    CycleSort,
    Snapshot,
    Sync,
    Drill,
    Verify,
    /// Promote the selected standby (asks for a second press).
    Promote,
    OpenRestore,
    Help,
}

/// Which keys mean what right now (the state decides: see `State::mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing the filter after `/`.
    Filter,
    Help,
    Restore,
}

/// The action for a key press, if any. Releases and repeats are ignored (only presses count).
pub fn map_key(key: KeyEvent, mode: Mode) -> Option<Action> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl {
        return match key.code {
            KeyCode::Char('c') => Some(Action::Quit),
            KeyCode::Char('u') => Some(Action::ClearField),
            KeyCode::Char('n') => Some(Action::Down),
            KeyCode::Char('p') => Some(Action::Up),
            _ => None,
        };
    }
    // Keys that mean the same everywhere.
    let common = match key.code {
        KeyCode::Up => Some(Action::Up),
        KeyCode::Down => Some(Action::Down),
        KeyCode::PageUp => Some(Action::PageUp),
        KeyCode::PageDown => Some(Action::PageDown),
        KeyCode::Left => Some(Action::Left),
        KeyCode::Right => Some(Action::Right),
        KeyCode::Enter => Some(Action::Enter),
        KeyCode::Esc => Some(Action::Escape),
        KeyCode::Backspace => Some(Action::Backspace),
        KeyCode::BackTab => Some(Action::PrevField),
        _ => None,
    };
    if common.is_some() {
        return common;
    }
    match mode {
        Mode::Help => Some(Action::Escape), // any key closes the help
        Mode::Filter => match key.code {
            KeyCode::Char(c) => Some(Action::Char(c)),
            KeyCode::Tab => Some(Action::Enter),
            _ => None,
        },
        Mode::Restore => match key.code {
            KeyCode::Char(c) => Some(Action::Char(c)),
            KeyCode::Tab => Some(Action::NextField),
            _ => None,
        },
        Mode::Normal => match key.code {
            KeyCode::Char('q') => Some(Action::Quit),
            KeyCode::Char('k') => Some(Action::Up),
            KeyCode::Char('j') => Some(Action::Down),
            KeyCode::Char('g') | KeyCode::Home => Some(Action::Top),
            KeyCode::Char('G') | KeyCode::End => Some(Action::Bottom),
            KeyCode::Tab => Some(Action::ToggleDetail),
            KeyCode::Char('/') => Some(Action::StartFilter),
            KeyCode::Char('s') => Some(Action::CycleSort),
            KeyCode::Char('S') => Some(Action::Snapshot),
            KeyCode::Char('y') => Some(Action::Sync),
            KeyCode::Char('D') => Some(Action::Drill),
            KeyCode::Char('V') => Some(Action::Verify),
            KeyCode::Char('P') => Some(Action::Promote),
            KeyCode::Char('r') => Some(Action::OpenRestore),
            KeyCode::Char('?') => Some(Action::Help),
            _ => None,
        },
    }
}

/// Every key binding, for the help overlay: (keys, what they do).
pub const BINDINGS: &[(&str, &str)] = &[
    ("↑ ↓  k j", "select a database"),
    ("g G", "first / last database"),
    ("Enter  Tab", "show or hide the detail pane"),
    ("PgUp PgDn", "scroll the detail pane"),
    ("/", "filter (type; Enter keeps it, Esc clears it)"),
    ("s", "sort by name → state → lag"),
    ("S", "snapshot the selected database now"),
    ("y", "sync the selected database now"),
    ("D", "restore drill of the selected database now"),
    ("V", "verify the selected database's replicas (listings)"),
    (
        "P P",
        "promote the selected standby to primary (press twice)",
    ),
    ("r", "restore the selected database to a new file"),
    ("?", "this help (any key closes it)"),
    ("q  Ctrl-C", "quit"),
];

/// Restore dialog keys, for the help overlay and the dialog's own hint line.
pub const DIALOG_BINDINGS: &[(&str, &str)] = &[
    ("Tab ↑ ↓", "move between fields"),
    ("← → Space", "change a choice"),
    ("type  Ctrl-U", "edit / clear a text field"),
    ("Enter", "start the restore"),
    ("Esc", "close the dialog"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn press(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn letters_are_commands_only_in_normal_mode() {
        assert_eq!(
            map_key(press(KeyCode::Char('q')), Mode::Normal),
            Some(Action::Quit)
        );
        assert_eq!(
            map_key(press(KeyCode::Char('q')), Mode::Filter),
            Some(Action::Char('q'))
        );
        assert_eq!(
            map_key(press(KeyCode::Char('q')), Mode::Restore),
            Some(Action::Char('q'))
        );
        assert_eq!(
            map_key(press(KeyCode::Char('S')), Mode::Normal),
            Some(Action::Snapshot)
        );
        assert_eq!(
            map_key(press(KeyCode::Char('j')), Mode::Normal),
            Some(Action::Down)
        );
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        for mode in [Mode::Normal, Mode::Filter, Mode::Restore, Mode::Help] {
            assert_eq!(map_key(ctrl_c, mode), Some(Action::Quit));
        }
    }

    #[test]
    fn releases_are_ignored() {
        let mut k = press(KeyCode::Char('q'));
        k.kind = KeyEventKind::Release;
        assert_eq!(map_key(k, Mode::Normal), None);
    }
}
