//! Checks shared by the formats' validated constructors (`from_parts`): shapes, index lists,
//! disjoint rows and value regions. All arithmetic is checked, so hostile sizes give an error,
//! never an overflow; no check allocates more than its input holds.

use crate::error::{KernelError, Result};

/// The error of a broken invariant of `format`'s `field`.
pub(crate) fn invalid(format: &'static str, field: &'static str, detail: String) -> KernelError {
    KernelError::Parts {
        format,
        field,
        detail,
    }
}

/// `a × b`, or an error naming `field` when it overflows `usize`.
pub(crate) fn mul(format: &'static str, field: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(format, field, format!("{a} × {b} overflows usize")))
}

/// A `rows × cols` matrix whose row and column indices are stored as `u32`: both fit `u32`,
/// and `rows × cols` (the dense matrix `unpack` builds) fits `usize`.
pub(crate) fn check_shape(format: &'static str, rows: usize, cols: usize) -> Result<()> {
    for (field, n) in [("rows", rows), ("cols", cols)] {
        if n > u32::MAX as usize {
            return Err(invalid(
                format,
                field,
                format!("{n} is more than u32::MAX (indices are u32)"),
            ));
        }
    }
    mul(format, "rows × cols", rows, cols).map(|_| ())
}

/// A values array the engines address with `u32` positions.
pub(crate) fn check_u32_len(format: &'static str, len: usize) -> Result<()> {
    if len > u32::MAX as usize {
        return Err(invalid(
            format,
            "values",
            format!("{len} values are more than u32::MAX (value positions are u32)"),
        ));
    }
    Ok(())
}

/// `got == want` for the length of `field`; `need` says what needs `want` values.
pub(crate) fn check_count(
    format: &'static str,
    field: &'static str,
    got: usize,
    want: usize,
    need: impl FnOnce() -> String,
) -> Result<()> {
    if got != want {
        return Err(invalid(
            format,
            field,
            format!("holds {got} entries, but {} needs {want}", need()),
        ));
    }
    Ok(())
}

/// Every index of `idx` below `bound` (`bound_name` says what it counts, e.g. `columns`) and the
/// list strictly ascending (so without duplicates). `at` names the list in errors (e.g.
/// `block 3`).
pub(crate) fn check_ascending(
    format: &'static str,
    field: &'static str,
    idx: &[u32],
    bound: usize,
    bound_name: &str,
    at: impl Fn() -> String,
) -> Result<()> {
    let mut prev: Option<u32> = None;
    for (k, &i) in idx.iter().enumerate() {
        if i as usize >= bound {
            return Err(invalid(
                format,
                field,
                format!(
                    "{}entry {k} = {i} is out of range for {bound} {bound_name}",
                    prefix(&at)
                ),
            ));
        }
        if let Some(p) = prev {
            if i <= p {
                let how = if i == p { "repeats" } else { "is below" };
                return Err(invalid(
                    format,
                    field,
                    format!(
                        "{}entry {k} = {i} {how} entry {} = {p} (indices must be strictly ascending)",
                        prefix(&at),
                        k - 1
                    ),
                ));
            }
        }
        prev = Some(i);
    }
    Ok(())
}

fn prefix(at: &impl Fn() -> String) -> String {
    let s = at();
    if s.is_empty() {
        s
    } else {
        format!("{s}, ")
    }
}

/// A compressed row pointer over `nnz` entries: starts at 0, never decreases, ends at `nnz`.
pub(crate) fn check_row_ptr(format: &'static str, row_ptr: &[u32], nnz: usize) -> Result<()> {
    if let Some(&first) = row_ptr.first() {
        if first != 0 {
            return Err(invalid(
                format,
                "row_ptr",
                format!("starts at {first}, not 0"),
            ));
        }
    }
    for (i, w) in row_ptr.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(invalid(
                format,
                "row_ptr",
                format!("entry {} = {} is below entry {i} = {}", i + 1, w[1], w[0]),
            ));
        }
    }
    let last = row_ptr.last().map_or(0, |&l| l as usize);
    if last != nnz {
        return Err(invalid(
            format,
            "row_ptr",
            format!("ends at {last}, but col_idx holds {nnz} entries"),
        ));
    }
    Ok(())
}

/// Rows of several owners (blocks, row groups) are pairwise disjoint. `owners` yields
/// `(owner, its rows)`; `owner_name` says what an owner is (e.g. `block`).
pub(crate) fn check_disjoint_rows<'a>(
    format: &'static str,
    field: &'static str,
    owner_name: &str,
    owners: impl Iterator<Item = (usize, &'a [u32])>,
) -> Result<()> {
    let mut all: Vec<(u32, usize)> = Vec::new();
    for (o, rows) in owners {
        all.extend(rows.iter().map(|&r| (r, o)));
    }
    all.sort_unstable();
    for w in all.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(invalid(
                format,
                field,
                format!(
                    "row {} is in {owner_name} {} and in {owner_name} {} (rows of different \
                     {owner_name}s must be disjoint)",
                    w[0].0, w[0].1, w[1].1
                ),
            ));
        }
    }
    Ok(())
}

/// A region of the values array: `len` values from `offset`, owned by `owner` (for errors).
pub(crate) struct Region {
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) owner: String,
}

/// The regions lie inside `0..total`, are pairwise disjoint and together cover it exactly: every
/// value belongs to exactly one block (or tile).
pub(crate) fn check_regions(
    format: &'static str,
    mut regions: Vec<Region>,
    total: usize,
) -> Result<()> {
    let mut sum = 0usize;
    for r in &regions {
        let end = r.offset.checked_add(r.len).ok_or_else(|| {
            invalid(
                format,
                "offset",
                format!(
                    "{}'s offset {} + {} values overflows usize",
                    r.owner, r.offset, r.len
                ),
            )
        })?;
        if end > total {
            return Err(invalid(
                format,
                "offset",
                format!(
                    "{}'s values {}..{end} end past the {total} values",
                    r.owner, r.offset
                ),
            ));
        }
        // Each region fits `total`, but overlapping ones may still sum past `usize`.
        sum = sum
            .checked_add(r.len)
            .ok_or_else(|| invalid(format, "values", "the sizes overflow usize".into()))?;
    }
    regions.retain(|r| r.len > 0);
    regions.sort_unstable_by_key(|r| r.offset);
    for w in regions.windows(2) {
        if w[1].offset < w[0].offset + w[0].len {
            return Err(invalid(
                format,
                "offset",
                format!(
                    "{}'s values {}..{} overlap {}'s values {}..{}",
                    w[1].owner,
                    w[1].offset,
                    w[1].offset + w[1].len,
                    w[0].owner,
                    w[0].offset,
                    w[0].offset + w[0].len
                ),
            ));
        }
    }
    if sum != total {
        return Err(invalid(
            format,
            "values",
            format!("holds {total} values, but the structure stores {sum}"),
        ));
    }
    Ok(())
}

/// Panics with the broken invariant when `check` failed: the debug assertion of the unchecked
/// constructors (called under `cfg(debug_assertions)` only).
#[cfg(debug_assertions)]
#[track_caller]
pub(crate) fn debug_valid(constructor: &str, check: Result<()>) {
    if let Err(e) = check {
        panic!("{constructor}: the caller broke an invariant: {e}");
    }
}
