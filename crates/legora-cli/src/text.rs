//! Plain-text output shared by the subcommands: aligned tables and PEFT-style numbers.

/// `1234567` → `1,234,567` (PEFT's `print_trainable_parameters` style).
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A left-aligned text table: a header, a rule, the rows; columns separated by two
/// spaces, trailing blanks trimmed.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(|h| h.chars().count());
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut s = String::new();
        for (c, w) in cells.iter().zip(&width) {
            s.push_str(&format!("{c:<w$}  "));
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header);
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    line(&rule.iter().map(String::as_str).collect::<Vec<_>>());
    for r in rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// Write to stdout; a reader that went away (`legora plugins | head -1`) ends the
/// process quietly with success instead of a "broken pipe" panic.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let r = out
        .write_fmt(args)
        .and_then(|_| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|_| out.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` that ends quietly when stdout's reader went away (see [`write_stdout`]).
macro_rules! outln {
    () => { $crate::text::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::text::write_stdout(format_args!($($arg)*), true) };
}

/// `print!` that ends quietly when stdout's reader went away (see [`write_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => { $crate::text::write_stdout(format_args!($($arg)*), false) };
}

/// `demo/../out/demo` → `out/demo`, for display only (a symlinked `demo` folder would
/// make the two differ on disk).
pub fn tidy(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["a", "bb"], &[["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxyz  1\n");
    }

    #[test]
    fn paths_read_tidily() {
        use super::tidy;
        use std::path::Path;
        assert_eq!(tidy(Path::new("demo/../out/demo")), Path::new("out/demo"));
        assert_eq!(tidy(Path::new("../x/./y")), Path::new("../x/y"));
        assert_eq!(tidy(Path::new("/a/./b/../c")), Path::new("/a/c"));
    }
}
