//! Client-supplied strings in log lines. A client id, user name or topic may hold a newline
//! or an ANSI escape; written as is, it could forge a whole log line. [`Printable`] shows
//! control characters escaped (`\n`, `\u{1b}`), and everything else unchanged.

use std::fmt;

/// Displays a string with its control characters escaped.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s.chars().any(char::is_control) {
            return f.write_str(s);
        }
        for c in s.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// An optional client string, shown as `-` when absent.
#[derive(Debug, Clone, Copy)]
pub struct PrintableOpt<'a>(pub Option<&'a str>);

impl fmt::Display for PrintableOpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => Printable(s).fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let forged = "x\n2026-01-01T00:00:00Z  INFO raftmq: connected client_id=admin\u{1b}[0m";
        let shown = Printable(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\u{1b}'));
        assert_eq!(shown, "x\\n2026-01-01T00:00:00Z  INFO raftmq: connected client_id=admin\\u{1b}[0m");
        assert_eq!(Printable("sensor/ü/1").to_string(), "sensor/ü/1");
        assert_eq!(PrintableOpt(None).to_string(), "-");
    }
}
