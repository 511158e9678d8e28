//! A small typed reader over one TOML table that names the key in every error
//! and reports keys nobody asked for.

use std::collections::BTreeSet;

use toml::{Table, Value};

/// A problem with one key, before the file name is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub reason: String,
}

pub struct Section<'a> {
    /// Dotted path of this table, e.g. `resource` or `node[1]`.
    path: String,
    table: &'a Table,
    seen: BTreeSet<&'static str>,
}

impl<'a> Section<'a> {
    pub fn new(path: impl Into<String>, table: &'a Table) -> Self {
        Section {
            path: path.into(),
            table,
            seen: BTreeSet::new(),
        }
    }

    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    pub fn error(&self, key: &str, reason: impl Into<String>) -> KeyError {
        KeyError {
            key: self.key_path(key),
            reason: reason.into(),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.insert(key);
        self.table.get(key)
    }

    pub fn opt_str(&mut self, key: &'static str) -> Result<Option<String>, KeyError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(self.error(key, format!("expected a string, got {}", other.type_str())))
            }
        }
    }

    pub fn str_or(&mut self, key: &'static str, default: &str) -> Result<String, KeyError> {
        Ok(self.opt_str(key)?.unwrap_or_else(|| default.to_string()))
    }

    pub fn req_str(&mut self, key: &'static str) -> Result<String, KeyError> {
        match self.opt_str(key)? {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => Err(self.error(key, "must not be empty")),
            None => Err(self.error(key, "missing required key")),
        }
    }

    pub fn bool_or(&mut self, key: &'static str, default: bool) -> Result<bool, KeyError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, got {}", other.type_str()),
            )),
        }
    }

    pub fn u64_or(&mut self, key: &'static str, default: u64) -> Result<u64, KeyError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Integer(i)) if *i >= 0 => Ok(*i as u64),
            Some(Value::Integer(i)) => {
                Err(self.error(key, format!("must not be negative, got {i}")))
            }
            Some(other) => Err(self.error(
                key,
                format!("expected a whole number, got {}", other.type_str()),
            )),
        }
    }

    /// A value given as a string parsed by `parse`, or as a bare integer.
    pub fn parsed_or<T: From<u64>>(
        &mut self,
        key: &'static str,
        default: T,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, KeyError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::String(s)) => parse(s).map_err(|e| self.error(key, e)),
            Some(Value::Integer(_)) => self.u64_or(key, 0).map(T::from),
            Some(other) => {
                Err(self.error(key, format!("expected a string, got {}", other.type_str())))
            }
        }
    }

    /// One of a fixed set of strings.
    pub fn choice_or(
        &mut self,
        key: &'static str,
        default: &str,
        allowed: &[&str],
    ) -> Result<String, KeyError> {
        let v = self.str_or(key, default)?;
        if allowed.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(self.error(key, format!("`{v}` is not one of: {}", allowed.join(", "))))
        }
    }

    /// A sub-table (absent = empty).
    pub fn table(&mut self, key: &'static str) -> Result<Option<&'a Table>, KeyError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(t)),
            Some(other) => Err(self.error(
                key,
                format!("expected a table [{key}], got {}", other.type_str()),
            )),
        }
    }

    /// An array of tables (`[[key]]`).
    pub fn table_array(&mut self, key: &'static str) -> Result<Vec<&'a Table>, KeyError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Table(t) => Ok(t),
                    other => Err(self.error(
                        key,
                        format!("expected [[{key}]] tables, got {}", other.type_str()),
                    )),
                })
                .collect(),
            Some(other) => Err(self.error(
                key,
                format!("expected [[{key}]] tables, got {}", other.type_str()),
            )),
        }
    }

    /// Fails on the first key that no getter asked for.
    pub fn finish(self) -> Result<(), KeyError> {
        for key in self.table.keys() {
            if !self.seen.contains(key.as_str()) {
                let known: Vec<&str> = self.seen.iter().copied().collect();
                return Err(KeyError {
                    key: self.key_path(key),
                    reason: format!("unknown key (known here: {})", known.join(", ")),
                });
            }
        }
        Ok(())
    }
}
