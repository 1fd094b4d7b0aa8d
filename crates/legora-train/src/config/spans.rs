//! Where each key of a run file is: the spans of its keys and values, for errors that
//! name the line, the column and the dotted key.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One key of the document: its dotted path, the key's span and the value's span.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) path: String,
    pub(super) key: Range<usize>,
    pub(super) value: Range<usize>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct SpanIndex {
    entries: Vec<Entry>,
}

impl SpanIndex {
    pub(super) fn build(table: &DeTable<'_>) -> Self {
        let mut idx = Self::default();
        idx.walk_table(table, "");
        idx
    }

    fn walk_table(&mut self, table: &DeTable<'_>, prefix: &str) {
        for (k, v) in table.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            self.entries.push(Entry {
                path: path.clone(),
                key: k.span(),
                value: v.span(),
            });
            self.walk_value(v.get_ref(), &path);
        }
    }

    fn walk_value(&mut self, v: &DeValue<'_>, path: &str) {
        match v {
            DeValue::Table(t) => self.walk_table(t, path),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.entries.push(Entry {
                        path: p.clone(),
                        key: item.span(),
                        value: item.span(),
                    });
                    self.walk_value(item.get_ref(), &p);
                }
            }
            _ => {}
        }
    }

    /// The innermost key whose key or value span contains `pos`.
    pub(super) fn path_at(&self, span: &Range<usize>) -> Option<&Entry> {
        let within = |r: &Range<usize>| {
            r.start <= span.start && span.end <= r.end.max(r.start + 1) && r.start < r.end
        };
        self.entries
            .iter()
            .filter(|e| within(&e.key) || within(&e.value))
            .min_by_key(|e| {
                let k = e.key.end.saturating_sub(e.key.start);
                let v = e.value.end.saturating_sub(e.value.start);
                if within(&e.key) {
                    k
                } else {
                    v
                }
            })
    }

    /// The innermost entry whose value encloses `span` (a table holding it);
    /// `None` at the top level.
    pub(super) fn table_at(&self, span: &Range<usize>) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| {
                e.value.start < e.value.end
                    && e.value.start <= span.start
                    && span.end <= e.value.end
            })
            .min_by_key(|e| e.value.end - e.value.start)
    }

    pub(super) fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

/// 1-based line and column of byte `pos` of `text`.
pub(super) fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(pos, |i| pos - i - 1) + 1;
    (line, col)
}

/// The field named in a serde message such as "unknown field `x`, expected ..." or
/// "missing field `x`".
pub(super) fn named_field(message: &str) -> Option<&str> {
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.split('`').next();
        }
    }
    None
}
