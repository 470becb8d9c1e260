//! Which tensors are layers: `--include` / `--exclude` regular expressions over tensor names.

use regex::Regex;

use crate::error::{Error, Result};

/// Selects layers by name. A tensor is selected when its rank is at least 2, `include` (if any)
/// matches somewhere in its name, and `exclude` (if any) does not.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    include: Option<Regex>,
    exclude: Option<Regex>,
}

impl Selector {
    /// A selector from optional patterns (Rust `regex` syntax, unanchored).
    pub fn new(include: Option<&str>, exclude: Option<&str>) -> Result<Self> {
        let compile = |flag, pat: Option<&str>| {
            pat.map(|p| {
                Regex::new(p).map_err(|e| Error::Regex {
                    flag,
                    cause: Box::new(e),
                })
            })
            .transpose()
        };
        Ok(Selector {
            include: compile("--include", include)?,
            exclude: compile("--exclude", exclude)?,
        })
    }

    /// Whether a tensor of this name and shape is a selected layer.
    pub fn selects(&self, name: &str, shape: &[usize]) -> bool {
        shape.len() >= 2
            && self.include.as_ref().is_none_or(|r| r.is_match(name))
            && !self.exclude.as_ref().is_some_and(|r| r.is_match(name))
    }

    /// A short description for messages, e.g. `rank >= 2, include /conv/`.
    pub fn describe(&self) -> String {
        let mut s = String::from("tensors of rank >= 2");
        if let Some(r) = &self.include {
            s.push_str(&format!(", matching --include '{}'", r.as_str()));
        }
        if let Some(r) = &self.exclude {
            s.push_str(&format!(", not matching --exclude '{}'", r.as_str()));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_include_exclude() {
        let s = Selector::new(Some("conv"), Some("^conv1\\.")).unwrap();
        assert!(s.selects("layer1.0.conv1.weight", &[64, 64, 3, 3]));
        assert!(!s.selects("conv1.weight", &[64, 3, 3, 3]));
        assert!(!s.selects("layer1.0.bn1.weight", &[64]));
        assert!(!s.selects("linear.weight", &[10, 512]));
        assert!(Selector::default().selects("linear.weight", &[10, 512]));
        assert!(Selector::new(Some("("), None).is_err());
    }
}
