//! Checksums of a directory's files (`checksums.json`: file name → CRC-32), written beside a
//! checkpoint or a stage's results and verified before they are used, so that a flipped bit or
//! an edited file is refused instead of resumed or evaluated silently.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Result, TrainError};
use crate::train::write_atomic;

/// The file holding a directory's checksums.
pub const CHECKSUMS_FILE: &str = "checksums.json";

fn crc_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    Ok(format!("crc32:{:08x}", crc32fast::hash(&bytes)))
}

/// Writes the checksums of `files` (names inside `dir`).
pub fn write(dir: &Path, files: &[&str]) -> Result<()> {
    let mut sums = BTreeMap::new();
    for f in files {
        sums.insert((*f).to_string(), crc_of(&dir.join(f))?);
    }
    let json = serde_json::to_vec_pretty(&sums)
        .map_err(|e| TrainError::config("checksums", "json", e.to_string()))?;
    write_atomic(&dir.join(CHECKSUMS_FILE), &json)
}

/// Verifies every file `dir/checksums.json` lists, and that it lists each of `required`. A
/// directory written before checksums existed (no `checksums.json`) passes.
pub fn verify(dir: &Path, required: &[&str]) -> Result<()> {
    let path = dir.join(CHECKSUMS_FILE);
    if !path.exists() {
        return Ok(());
    }
    let damaged = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let text = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    let sums: BTreeMap<String, String> = serde_json::from_slice(&text)
        .map_err(|e| damaged(format!("{CHECKSUMS_FILE} is unreadable: {e}")))?;
    for f in required {
        if !sums.contains_key(*f) {
            return Err(damaged(format!("{CHECKSUMS_FILE} does not list {f}")));
        }
    }
    for (f, want) in &sums {
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(damaged(format!(
                "{CHECKSUMS_FILE} lists '{}', which is not a file of this directory",
                f.escape_debug()
            )));
        }
        let got = crc_of(&dir.join(f))?;
        if &got != want {
            return Err(damaged(format!(
                "{f} is damaged: its checksum is {got}, {CHECKSUMS_FILE} records {want} (the file changed after it was written)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), [1u8, 2, 3]).unwrap();
        std::fs::write(dir.path().join("b.json"), b"{\"epoch\": 1}").unwrap();
        verify(dir.path(), &["a.bin"]).unwrap(); // nothing recorded yet
        write(dir.path(), &["a.bin", "b.json"]).unwrap();
        verify(dir.path(), &["a.bin", "b.json"]).unwrap();
        std::fs::write(dir.path().join("b.json"), b"{\"epoch\": 99}").unwrap();
        let err = verify(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("b.json is damaged"), "{err}");
        std::fs::write(dir.path().join("b.json"), b"{\"epoch\": 1}").unwrap();
        let err = verify(dir.path(), &["c.bin"]).unwrap_err().to_string();
        assert!(err.contains("does not list c.bin"), "{err}");
    }
}
